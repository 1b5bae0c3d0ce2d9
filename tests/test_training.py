"""Latent consistency fine-tuning: the archive is checked, the LoRA trains, and serving uses it.

The tiny checkpoint is random. Its VAE maps every image to nearly the same latent (within 0.07 of
zero) and decodes grey, so "the samples move toward the set" is measured in latent space, as the
per-channel mean of 4-step samples' latents against the training latents', and there it cannot be
told from the samples shrinking: another caption's move as much (docs/fine-tuning.md, "What the
tests show, and what they cannot"). That the LoRA learns the set, and only for its caption, needs a
pretrained model (bench.lcf_evidence).
"""

from __future__ import annotations

import base64
import inspect
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cogserver import ROOT, CogServer
from lcm import batching, lora, prompts, sampler, training
from lcm.engine import Engine
from lcm.errors import InputError, LCMError
from lcm.metadata import read_metadata
from lcm.params import Request
from lcm.worker import CancelFlag, Cancelled

CAPTION = "a photo of a cat"
OTHER_PROMPT = "a dog riding the horse"
SIDE = 64  # tiny training images: the engine takes any multiple of 8 from 64 (the API: 512 or 768)


def _png(colour: tuple[int, int, int], seed: int, side: int = SIDE) -> bytes:
    noise = np.random.default_rng(seed).normal(0, 10, (side, side, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


RED = {f"red{i}.png": _png((230, 30, 30), i) for i in range(8)}


def _config(**overrides) -> training.TrainingConfig:
    values = dict(caption=CAPTION, resolution=SIDE, max_train_steps=300, learning_rate=1e-2, lora_rank=4)
    return training.TrainingConfig.build(
        any_resolution=True, **{**values, "lora_target": "all", "seed": 1, **overrides}
    )


@pytest.fixture(scope="module")
def red_set(tmp_path_factory) -> Path:
    return _zip(tmp_path_factory.mktemp("set") / "red.zip", RED)


@pytest.fixture(scope="module")
def trained(red_set, tiny_checkpoint, tmp_path_factory) -> training.TrainingResult:
    return training.train_lora(red_set, tmp_path_factory.mktemp("out"), _config(), tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def tuned(trained, tiny_checkpoint) -> Engine:
    engine = Engine.load(tiny_checkpoint, device="cpu", lora_path=trained.lora)
    yield engine
    engine.close()


def test_train_py_spells_every_input_as_the_engine_declares_it():
    import train

    declared = list(inspect.signature(train.train).parameters.values())
    assert [p.name for p in declared] == [spec.name for spec in training.TRAIN_INPUTS]
    for parameter, spec in zip(declared[1:], training.TRAIN_INPUTS[1:], strict=True):
        field = parameter.default
        assert field.default == spec.default, spec.name
        if spec.kind in (int, float):
            assert (field.ge, field.le) == (spec.low, spec.high), spec.name
        assert list(field.choices or []) == list(spec.choices), spec.name


def _latent_distance(engine: Engine, prompt: str, target: torch.Tensor) -> float:
    """Mean distance of four 4-step samples' per-channel latent means (seeds 10-13) to `target`."""
    request = Request.build(prompt, width=256, height=256, num_images=4, seed=10, disable_safety_checker=True)

    def run() -> torch.Tensor:
        generators = sampler.generators_for(request.seeds)
        noise = sampler.initial_noise(
            generators, (4, 4, SIDE // 8, SIDE // 8), engine.model.device, engine.model.dtype
        )
        embeds = prompts.encode_prompt(
            engine.model.pipe.tokenizer, engine.model.pipe.text_encoder, prompt, engine.model.device
        ).embeds
        return sampler.sample(
            engine.model.pipe.unet, engine.model.scheduler(request), embeds, noise, 8.0, generators
        )

    latents = engine.call(run)
    return float((latents.mean(dim=(2, 3)) - target).norm(dim=1).mean())


def test_the_tuned_model_samples_move_toward_the_training_set(trained, tuned, engine, red_set):
    pipe = engine.model.pipe
    examples = training.read_archive(red_set, CAPTION, SIDE)
    with torch.no_grad():
        pixels = torch.cat([pipe.image_processor.preprocess(e.image) for e in examples])
        target = (pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor).mean(
            dim=(0, 2, 3)
        )
    before, after = _latent_distance(engine, CAPTION, target), _latent_distance(tuned, CAPTION, target)
    print(f"latent distance to the set, {CAPTION!r}: base {before:.3f}, tuned {after:.3f}")
    assert after < 0.8 * before
    losses = trained.losses
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])  # the loss's moving average falls


def test_training_is_reproducible_from_its_seed(red_set, tiny_checkpoint, tmp_path):
    def lora_bytes(seed: int, name: str) -> bytes:
        config = _config(max_train_steps=5, seed=seed)
        return training.train_lora(red_set, tmp_path / name, config, tiny_checkpoint, "cpu").lora.read_bytes()

    first = lora_bytes(3, "a")
    assert lora_bytes(3, "b") == first
    assert lora_bytes(4, "c") != first


def test_the_archive_holds_the_lora_and_how_it_was_trained(trained):
    with tarfile.open(trained.archive) as tf:
        assert tf.getnames() == [lora.WEIGHTS_FILE, lora.INFO_FILE]
        info = __import__("json").loads(tf.extractfile(lora.INFO_FILE).read())
    assert info["lora_sha256"] == trained.sha256 and info["seed"] == 1 and info["captions"] == [CAPTION]
    assert info["skip_interval"] == 20 and info["ema_rate"] == 0.95 and info["huber_c"] == 0.001


def test_lora_scale_zero_is_the_base_model_and_one_is_not(tuned, engine):
    def pixels(e: Engine, **kw) -> np.ndarray:
        return e.generate(
            Request.build(CAPTION, width=256, height=256, num_inference_steps=2, seed=3, **kw)
        ).pixels

    base = pixels(engine, disable_safety_checker=True)
    assert np.array_equal(pixels(tuned, lora_scale=0.0, disable_safety_checker=True), base)
    assert not np.array_equal(pixels(tuned, disable_safety_checker=True), base)
    assert not np.array_equal(
        pixels(tuned, lora_scale=0.5, disable_safety_checker=True), pixels(tuned, disable_safety_checker=True)
    )


def test_files_record_the_lora_and_reproduce_only_with_it(tuned, engine, trained, tmp_path):
    request = Request.build(
        CAPTION,
        width=256,
        height=256,
        num_inference_steps=2,
        seed=3,
        lora_scale=0.5,
        disable_safety_checker=True,
    )
    (file,) = tuned.generate_files(request, tmp_path / "tuned")
    meta = read_metadata(file)
    assert meta["lora_sha256"] == trained.sha256 and meta["lora_scale"] == 0.5
    (plain,) = engine.generate_files(
        Request.build(
            CAPTION, width=256, height=256, num_inference_steps=2, seed=3, disable_safety_checker=True
        ),
        tmp_path / "plain",
    )
    assert "lora_sha256" not in read_metadata(plain) and "lora_scale" not in read_metadata(plain)
    with pytest.raises(InputError, match="lora_scale=0.5 is not allowed: only with a LoRA"):
        engine.model.check(Request.from_metadata(meta))


def test_bad_archives_fail_naming_input_images(tmp_path):
    def fails(members: dict[str, bytes], match: str, caption: str = CAPTION) -> None:
        with pytest.raises(InputError, match=match):
            training.read_archive(_zip(tmp_path / "a.zip", members), caption, SIDE)

    fails({}, "input_images=.*holds no image")
    fails({"notes.pdf": b"%PDF"}, "input_images=.*'notes.pdf' is neither an image")
    fails({"../evil.png": RED["red0.png"]}, "input_images=.*points outside the archive")
    fails({"x.png": b"not a png"}, "input_images=.*'x.png': this file is not an image")
    fails({"x.png": RED["red0.png"]}, "caption=.*a caption for 'x.png'", caption="")
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(InputError, match="input_images=.*neither a zip nor a tar"):
        training.read_archive(tmp_path / "plain.txt", CAPTION, SIDE)


def test_too_many_members_fail_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "MAX_MEMBERS", 3)
    archive = _zip(tmp_path / "a.zip", {f"{i}.png": b"" for i in range(4)})
    with pytest.raises(InputError, match="at most 3 files; this one has 4"):
        training.read_archive(archive, CAPTION, SIDE)


def test_a_tar_gz_with_captions_beside_images(tmp_path):
    path = tmp_path / "set.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {
            "a/one.png": RED["red0.png"],
            "a/one.txt": b"a painting\n",
            "two.jpg": _jpeg(),
        }.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tf.addfile(entry, io.BytesIO(data))
    examples = training.read_archive(path, CAPTION, SIDE)
    assert [(e.name, e.caption, e.image.size) for e in examples] == [
        ("a/one.png", "a painting", (64, 64)),
        ("two.jpg", CAPTION, (64, 64)),
    ]


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (80, 70), (10, 200, 10)).save(out, format="JPEG")
    return out.getvalue()


