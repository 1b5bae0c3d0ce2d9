"""A request's own LoRA (lora_weights): fetched by URL from a local HTTP server, held to diffusers'
load_lora_weights in both formats users bring, switched per batch, refused clearly, reproducible."""

from __future__ import annotations

import functools
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import loras
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_bf16 import BF16, BOUND, run_lcm

from cogserver import CogServer
from lcm.cli import main as cli_main
from lcm.engine import Engine
from lcm.errors import InputError, LCMError
from lcm.metadata import read_metadata
from lcm.params import LORA_SHA256_KEY, Request
from lcm.worker import CancelFlag

SCALE = 0.7
SMALL = {"width": 256, "height": 256, "num_inference_steps": 2, "seed": 3, "disable_safety_checker": True}


class Files:
    """A local HTTP server for a folder, counting the requests for each file."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.hits = folder, Counter()
        files = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                files.hits[self.path] += 1
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    """The LoRAs on a local server: peft and kohya formats, a second style, and files that are not."""
    folder = tmp_path_factory.mktemp("served-loras")
    loras.peft_lora(tiny_checkpoint, folder / "peft.safetensors", seed=1)
    loras.kohya_lora(tiny_checkpoint, folder / "kohya.safetensors", seed=2)
    loras.peft_lora(tiny_checkpoint, folder / "other-style.safetensors", seed=3)
    loras.other_model_lora(folder / "sdxl.safetensors")
    loras.not_a_lora(folder / "unrelated.safetensors")
    save_file(  # LoRA keys for a layer this UNet does not have
        {
            "unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32),
            "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4),
        },
        folder / "elsewhere.safetensors",
    )
    (folder / "pickle.bin").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")
    served = Files(folder)
    try:
        yield served
    finally:
        served.httpd.shutdown()
        served.httpd.server_close()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """An engine of this module's own: the LoRAs it loads wrap the UNet's and text encoder's layers in
    peft's, which other modules' references (a text encoder cut for clip skip) would not expect."""
    own = Engine.load(tiny_checkpoint, device="cpu")
    yield own
    own.close()


@pytest.fixture(autouse=True)
def private_urls(monkeypatch):
    monkeypatch.setenv("LCM_ALLOW_PRIVATE_URLS", "1")  # the server is on 127.0.0.1


def pixels(engine, prompt: str = "a cat", **kw: Any) -> np.ndarray:
    return engine.generate(Request.build(prompt, **{**SMALL, **kw})).pixels.astype(np.int16)


def run(pipe: Any) -> np.ndarray:
    """diffusers' pipeline on SMALL's request, called as test_bf16 calls it: uint8 levels."""
    return run_lcm(pipe, Request.build("a cat", **SMALL)).astype(np.int16)


def reference(tiny_checkpoint: Path, lora_file: Path) -> np.ndarray:
    return run(loras.reference_pipeline(tiny_checkpoint, lora_file, SCALE))


@pytest.mark.parametrize("name", ["peft.safetensors", "kohya.safetensors"])
def test_a_request_lora_equals_diffusers_load_lora_weights(engine, files, tiny_checkpoint, name):
    ours = pixels(engine, lora_weights=files.url(name), lora_scale=SCALE)
    assert int(np.abs(ours - reference(tiny_checkpoint, files.folder / name)).max()) <= 1
    assert int(np.abs(ours - pixels(engine)).max()) > 10  # the LoRA does something


def test_without_lora_weights_the_base_model_runs_bit_for_bit_after_loras_were_loaded(engine, files):
    before = pixels(engine)
    pixels(engine, lora_weights=files.url("peft.safetensors"), lora_scale=SCALE)
    assert np.array_equal(pixels(engine), before)
    assert np.array_equal(pixels(engine, lora_weights=files.url("peft.safetensors"), lora_scale=0.0), before)


def test_a_repeated_url_is_not_downloaded_again(files):
    url = files.url("other-style.safetensors")
    first, second = Request.build("a dog", lora_weights=url), Request.build("a dog", lora_weights=url)
    assert files.hits["/other-style.safetensors"] == 1
    assert first.lora.fetched.startswith("downloaded") and second.lora.fetched.startswith("cached")
    assert first.lora == second.lora.__class__(url, second.lora.path, first.lora.sha256, first.lora.fetched)


def test_a_batch_mixing_lora_and_no_lora_requests_equals_each_alone(engine, files, monkeypatch, tmp_path):
    import dataclasses

    monkeypatch.setattr(
        engine.model, "accel", dataclasses.replace(engine.model.accel, batch_pixels=8 * 256 * 256)
    )
    styled, other = files.url("peft.safetensors"), files.url("other-style.safetensors")
    requests = [
        Request.build("a cat", lora_weights=styled, lora_scale=SCALE, **SMALL),
        Request.build("a dog", **SMALL),
        Request.build("a fox", lora_weights=styled, lora_scale=SCALE, **{**SMALL, "seed": 4}),
        Request.build("a cat", lora_weights=other, lora_scale=SCALE, **SMALL),
        Request.build("a cat", lora_weights=styled, lora_scale=0.5, **SMALL),
    ]
    gate = threading.Event()
    blocker = engine.thread.submit(lambda _flag: gate.wait(60))
    jobs = [engine.submit(r, tmp_path / f"batch-{i}") for i, r in enumerate(requests)]
    gate.set()
    blocker.result()
    served = [job.result() for job in jobs]
    batches = [s.summary.split("batch=")[1].split(" ")[0] for s in served]
    assert batches == ["2requests/2images", "1requests/1images", "2requests/2images", "1requests/1images"] + [
        "1requests/1images"
    ]
    for i, (request, result) in enumerate(zip(requests, served, strict=True)):
        alone = engine.generate(request).pixels.astype(np.int16)
        batched = np.asarray(Image.open(result.paths[0]).convert("RGB")).astype(np.int16)
        assert int(np.abs(alone[0] - batched).max()) <= 1, i


def test_only_the_last_few_loras_stay_loaded(engine, files, monkeypatch):
    monkeypatch.setattr(engine.model.adapters, "limit", 2)
    for name in ("peft.safetensors", "kohya.safetensors", "other-style.safetensors"):
        pixels(engine, lora_weights=files.url(name), lora_scale=SCALE, num_inference_steps=1)
    kept = {n for n in engine.model.pipe.unet.peft_config if n.startswith("request-")}
    assert len(kept) == 2 and len(engine.model.adapters.loaded) == 2
    assert int(np.abs(pixels(engine) - pixels(engine, lora_weights=files.url("peft.safetensors"))).max()) > 10


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("sdxl.safetensors", "does not fit"),
        ("unrelated.safetensors", "does not fit"),
        ("elsewhere.safetensors", "not found in the base model"),
        ("pickle.bin", "not safetensors"),
        ("missing.safetensors", "HTTP 404"),
    ],
)
def test_a_file_that_is_no_sd15_lora_fails_naming_the_field_and_the_next_request_runs(
    engine, files, name, problem
):
    before = pixels(engine)
    with pytest.raises(InputError) as caught:
        pixels(engine, lora_weights=files.url(name))
    assert caught.value.field == "lora_weights" and problem in str(caught.value), str(caught.value)
    assert np.array_equal(pixels(engine), before)


@pytest.mark.parametrize("url", ["ftp://example.com/x.safetensors", "file:///etc/passwd", "/etc/passwd"])
def test_only_http_and_https_urls_are_accepted(url):
    with pytest.raises(InputError) as caught:
        Request.build("a cat", lora_weights=url)
    assert caught.value.field == "lora_weights"


def test_a_private_host_is_refused_unless_allowed(files, monkeypatch):
    monkeypatch.delenv("LCM_ALLOW_PRIVATE_URLS")
    with pytest.raises(InputError) as caught:
        Request.build("a cat", lora_weights=files.url("peft.safetensors").replace("127.0.0.1", "127.0.0.2"))
    assert caught.value.field == "lora_weights" and "LCM_ALLOW_PRIVATE_URLS" in str(caught.value)


def test_fused_projections_refuse_a_request_lora(engine, files, monkeypatch):
    import dataclasses

    monkeypatch.setattr(engine.model, "accel", dataclasses.replace(engine.model.accel, fuse_qkv=True))
    with pytest.raises(LCMError, match="LCM_FUSE_QKV"):
        engine.generate(Request.build("a cat", lora_weights=files.url("peft.safetensors"), **SMALL))


def test_files_record_the_lora_and_reproduce_only_while_the_url_serves_it(
    engine, files, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    served = files.folder / "changing.safetensors"
    served.write_bytes((files.folder / "peft.safetensors").read_bytes())
    url = files.url("changing.safetensors")
    request = Request.build("a cat", lora_weights=url, lora_scale=SCALE, **SMALL)
    (path,) = engine.generate_files(request, tmp_path / "made")
    meta = read_metadata(path)
    assert meta["lora_weights"] == url and meta[LORA_SHA256_KEY] == request.lora.sha256
    assert meta["lora_scale"] == SCALE
    reproduce = ["reproduce", str(path), "--out", str(tmp_path / "again"), "--weights", str(tiny_checkpoint)]
    assert cli_main(reproduce) == 0
    (twin,) = (tmp_path / "again").iterdir()
    assert np.array_equal(np.asarray(Image.open(twin)), np.asarray(Image.open(path)))
    served.write_bytes((files.folder / "other-style.safetensors").read_bytes())
    monkeypatch.setenv("LCM_LORA_CACHE", str(tmp_path / "fresh-cache"))  # the cache keeps the old file
    with pytest.raises(InputError, match="now another") as caught:
        Request.from_metadata(meta)
    assert caught.value.field == "lora_weights"
    assert cli_main(reproduce) == 2 and "now another" in capsys.readouterr().err


def test_a_lora_request_through_cogs_server(tiny_checkpoint, openapi_schema, files):
    env = {"LCM_ALLOW_PRIVATE_URLS": "1"}
    server = CogServer(tiny_checkpoint, openapi_schema, env=env)
    try:
        server.wait_until({"READY"})
        inputs = {
            "prompt": "a cat",
            **SMALL,
            "lora_weights": files.url("kohya.safetensors"),
            "lora_scale": SCALE,
        }
        status, body = server.predict(**inputs)
        assert status == 200 and body["status"] == "succeeded", body
        assert "lora_weights=" in body["logs"] and len(body["output"]) == 1
        status, body = server.predict(**{**inputs, "lora_weights": files.url("unrelated.safetensors")})
        assert body["status"] == "failed" and "lora_weights" in body["error"], body
        status, body = server.predict(**{**inputs, "lora_weights": "", "lora_scale": 1.0})
        assert body["status"] == "succeeded", body
    finally:
        server.stop()


def test_switching_between_loaded_loras_reads_no_file(engine, files, monkeypatch):
    """A switch is set_adapters only: once both are loaded, alternating between them loads nothing."""
    a, b = files.url("peft.safetensors"), files.url("kohya.safetensors")
    for url in (a, b):
        pixels(engine, lora_weights=url, num_inference_steps=1)
    loads: list[Any] = []
    load = engine.model.pipe.load_lora_weights
    monkeypatch.setattr(
        engine.model.pipe, "load_lora_weights", lambda *x, **k: loads.append(x) or load(*x, **k)
    )
    for url in (a, b, a):
        engine.call(
            engine.generate_batch, [Request.build("a cat", lora_weights=url, **SMALL)], [CancelFlag()]
        )
    assert loads == []


def test_a_request_lora_in_bf16_equals_diffusers_in_bf16(tiny_checkpoint, files):
    """The adapters take the model's dtype, as diffusers' do (bound: tests/test_bf16.py's)."""
    engine = Engine.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    try:
        ours = pixels(engine, lora_weights=files.url("kohya.safetensors"), lora_scale=SCALE)
        channels_last = engine.model.accel.channels_last
        assert {p.dtype for n, p in engine.model.pipe.unet.named_parameters() if "lora_" in n} == {BF16}
    finally:
        engine.close()
    pipe = loras.reference_pipeline(
        tiny_checkpoint, files.folder / "kohya.safetensors", SCALE, BF16, channels_last
    )
    assert int(np.abs(ours - run(pipe)).max()) <= BOUND


def test_a_trainings_tar_by_url_is_its_lora(engine, files, tiny_checkpoint, lora_weights):
    """A Replicate training's output, as `cog train` writes it, works as lora_weights."""
    (files.folder / "training.tar").write_bytes(lora_weights.read_bytes())
    request = Request.build("a cat", lora_weights=files.url("training.tar"), lora_scale=SCALE, **SMALL)
    assert request.lora.path.name.endswith(".safetensors")
    ours = engine.generate(request).pixels.astype(np.int16)
    assert int(np.abs(ours - reference(tiny_checkpoint, request.lora.path)).max()) <= 1


def test_with_trained_weights_the_trained_lora_stays_at_one_and_lora_scale_is_the_requests(
    tiny_checkpoint, files, lora_weights, tmp_path
):
    from lcm import lora

    trained = lora.fetch(str(lora_weights), tmp_path)
    engine = Engine.load(tiny_checkpoint, device="cpu", lora_path=trained)
    try:
        ours = pixels(engine, lora_weights=files.url("peft.safetensors"), lora_scale=SCALE)
        summary = engine.summary(
            engine.generate(Request.build("a cat", lora_weights=files.url("peft.safetensors"), **SMALL))
        )
        alone = pixels(engine)
    finally:
        engine.close()
    pipe = loras.reference_pipeline(tiny_checkpoint, files.folder / "peft.safetensors", SCALE)
    pipe.load_lora_weights(str(trained), adapter_name="trained")
    pipe.set_adapters(["trained", loras.ADAPTER], adapter_weights=[1.0, SCALE])
    assert int(np.abs(ours - run(pipe)).max()) <= 1
    assert int(np.abs(ours - alone).max()) > 10
    assert " lora=" in summary and "x1.00 lora_weights=" in summary
