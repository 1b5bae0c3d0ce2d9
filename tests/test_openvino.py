"""LCM_RUNTIME=openvino (tiny checkpoint, CPU): the UNet under OpenVINO for the declared sizes,
torch for every other call and for the VAE decoder, a cache that a second setup loads."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.upsampling import Upsample2D
from test_accel import resident_bytes
from test_compile import SIZE, max_diff, request  # the same requests as torch.compile's seam

from cogserver import CogServer
from lcm import accel, folding, lora
from lcm.engine import Engine
from lcm.errors import LCMError

openvino_runtime = pytest.importorskip("lcm.openvino_runtime")
ov = pytest.importorskip("openvino")

ENV = {"LCM_RUNTIME": "openvino", "LCM_COMPILE_SIZES": f"{SIZE}x{SIZE}"}


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


def load(path: Path, cache: Path, env: dict[str, str] | None = None, **kw) -> tuple[Engine, str]:
    """An engine set up with LCM_RUNTIME=openvino (and `env`), and what setup logged."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lcm")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {**ENV, "LCM_OPENVINO_CACHE": str(cache), **(env or {})}.items():
                mp.setenv(name, value)
            engine = Engine.load(path, device="cpu", **kw)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return engine, "\n".join(records)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, ov_cache):
    engine, logged = load(tiny_checkpoint, ov_cache)
    yield engine, logged
    engine.close()


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> str:
    """Grey blocks of random levels: edges for the ControlNet, and a starting image."""
    from PIL import Image

    levels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    pixels = np.repeat(np.repeat(levels, SIZE // 16, axis=0), SIZE // 16, axis=1)
    path = tmp_path_factory.mktemp("openvino-input") / "blocks.png"
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(path)
    return str(path)


def test_fp32_requests_equal_torch_and_the_log_says_what_ran_eagerly(converted, engine, blocks, caplog):
    """Within 1/255: the same fp32 arithmetic in another order flips a rounding now and then."""
    ov_engine, logged = converted
    assert [m.name for m in ov_engine.model.compiled] == ["unet"]
    assert "openvino vae" not in logged
    assert "openvino unet (f32): converted in" in logged and "runtime=openvino" in logged
    assert "; upsamplers folded;" in logged
    cases = [
        ("the declared size", request(), []),
        ("image to image", request(image=blocks, num_inference_steps=2), []),
        ("another size", request(width=SIZE + 8), ["unet"]),
        ("a prompt of two token windows", request(prompt="a photo of a cat " * 20), ["unet"]),
        ("two images", request(num_images=2), ["unet"]),
        ("FreeU", request(freeu=True), ["unet"]),
        ("the ControlNet's residuals", request(control_image=blocks), ["unet"]),
        ("the declared size again", request(), []),
    ]
    for name, req, eager in cases:
        ours = ov_engine.generate(req)
        assert ours.eager == eager, name
        assert max_diff(ours.pixels, engine.generate(req).pixels) <= 1, name
    out = ov_engine.model.weights_dir.parent / "openvino-out"
    with caplog.at_level(logging.INFO, logger="lcm"):
        ov_engine.generate_files(request(width=SIZE + 8), out)
        ov_engine.generate_files(request(freeu=True), out)
        ov_engine.generate_files(request(control_image=blocks), out)
    assert "graphs=eager(unet: not a size compiled in setup, see LCM_COMPILE_SIZES)" in caplog.text
    assert "graphs=eager(unet: FreeU runs it uncompiled)" in caplog.text
    assert "graphs=eager(unet: its passes with the ControlNet's residuals run eagerly)" in caplog.text


def op_types(engine: Engine) -> set[str]:
    """The layer types of the UNet's compiled OpenVINO model(s), as the CPU plugin runs them."""
    return {
        op.get_rt_info()["layerType"].astype(str)
        for request in engine.model.compiled[0].requests.values()
        for op in request.get_compiled_model().get_runtime_model().get_ordered_ops()
    }


def test_the_unet_is_converted_folded_where_the_sizes_allow_and_torchs_stays_diffusers(converted, engine):
    """Folded, the converted UNet has no upsampling node left (the tiny UNet has one upsampler); the
    torch UNet, which runs the requests OpenVINO does not (a LoRA's), keeps diffusers' own under the
    names a LoRA targets."""
    ov_engine, _ = converted
    unet = ov_engine.model.pipe.unet
    assert unet.num_upsamplers == 1 and "Interpolate" not in op_types(ov_engine)
    assert not any(isinstance(m, folding.FoldedUpsample) for m in unet.modules())
    assert [n for n, m in unet.named_modules() if isinstance(m, Upsample2D)] == ["up_blocks.0.upsamplers.0"]


@pytest.mark.parametrize(
    "env, why",
    [
        ({"LCM_FOLD_UPSAMPLE": "0"}, "upsamplers not folded (LCM_FOLD_UPSAMPLE=0)"),
        (
            {"LCM_COMPILE_SIZES": f"{SIZE + 8}x{SIZE}"},
            "upsamplers not folded: latents 33x32 are not multiples of 2",
        ),
    ],
)
def test_unfolded_where_switched_off_or_a_size_does_not_double_and_equal_to_torch(
    tiny_checkpoint, engine, tmp_path, env, why
):
    unfolded, logged = load(tiny_checkpoint, tmp_path, env)  # not ov_cache: a model of its own
    try:
        assert why in logged and "Interpolate" in op_types(unfolded)
        req = request(width=SIZE + 8) if "LCM_COMPILE_SIZES" in env else request()
        ours = unfolded.generate(req)
        assert ours.eager == [] and max_diff(ours.pixels, engine.generate(req).pixels) <= 1
    finally:
        unfolded.close()


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_bf16_is_about_as_far_from_fp32_as_torch_bf16(tiny_checkpoint, engine, ov_cache):
    """bf16 keeps 8 bits of mantissa, and OpenVINO's bf16 runs more of the UNet in it than torch's
    autocast-free bf16 does, so it lands further from fp32: measured over seeds 5, 9 and 11, a mean of
    1.0 levels against torch bf16's 0.65, a max of 8 to 12 levels from torch bf16 (torch bf16 from
    fp32: 5 to 6). Bounds: twice torch bf16's mean error, and 16 levels."""
    torch_bf16 = Engine.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    ov_bf16, logged = load(tiny_checkpoint, ov_cache, dtype="bfloat16")
    try:
        assert "openvino unet (bf16)" in logged
        for req in (request(), request(seed=9, num_inference_steps=4), request(freeu=True)):
            ours, theirs, fp32 = ov_bf16.generate(req), torch_bf16.generate(req), engine.generate(req).pixels
            assert ours.eager == (["unet"] if req.freeu else [])
            assert mean_diff(ours.pixels, fp32) <= 2 * mean_diff(theirs.pixels, fp32)
            assert max_diff(ours.pixels, theirs.pixels) <= 16
    finally:
        torch_bf16.close()
        ov_bf16.close()


def test_auto_times_fused_and_unfused_attention_and_records_the_faster(converted, ov_cache):
    """LCM_OPENVINO_SNIPPETS unset ("auto"): each compiled shape is timed with attention fused into
    OpenVINO's Snippets kernels and unfused, and the faster kept and recorded per CPU and shape."""
    ov_engine, logged = converted
    (shape,) = ov_engine.model.compiled[0].requests
    assert re.search(
        rf"{'x'.join(map(str, shape[0]))}: snippets (on|off), timed: on \d+ ms, off \d+ ms", logged
    )
    (folder,) = [p for p in ov_cache.iterdir() if p.name.startswith("unet-f32-")]
    recorded = json.loads((folder / openvino_runtime.CHOICES_FILE).read_text())
    choice = recorded[f"{ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')} | {shape}"]
    assert set(choice["ms"]) == {"on", "off"}
    assert choice["snippets"] == min(choice["ms"], key=choice["ms"].get)
    assert f"snippets {choice['snippets']}, timed" in logged


def test_unfused_attention_equals_torch(tiny_checkpoint, engine, ov_cache, monkeypatch):
    """LCM_OPENVINO_SNIPPETS=off: attention as separate MatMul and Softmax nodes, within 1/255 in fp32."""
    monkeypatch.setenv("LCM_OPENVINO_SNIPPETS", "off")
    unfused, logged = load(tiny_checkpoint, ov_cache)
    try:
        assert "snippets off (LCM_OPENVINO_SNIPPETS)" in logged and "snippets=off" in logged
        for req in (request(), request(seed=9, num_inference_steps=4)):
            ours = unfused.generate(req)
            assert ours.eager == [] and max_diff(ours.pixels, engine.generate(req).pixels) <= 1
    finally:
        unfused.close()


def test_a_second_setup_loads_the_converted_models_from_the_cache(
    converted, tiny_checkpoint, ov_cache, monkeypatch
):
    converted_parts = {p.name.split("-", 1)[0] for p in ov_cache.iterdir()}
    assert converted_parts == {"unet"} and any(p.name.startswith("unet-f32-") for p in ov_cache.iterdir())
    monkeypatch.setattr(openvino_runtime, "_convert", lambda *a: pytest.fail("converted again"))
    # The saved model has the weights: the torch UNet's are neither copied nor folded for it.
    monkeypatch.setattr(openvino_runtime, "_contiguous", lambda m: pytest.fail("weights copied"))
    monkeypatch.setattr(folding, "folded", lambda m: pytest.fail("weights folded"))
    again, logged = load(tiny_checkpoint, ov_cache)
    try:
        assert logged.count("loaded from cache") == 1, logged
        assert "(timed in an earlier setup)" in logged, logged
        # Compiled, the plugin holds its own copy: setup drops the saved weights' mapped pages, and
        # what a request reads of them (the constants the plugin uses in place) is read back.
        assert "mapping dropped from memory" in logged, logged
        loaded = re.search(r"loaded from cache (\S+?),", logged)[1]
        assert resident_bytes(Path(loaded) / openvino_runtime.WEIGHTS_FILE) == 0
        assert max_diff(again.generate(request()).pixels, converted[0].generate(request()).pixels) == 0
    finally:
        again.close()


def test_the_cache_key_follows_the_weights_files(tiny_checkpoint, tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(tiny_checkpoint / "unet", weights / "unet")
    file = weights / openvino_runtime.UNET.files[1]

    def key() -> str:
        return openvino_runtime.cache_key(weights, openvino_runtime.UNET, torch.float32, 16, True)

    first = key()
    assert first.startswith("unet-f32-") and key() == first
    unfolded = openvino_runtime.cache_key(weights, openvino_runtime.UNET, torch.float32, 9, False)
    assert unfolded.startswith("unet-f32-") and unfolded != first
    file.write_bytes(file.read_bytes())  # the same bytes, rewritten: without a manifest, a new file
    rewritten = key()
    assert rewritten != first
    record = {"size": file.stat().st_size, "sha256": "a" * 64}
    manifest = weights / "manifest.json"
    manifest.write_text(json.dumps({"files": {openvino_runtime.UNET.files[1]: record}}))
    by_hash = key()
    file.touch()  # a manifest's sha256 identifies the file, whatever its time
    assert key() == by_hash != rewritten
    manifest.write_text(
        json.dumps({"files": {openvino_runtime.UNET.files[1]: {**record, "sha256": "b" * 64}}})
    )
    assert key() != by_hash


def test_trained_weights_turn_openvino_off_with_a_warning(tiny_checkpoint, lora_weights, ov_cache, tmp_path):
    tuned, logged = load(tiny_checkpoint, ov_cache, lora_path=lora.fetch(str(lora_weights), tmp_path / "l"))
    try:
        assert "LCM_RUNTIME=openvino are off for this model" in logged and "bake it in" in logged
        assert tuned.model.accel.runtime == "torch" and tuned.model.compiled == []
        assert "openvino unet" not in logged
    finally:
        tuned.close()


@pytest.mark.parametrize(
    "env,device,needle",
    [
        ({"LCM_RUNTIME": "tensorrt"}, "cpu", "LCM_RUNTIME='tensorrt' is not allowed: use torch or openvino"),
        ({"LCM_RUNTIME": "openvino"}, "cuda", "LCM_RUNTIME='openvino' is not allowed on cuda: use torch"),
        (
            {"LCM_RUNTIME": "openvino", "LCM_COMPILE": "1"},
            "cpu",
            "LCM_RUNTIME='openvino' is not allowed with LCM_COMPILE=1: one runtime at a time",
        ),
        (
            {"LCM_COMPILE_SIZES": "512x512"},
            "cpu",
            "LCM_COMPILE_SIZES needs LCM_COMPILE=1 or LCM_RUNTIME=openvino",
        ),
        (
            {"LCM_RUNTIME": "openvino", "LCM_OPENVINO_SNIPPETS": "maybe"},
            "cpu",
            "LCM_OPENVINO_SNIPPETS='maybe' is not allowed: use auto, on, off",
        ),
        (
            {"LCM_RUNTIME": "torch", "LCM_OPENVINO_SNIPPETS": "off"},
            "cpu",
            "LCM_OPENVINO_SNIPPETS needs LCM_RUNTIME=openvino",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(monkeypatch, env, device, needle):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LCMError, match=needle):
        accel.Accel.from_env(torch.device(device), torch.float32, SimpleNamespace(force_upcast=False))


def test_the_default_is_openvino_on_a_cpu_running_bf16_where_installed(monkeypatch, caplog):
    """Unset, LCM_RUNTIME is openvino only for bf16 on a CPU without LCM_COMPILE, and only where the
    package is installed (else torch, logged); asked for without the package, setup is refused."""
    config = SimpleNamespace(force_upcast=False)
    cpu = torch.device("cpu")
    monkeypatch.delenv("LCM_RUNTIME", raising=False)
    settings = accel.Accel.from_env(cpu, torch.bfloat16, config)
    assert settings.runtime == "openvino"
    assert "runtime=openvino compile_sizes=768x768x1" in settings.describe()
    assert accel.Accel.from_env(cpu, torch.float32, config).runtime == "torch"
    monkeypatch.setenv("LCM_COMPILE", "1")
    assert accel.Accel.from_env(cpu, torch.bfloat16, config).runtime == "torch"
    monkeypatch.delenv("LCM_COMPILE")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with caplog.at_level(logging.INFO, logger="lcm"):
        assert accel.Accel.from_env(cpu, torch.bfloat16, config).runtime == "torch"
    assert "openvino is not installed" in caplog.text
    monkeypatch.setenv("LCM_RUNTIME", "openvino")
    with pytest.raises(
        LCMError, match="LCM_RUNTIME='openvino' is not allowed: the openvino package is not installed"
    ):
        accel.Accel.from_env(cpu, torch.float32, config)


def test_a_prediction_through_cogs_server(converted, tiny_checkpoint, openapi_schema, ov_cache):
    server = CogServer(tiny_checkpoint, openapi_schema, env={**ENV, "LCM_OPENVINO_CACHE": str(ov_cache)})
    try:
        server.wait_until({"READY"})
        status, body = server.predict(
            prompt="a red fox", seed=7, width=SIZE, height=SIZE, num_inference_steps=2
        )
    finally:
        server.stop()
    assert status == 200 and body["status"] == "succeeded", body
    assert "graphs=compiled" in body["logs"], body["logs"]