def test_weights_that_are_not_safetensors_are_refused(tmp_path):
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(LCMError, match="weights=.*is not allowed: .*not safetensors"):
        lora.fetch(str(pickle), tmp_path / "scratch")
    with pytest.raises(LCMError, match="weights=.*no such file"):
        lora.fetch(str(tmp_path / "missing.tar"), tmp_path / "scratch")
    with pytest.raises(LCMError, match="only http and https"):
        lora.fetch("ftp://example.com/lora.tar", tmp_path / "scratch")


def test_through_cog_a_training_returns_weights_that_a_server_then_serves(tiny_checkpoint, tmp_path, server):
    """Train mode returns the archive; a server set up with it (COG_WEIGHTS) generates with it."""
    archive = _zip(tmp_path / "two.zip", {"a.png": RED["red0.png"], "b.png": RED["red1.png"]})
    data = "data:application/zip;base64," + base64.b64encode(archive.read_bytes()).decode()
    trainer = CogServer(tiny_checkpoint, None, train=True)
    try:
        trainer.wait_until({"READY"})
        path = {"input": {"input_images": str(archive), "caption": CAPTION}}
        refused = trainer.request("POST", "/trainings", path)[1]
        assert (
            "input_images=" in refused["error"] and "paths on the server are not accepted" in refused["error"]
        )
        status, body = trainer.request(
            "POST",
            "/trainings",
            {
                "input": {
                    "input_images": data,
                    "caption": CAPTION,
                    "max_train_steps": 1,
                    "learning_rate": 0.01,
                    "lora_target": "all",
                    "seed": 1,
                }
            },
        )
    finally:
        trainer.stop()
    assert status == 200 and body["status"] == "succeeded", body
    assert "step 1/1 loss=" in body["logs"] and "steps/s=" in body["logs"]
    weights = tmp_path / "weights.tar"
    weights.write_bytes(base64.b64decode(body["output"]["weights"].partition(",")[2]))
    served = CogServer(tiny_checkpoint, None, env={"COG_WEIGHTS": str(weights)})
    try:
        served.wait_until({"READY"})
        inputs = {"prompt": CAPTION, "seed": 5, "width": 256, "height": 256, "num_inference_steps": 2}
        tuned = served.predict(**inputs)[1]
        base = server.predict(**inputs)[1]
    finally:
        served.stop()
    assert tuned["status"] == "succeeded" and "lora=" in tuned["logs"], tuned
    assert tuned["output"][0] != base["output"][0]


