"""Every input of predict() proven at the service boundary: through Cog's real server, each one
sent at a value other than its default reaches the engine, the file and the log line.

If predict.py dropped an input on its way to Request.build, or passed it wrongly (the safety
checker's negation, say), a row below fails; an input added to predict.py without a row fails
the completeness test.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import io
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
from PIL import Image

from cogserver import ROOT
from lcm.metadata import read_metadata
from lcm.params import SPECS
from lcm.synthetic_loras import peft_lora
from reference import gradient_png

BASE = {"prompt": "a photo of a cat", "seed": 5, "width": 256, "height": 256, "num_inference_steps": 2}
FORMATS = {"PNG": "png", "WEBP": "webp", "JPEG": "jpg"}


def _mask() -> bytes:
    """A black 320x256 mask with a white rectangle: inpainting's mask for PHOTO."""
    pixels = np.zeros((256, 320), dtype=np.uint8)
    pixels[64:192, 96:224] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _blocks() -> bytes:
    """A 256x256 mosaic of grey 16x16 blocks, as a PNG: step edges of every contrast for Canny."""
    levels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    pixels = np.repeat(np.repeat(levels, 16, axis=0), 16, axis=1)
    out = io.BytesIO()
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(out, format="PNG")
    return out.getvalue()


PHOTO = gradient_png()
PHOTO_URL = "data:image/png;base64," + base64.b64encode(PHOTO).decode()
MASK = _mask()
MASK_URL = "data:image/png;base64," + base64.b64encode(MASK).decode()
BLOCKS = _blocks()
BLOCKS_URL = "data:image/png;base64," + base64.b64encode(BLOCKS).decode()
CONTROL = {"control_image": BLOCKS_URL}
# lora_weights' row: a LoRA served from 127.0.0.1 (the session server allows private hosts), written
# by the row's server fixture, as the URL must be known when the rows are.
LORA_FILES = Path(tempfile.mkdtemp(prefix="lcm-boundary-loras-"))
_LORA_HTTP = ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(LORA_FILES))
)
threading.Thread(target=_LORA_HTTP.serve_forever, daemon=True).start()
LORA_URL = f"http://127.0.0.1:{_LORA_HTTP.server_address[1]}/style.safetensors"


@dataclass(frozen=True)
class Row:
    """One input at a value other than its default, and where that value must show.

    `logged`: the log line's words for it (absent from the default request's line), None where
    it is not logged. `pixels`:
    how the first image compares with the default request's ("differ", "same", or "batch": within
    the 1/255 a batched convolution's rounding allows). `with_`: inputs both requests share
    (the image, for strength). `server`: the fixture of the server both requests go to (the one
    set up with trained weights, for lora_scale). `recorded`: the file's metadata key and value, where not the
    input's own name and value; None where the file does not record it, with the reason.
    """

    value: Any
    logged: Optional[str]
    pixels: str = "differ"
    with_: dict[str, Any] = field(default_factory=dict)
    recorded: Optional[tuple[str, Any]] = ("", None)
    server: str = "server"


ROWS: dict[str, Row] = {
    "prompt": Row("a red fox on a hill", None),  # not logged: a prompt is the user's, not the operator's
    "image": Row(PHOTO_URL, "mode=img2img", recorded=("image_sha256", hashlib.sha256(PHOTO).hexdigest())),
    "mask": Row(
        MASK_URL,
        "mode=inpaint",
        with_={"image": PHOTO_URL},
        recorded=("mask_sha256", hashlib.sha256(MASK).hexdigest()),
    ),
    "prompt_strength": Row(0.5, "strength=0.50", with_={"image": PHOTO_URL}),
    "width": Row(320, "size=320x256"),
    "height": Row(320, "size=256x320"),
    # A file is one image: its own seed says which.
    "num_images": Row(2, "images=2", pixels="batch", recorded=None),
    "num_inference_steps": Row(3, "steps=3"),
    "guidance_scale": Row(3.5, "guidance=3.50"),
    # 100 would pick the same 2 timesteps as the default 50 (999 and 499): 30 picks 989 and 494.
    "lcm_origin_steps": Row(30, "origin_steps=30"),
    "seed": Row(6, "seed=6"),
    "clip_skip": Row(1, "clip_skip=1"),
    "freeu": Row(True, "freeu=on"),
    "output_format": Row("webp", "format=webp"),
    # PNG is lossless, so quality shows only in a lossy format (test_metadata: not in PNG bytes).
    "output_quality": Row(50, "quality=50", with_={"output_format": "jpg"}),
    # Not in the file: a reproduced file runs the checker, as the default does.
    "disable_safety_checker": Row(True, "flagged=off", pixels="same", recorded=None),
    "fast_decode": Row(True, "decoder=taesd"),
    "lora_weights": Row(LORA_URL, "lora_weights=", server="server_with_a_lora"),
    "lora_scale": Row(0.5, "x0.50 ", server="lora_server"),
    "control_image": Row(
        BLOCKS_URL, "control=canny", recorded=("control_image_sha256", hashlib.sha256(BLOCKS).hexdigest())
    ),
    "controlnet_conditioning_scale": Row(0.5, "scale=0.50", with_=CONTROL),
    # Of 2 steps: 0.5 leaves the ControlNet out of the first, as end=0.5 does of the second.
    "control_guidance_start": Row(0.5, "start=0.50", with_=CONTROL),
    "control_guidance_end": Row(0.5, "end=0.50", with_=CONTROL),
    "canny_low_threshold": Row(20, "thresholds=20/200", with_=CONTROL),
    "canny_high_threshold": Row(150, "thresholds=100/150", with_=CONTROL),
    # Adds the edge map as a last file, changes no image, and is not needed to reproduce one.
    "return_control_image": Row(True, "edges=returned", pixels="same", with_=CONTROL, recorded=None),
}


