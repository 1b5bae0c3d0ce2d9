"""torch.compile (inductor, CPU, tiny checkpoint): compiled in setup, never after; a cache that ships."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from cogserver import ROOT
from lcm import compiling
from lcm.engine import Engine
from lcm.params import Request

SIZE = 256


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def request(**kw) -> Request:
    return Request.build(
        **{
            "prompt": "a photo of a cat",
            "width": SIZE,
            "height": SIZE,
            "seed": 5,
            "num_inference_steps": 3,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def compiled(tiny_checkpoint, tmp_path_factory):
    """An engine that compiled the UNet and VAE decoder for 256x256 in setup (about 2 minutes on 2 cores)."""
    cache = tmp_path_factory.mktemp("compile-cache")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "LCM_COMPILE": "1",
            "LCM_COMPILE_SIZES": f"{SIZE}x{SIZE}",
            "LCM_COMPILE_CACHE": str(cache),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        }.items():
            mp.setenv(name, value)
        engine = Engine.load(tiny_checkpoint, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("input") / "in.png"
    Image.fromarray(np.linspace(0, 255, SIZE * SIZE * 3).reshape(SIZE, SIZE, 3).astype(np.uint8)).save(path)
    return path


def test_after_setup_no_request_compiles_and_every_request_matches_eager(
    compiled, engine, image_file, caplog
):
    assert [m.name for m in compiled.model.compiled] == ["unet", "vae"]
    assert all(m.sealed and m.signatures for m in compiled.model.compiled)
    frames = counters["frames"]["total"]
    cases = [
        ("the compiled size", request(), []),
        ("image to image at the compiled size", request(image=str(image_file), num_inference_steps=2), []),
        ("another size", request(width=SIZE + 8), ["unet", "vae"]),
        ("a prompt of two token windows", request(prompt="a photo of a cat " * 20), ["unet"]),
        ("two images", request(num_images=2), ["unet"]),  # the CPU decodes one image at a time
        ("FreeU, traced without it", request(freeu=True), ["unet"]),
        ("the compiled size again, after FreeU", request(), []),
    ]
    with caplog.at_level(logging.INFO, logger="lcm"):
        for name, req, eager in cases:
            ours = compiled.generate(req)
            assert ours.eager == eager, name
            assert max_diff(ours.pixels, engine.generate(req).pixels) <= 1, name
    assert counters["frames"]["total"] == frames  # dynamo compiled no frame after setup
    assert not engine.generate(request()).eager  # compile off: no note at all
    with caplog.at_level(logging.INFO, logger="lcm"):
        compiled.generate_files(request(width=SIZE + 8), compiled.model.weights_dir.parent / "compile-out")
    assert "graphs=eager(unet+vae: not a size compiled in setup, see LCM_COMPILE_SIZES)" in caplog.text
    with caplog.at_level(logging.INFO, logger="lcm"):
        compiled.generate_files(request(freeu=True), compiled.model.weights_dir.parent / "compile-freeu")
    assert "freeu=on" in caplog.text and "graphs=eager(unet: FreeU runs it uncompiled)" in caplog.text


LOAD_AND_COMPILE = """
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from lcm import compiling

print(compiling.load_cache(Path(sys.argv[1]), torch.device("cpu")))
torch.compile(eval(sys.argv[2]), dynamic=False)(torch.ones(8, 8))
print(json.dumps(dict(counters["inductor"])))
"""
PROBE = "lambda x: (x.sin() * 2).relu() + x.cos()"


def test_saved_artifacts_turn_a_fresh_process_compile_into_cache_hits(compiled, tmp_path, monkeypatch):
    """The round trip on CPU with inductor: the engine's artifacts and one more function, saved here,
    loaded into another process with empty caches, whose compile of that function then hits."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "here"))
    misses = counters["inductor"]["fxgraph_cache_miss"]
    torch.compile(eval(PROBE), dynamic=False)(torch.ones(8, 8))
    assert counters["inductor"]["fxgraph_cache_miss"] == misses + 1
    saved = compiling.save_cache(tmp_path, compiled.model.device)
    assert saved.stat().st_size > 0 and json.loads((tmp_path / compiling.CACHE_FINGERPRINT).read_text())

    fresh = tmp_path / "fresh"
    loaded, stats = _python(LOAD_AND_COMPILE, fresh, str(tmp_path), PROBE).splitlines()[-2:]
    assert loaded.startswith("loaded torch-compile-cache.bin (") and "inductor" in loaded, loaded
    hits = json.loads(stats)
    assert hits.get("fxgraph_cache_hit", 0) >= 1 and not hits.get("fxgraph_cache_miss"), hits
    assert len([f for f in fresh.rglob("*") if f.is_file()]) > 2  # the engine's graphs landed there too


def test_artifacts_made_elsewhere_are_not_loaded(tmp_path, monkeypatch):
    (tmp_path / compiling.CACHE_ARTIFACTS).write_bytes(b"not loaded")
    made = {**compiling.fingerprint(torch.device("cpu")), "torch": "0.0.0"}
    (tmp_path / compiling.CACHE_FINGERPRINT).write_text(json.dumps(made))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: pytest.fail("loaded"))
    message = compiling.load_cache(tmp_path, torch.device("cpu"))
    assert f"was made elsewhere (torch 0.0.0 there, {torch.__version__} here): not loaded" in message


def _python(code: str, inductor_dir: Path, *args: str) -> str:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_without_a_cache_file_setup_says_it_compiles_from_scratch(tmp_path):
    message = compiling.load_cache(tmp_path, torch.device("cpu"))
    assert message == f"no torch-compile-cache.bin in {tmp_path}: compiling from scratch"