def test_setup_fails_with_weights_that_are_not_a_lora(tiny_checkpoint, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04K\x01.")
    srv = CogServer(tiny_checkpoint, None, env={"COG_WEIGHTS": str(bad)})
    try:
        health = srv.wait_until({"SETUP_FAILED", "READY"})
    finally:
        srv.stop()
    assert health["status"] == "SETUP_FAILED" and "not safetensors" in health["setup"]["logs"], health


def test_a_lora_file_reproduces_with_lora_and_is_refused_without(
    lora_weights, tiny_checkpoint, tmp_path, capsys
):
    """A file made with the training's archive; `python -m lcm reproduce FILE --lora` in a fresh process."""
    from lcm.cli import main

    tuned = Engine.load(
        tiny_checkpoint, device="cpu", lora_path=lora.fetch(str(lora_weights), tmp_path / "l")
    )
    request = Request.build(CAPTION, width=256, height=256, num_inference_steps=2, seed=4, lora_scale=0.5)
    (file,) = tuned.generate_files(request, tmp_path / "a")
    tuned.close()
    common = [str(file), "--weights", str(tiny_checkpoint), "--device", "cpu"]
    command = [sys.executable, "-m", "lcm", "reproduce", *common, "--out", str(tmp_path / "b")]
    again = subprocess.run([*command, "--lora", str(lora_weights)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "b" / file.name).read_bytes() == file.read_bytes()
    assert main(["reproduce", *common, "--out", str(tmp_path / "c")]) == 2  # refused before loading
    assert "lora=None is not allowed: the LoRA with sha256" in capsys.readouterr().err


def test_a_cancelled_training_stops_at_the_next_step(red_set, tiny_checkpoint, tmp_path):
    flag, lines = CancelFlag(), []

    def report(line: str) -> None:
        lines.append(line)
        if line.startswith("step 3/"):
            flag.set()

    with pytest.raises(Cancelled):
        training.train_lora(
            red_set, tmp_path, _config(max_train_steps=50), tiny_checkpoint, "cpu", flag, report
        )
    assert lines[-1].startswith("step 3/50 loss=") and not list(tmp_path.iterdir())


def test_requests_with_different_lora_scales_are_not_batched_together():
    one, half = (Request.build(CAPTION, width=256, height=256, seed=1, lora_scale=s) for s in (1.0, 0.5))
    assert batching.shape_key(one, 1) != batching.shape_key(half, 1)
    assert batching.shape_key(one, 1) == batching.shape_key(
        Request.build(OTHER_PROMPT, width=256, height=256), 1
    )


def test_weights_from_an_http_url_are_downloaded_and_checked(lora_weights, tmp_path, monkeypatch):
    """The URL Cog hands setup() on Replicate: fetched by lcm.downloads (here from loopback, which
    setup's own weights may name) into the LoRA cache."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(lora_weights.parent))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("LCM_LORA_CACHE", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        path = lora.fetch(f"{url}/{lora_weights.name}", tmp_path / "a")
        with tarfile.open(lora_weights) as tf:
            assert path.read_bytes() == tf.extractfile(lora.WEIGHTS_FILE).read()
        with pytest.raises(LCMError, match="weights=.*the download failed"):
            lora.fetch(f"{url}/missing.tar", tmp_path / "b")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_safetensors_file_that_fits_no_layer_fails_setup_with_a_message(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    from lcm.loading import load_pipeline

    other = tmp_path / "other.safetensors"
    save_file({"text_model.layer.lora_A.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(LCMError, match="fits no layer of this model's UNet"):
        lora.attach(
            load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32),
            lora.fetch(str(other), tmp_path),
        )


def test_an_archive_larger_unpacked_than_allowed_fails_from_its_headers(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "MAX_UNPACKED_BYTES", 1000)
    archive = _zip(tmp_path / "a.zip", {"a.png": b"\0" * 600, "b.png": b"\0" * 600})
    with pytest.raises(InputError, match="at most 0 MB unpacked"):
        training.read_archive(archive, CAPTION, SIDE)


def test_trainings_run_one_at_a_time_and_a_cancelled_one_ends_before_the_next(tmp_path, monkeypatch, caplog):
    """cog.yaml's 8 slots apply to trainings: they queue for one thread, each to its end."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    import predict
    import train

    events, first_stepping = [], threading.Event()

    def fake_training(archive, out_dir, config, cancel, report):  # steps that check their flag
        events.append(f"start {config.seed}")
        try:
            for _ in range(100):
                first_stepping.set()
                time.sleep(0.01)
                cancel.check()
            return SimpleNamespace(archive=Path(out_dir) / f"{config.seed}.tar")
        finally:
            events.append(f"end {config.seed}")

    monkeypatch.setattr(train, "train_lora", fake_training)
    caplog.set_level("INFO", logger="lcm")

    def inputs(seed: int) -> dict:
        images = tmp_path / f"{seed}.zip"
        predict.DOWNLOADS.record(str(images))  # as Cog's download of a URL input records it
        values = {spec.name: spec.default for spec in training.TRAIN_INPUTS}
        return {**values, "input_images": images, "caption": CAPTION, "seed": seed}

    async def three_trainings() -> list:
        first = asyncio.create_task(train.train(**inputs(1)))
        rest = [asyncio.create_task(train.train(**inputs(seed))) for seed in (2, 3)]
        await asyncio.to_thread(first_stepping.wait)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        events.append("cancelled answered")
        return await asyncio.gather(*rest)

    outputs = asyncio.run(three_trainings())
    assert events.index("end 1") < events.index("cancelled answered")
    events.remove("cancelled answered")
    assert events == ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]
    assert [o.weights.name for o in outputs] == ["2.tar", "3.tar"]
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert waits == [
        "waiting for 1 earlier training(s) to finish",
        "waiting for 2 earlier training(s) to finish",
    ]


def test_a_lora_is_served_without_fused_projections_or_compile_even_when_they_are_set(
    trained, tuned, tiny_checkpoint, monkeypatch, caplog
):
    """A fine-tuned version keeps its base's environment (cog.yaml): setup turns them off, and says so."""
    monkeypatch.setenv("LCM_FUSE_QKV", "1")
    monkeypatch.setenv("LCM_COMPILE", "1")
    caplog.set_level("WARNING", logger="lcm")
    engine = Engine.load(tiny_checkpoint, device="cpu", lora_path=trained.lora)
    try:
        assert (
            not engine.model.accel.fuse_qkv and not engine.model.accel.compile and not engine.model.compiled
        )
        assert any(
            "LCM_FUSE_QKV, LCM_COMPILE and LCM_RUNTIME=openvino are off" in r.getMessage()
            for r in caplog.records
        )
        request = Request.build(CAPTION, width=256, height=256, num_inference_steps=2, seed=3)
        assert np.array_equal(engine.generate(request).pixels, tuned.generate(request).pixels)
    finally:
        engine.close()