@pytest.fixture
def server_with_a_lora(server, tiny_checkpoint):
    """The session server, once lora_weights' LoRA is there to fetch."""
    peft_lora(tiny_checkpoint, LORA_FILES / "style.safetensors", seed=1)
    return server


@dataclass
class Answer:
    logs: str
    files: list[Path]

    def pixels(self, i: int = 0) -> np.ndarray:
        return np.asarray(Image.open(self.files[i]).convert("RGB"))


def predict(server, folder: Path, **inputs: Any) -> Answer:
    """One prediction over HTTP; its files written under `folder` with the extension of their format."""
    status, body = server.predict(**inputs)
    assert status == 200 and body["status"] == "succeeded", body
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, url in enumerate(body["output"]):
        raw = base64.b64decode(url.partition(",")[2])
        kind = FORMATS[Image.open(io.BytesIO(raw)).format]
        files.append(folder / f"{i}.{kind}")
        files[-1].write_bytes(raw)
    return Answer(body["logs"], files)


def test_every_input_of_predict_has_a_row_at_a_value_other_than_its_default():
    import predict as predict_py

    inputs = [n for n in inspect.signature(predict_py.Predictor.predict).parameters if n != "self"]
    assert sorted(ROWS) == sorted(inputs)
    for name, row in ROWS.items():
        assert row.value != SPECS[name].default and row.value != BASE.get(name), name


@pytest.fixture(scope="module")
def defaults(server, tmp_path_factory) -> Callable[[dict[str, Any]], Answer]:
    """The default request's answer (with a row's shared inputs), made once for each of them."""
    made: dict[str, Answer] = {}

    def default(shared: dict[str, Any]) -> Answer:
        key = repr(sorted(shared.items()))
        if key not in made:
            made[key] = predict(server, tmp_path_factory.mktemp("default"), **{**BASE, **shared})
        return made[key]

    return default


@pytest.mark.parametrize("name", list(ROWS))
def test_each_input_reaches_the_file_the_log_and_the_pixels(server, defaults, tmp_path, name, request):
    row = ROWS[name]
    if row.server == "server":
        default = defaults(row.with_)
    else:
        server = request.getfixturevalue(row.server)
        default = predict(server, tmp_path / "default", **{**BASE, **row.with_})
    sent = predict(server, tmp_path / "sent", **{**BASE, **row.with_, name: row.value})
    if row.logged is not None:
        assert row.logged not in default.logs, default.logs
        assert row.logged in sent.logs, sent.logs
    meta = read_metadata(sent.files[0])
    if row.recorded is None:
        assert name not in meta and "safety_checker" not in meta
    else:
        key, value = row.recorded if row.recorded[0] else (name, row.value)
        assert meta[key] == value, meta
        assert read_metadata(default.files[0]).get(key) != value
    if name == "num_images":
        assert len(sent.files) == 2 and [read_metadata(f)["seed"] for f in sent.files] == [5, 6]
    if name == "return_control_image":
        assert len(sent.files) == 2 and len(default.files) == 1
        edges = np.asarray(Image.open(sent.files[1]))
        assert set(np.unique(edges)) <= {0, 255} and (edges == 255).any()  # Canny's white edges on black
        assert "lcm" not in Image.open(sent.files[1]).info  # no generation metadata: reproduce skips it
    if name == "output_format":
        assert Image.open(sent.files[0]).format == "WEBP" and Image.open(default.files[0]).format == "PNG"
    a, b = default.pixels(), sent.pixels()
    differ = a.shape != b.shape or int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    assert differ if row.pixels == "differ" else differ <= {"same": 0, "batch": 1}[row.pixels], differ


def test_a_weighted_prompt_changes_the_pixels_and_the_file_keeps_it_as_sent(server, defaults, tmp_path):
    """Compel's syntax (with A1111's spelling) reaches the encoder: the pixels move, the log says so,
    and the file holds the prompt as the user wrote it, for reproduce to read the same way."""
    prompt = BASE["prompt"].replace("cat", "(cat:1.3)") + "++"
    sent = predict(server, tmp_path / "weighted", **{**BASE, "prompt": prompt})
    default = defaults({})
    assert "weighting=compel" in sent.logs and "weighting=none" in default.logs, sent.logs
    assert read_metadata(sent.files[0])["prompt"] == prompt
    assert not np.array_equal(sent.pixels(), default.pixels())


def _reproduce(file: Path, weights: Path, out: Path, image: Optional[Path] = None) -> bytes:
    """`python -m lcm reproduce` in a fresh interpreter: the bytes of the file it writes."""
    command = [sys.executable, "-m", "lcm", "reproduce", str(file), "--out", str(out)]
    command += ["--weights", str(weights), "--device", "cpu"] + (["--image", str(image)] if image else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = out.iterdir()
    return written.read_bytes()


def test_a_server_file_reproduces_byte_for_byte_in_a_fresh_process(server, tiny_checkpoint, tmp_path):
    """Made in Cog's worker process with every setting reproduce must carry at a non-default value,
    regenerated by the command line in another process."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(PHOTO)
    inputs = {"image": PHOTO_URL, "prompt_strength": 0.6, "clip_skip": 1, "lcm_origin_steps": 30}
    inputs |= {"fast_decode": True, "output_format": "webp", "output_quality": 70}
    (file,) = predict(server, tmp_path / "made", **{**BASE, **inputs}).files
    meta = read_metadata(file)
    assert all(meta[k] == v for k, v in inputs.items() if k != "image"), meta
    assert _reproduce(file, tiny_checkpoint, tmp_path / "again", photo) == file.read_bytes()
