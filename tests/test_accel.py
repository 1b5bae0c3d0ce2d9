"""Every speed setting keeps outputs within tolerance of the unoptimised path (CPU, tiny checkpoint)."""

from __future__ import annotations

import resource
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lcm import accel, allocator
from lcm.engine import Engine
from lcm.errors import LCMError
from lcm.params import Request

OFF = {
    "LCM_PLANNED_STEP": "0",
    "LCM_CHANNELS_LAST": "0",
    "LCM_FUSE_QKV": "0",
    "LCM_COMPILE": "0",
    "LCM_CUDA_GRAPHS": "0",
    "LCM_HOLD_MEMORY": "0",
}


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def request(**kw) -> Request:
    return Request.build(
        **{
            "prompt": "a photo of a cat",
            "width": 256,
            "height": 256,
            "seed": 21,
            "num_images": 2,
            "num_inference_steps": 3,
            "disable_safety_checker": True,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def baseline(tiny_checkpoint):
    with pytest.MonkeyPatch.context() as mp:
        for name, value in OFF.items():
            mp.setenv(name, value)
        engine = Engine.load(tiny_checkpoint, device="cpu")
    assert engine.accel.describe() == "accel=none vae_dtype=same"
    return engine


def load_with(tiny_checkpoint, monkeypatch, **env: str) -> Engine:
    for name, value in {**OFF, **env}.items():
        monkeypatch.setenv(name, value)
    return Engine.load(tiny_checkpoint, device="cpu")


@pytest.mark.parametrize("image", [False, True])
def test_planned_step_matches_scheduler_step(baseline, tiny_checkpoint, monkeypatch, image, tmp_path):
    planned = load_with(tiny_checkpoint, monkeypatch, LCM_PLANNED_STEP="1")
    kw = {}
    if image:
        from PIL import Image

        path = tmp_path / "in.png"
        Image.fromarray(np.linspace(0, 255, 256 * 256 * 3).reshape(256, 256, 3).astype(np.uint8)).save(path)
        kw = {"image": str(path), "num_inference_steps": 2}
    ours = planned.generate(request(**kw)).pixels
    ref = baseline.generate(request(**kw)).pixels
    assert max_diff(ours, ref) <= 1


def test_planned_step_equals_scheduler_step_on_latents(baseline):
    """Tighter than pixels: the denoised latents themselves."""
    from lcm import sampler

    pipe = baseline.pipe
    req = request()
    embeds = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)
    runs = []
    for planned in (False, True):
        gens = sampler.generators_for(req.seeds)
        sched = baseline.scheduler(req)
        start = baseline.start_latents(req, sched, gens)
        runs.append(sampler.sample(pipe.unet, sched, embeds, start, 8.0, gens, planned=planned))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting", ["LCM_CHANNELS_LAST", "LCM_FUSE_QKV", "LCM_HOLD_MEMORY"])
def test_layout_and_fusion_settings_keep_outputs(baseline, tiny_checkpoint, monkeypatch, setting):
    engine = load_with(tiny_checkpoint, monkeypatch, **{setting: "1"})
    assert max_diff(engine.generate(request()).pixels, baseline.generate(request()).pixels) <= 1


def test_bfloat16_vae_stays_close(baseline, tiny_checkpoint, monkeypatch):
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_VAE_DTYPE="bfloat16")
    assert engine.pipe.vae.dtype == torch.bfloat16 and engine.pipe.unet.dtype == torch.float32
    small = request(num_images=1, num_inference_steps=2)  # bfloat16 is emulated, so slow, on most CPUs
    ours, ref = engine.generate(small).pixels, baseline.generate(small).pixels
    assert np.abs(ours.astype(float) - ref).mean() < 1.5 and max_diff(ours, ref) <= 12


def test_cpu_defaults(monkeypatch):
    for name in OFF:
        monkeypatch.delenv(name, raising=False)
    cpu = accel.Accel.from_env(torch.device("cpu"), torch.float32, SimpleNamespace(force_upcast=True))
    assert cpu == accel.Accel()  # an Engine made without settings runs what Engine.load runs
    assert cpu.planned_step and cpu.channels_last and not (cpu.compile or cpu.cuda_graphs or cpu.fuse_qkv)
    assert cpu.hold_memory == (allocator.glibc() is not None)
    assert cpu.vae_dtype is None
    assert (
        accel.vae_dtype(torch.device("cpu"), torch.float16, SimpleNamespace(force_upcast=True))
        == torch.float32
    )
    assert accel.vae_dtype(torch.device("cpu"), torch.float16, SimpleNamespace(force_upcast=False)) is None


def fake_bf16(native: bool):
    """torch.cuda.is_bf16_supported for a GPU with bf16 in hardware (native) or only emulated."""
    return lambda including_emulation=True: native or including_emulation


def test_cuda_defaults_are_the_unmeasured_safe_ones(monkeypatch):
    """Nothing unmeasured on CUDA: no compile, no CUDA graphs, no channels_last, no fused QKV."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16(True))
    cuda = accel.Accel.from_env(torch.device("cuda"), torch.float16, SimpleNamespace(force_upcast=True))
    assert cuda.planned_step and cuda.vae_dtype == torch.bfloat16
    assert not (cuda.compile or cuda.cuda_graphs or cuda.channels_last or cuda.fuse_qkv or cuda.hold_memory)


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_bfloat16_vae_only_where_the_gpu_has_bfloat16(monkeypatch, native, expected):
    """torch counts emulated bf16 (a T4, a V100) as supported unless asked not to."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_bf16(native))
    upcast = SimpleNamespace(force_upcast=True)
    assert accel.vae_dtype(torch.device("cuda"), torch.float16, upcast) == expected


def test_compile_sizes_default_parse_and_refuse(monkeypatch):
    assert accel.compile_sizes() == ((768, 768, 1),)
    monkeypatch.setenv("LCM_COMPILE_SIZES", "512x512x4, 768x512,512x512x4")
    assert accel.compile_sizes() == ((512, 512, 4), (768, 512, 1))
    for bad, needle in [
        ("512", "WxH or WxHxN"),
        ("512x500", "multiple of 8"),
        ("512x512x9", "num_images=9"),
        ("256x256,264x256,272x256,280x256,288x256", "at most 4"),
    ]:
        monkeypatch.setenv("LCM_COMPILE_SIZES", bad)
        with pytest.raises(LCMError, match=f"LCM_COMPILE_SIZES='{bad}' is not allowed.*{needle}"):
            accel.compile_sizes()


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"LCM_CUDA_GRAPHS": "1"}, "LCM_CUDA_GRAPHS=1 needs LCM_COMPILE=1 on a CUDA device"),
        (
            {"LCM_CUDA_GRAPHS": "1", "LCM_COMPILE": "1"},
            "LCM_CUDA_GRAPHS=1 needs LCM_COMPILE=1 on a CUDA device",
        ),
        ({"LCM_COMPILE_SIZES": "512x512"}, "LCM_COMPILE_SIZES needs LCM_COMPILE=1"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(monkeypatch, env, needle):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LCMError, match=needle):
        accel.Accel.from_env(torch.device("cpu"), torch.float32, SimpleNamespace(force_upcast=True))


def test_cuda_leaves_the_allocator_alone_and_the_switch_turns_holding_off(monkeypatch):
    config = SimpleNamespace(force_upcast=True)
    assert not accel.Accel.from_env(torch.device("cuda"), torch.float16, config).hold_memory
    monkeypatch.setenv("LCM_HOLD_MEMORY", "0")
    assert not accel.Accel.from_env(torch.device("cpu"), torch.float32, config).hold_memory


def _faults_of_a_fresh_buffer(nbytes: int) -> int:
    """Minor page faults while a float32 buffer is allocated, every page written, and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(nbytes // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(allocator.glibc() is None, reason="mallopt is glibc's: Linux with glibc only")
def test_held_memory_is_reused_without_page_faults():
    nbytes = 64 * 2**20  # above glibc's 32 MiB ceiling for heap buffers
    pages = nbytes // resource.getpagesize()

    def fewest_faults() -> int:
        """After a few buffers settle the heap's layout, the fewest faults one more buffer takes."""
        for _ in range(3):
            _faults_of_a_fresh_buffer(nbytes)
        return min(_faults_of_a_fresh_buffer(nbytes) for _ in range(3))

    try:
        assert allocator.hold_freed_memory(False)
        mapped_afresh = fewest_faults()
        assert allocator.hold_freed_memory(True)
        held = fewest_faults()
    finally:
        allocator.hold_freed_memory(False)
    assert held < pages // 20, (held, pages)
    assert mapped_afresh > 10 * held, (mapped_afresh, held)


ENGINE_THREAD_FAULTS = """
import resource, sys, torch
from lcm import allocator
from lcm.worker import EngineThread

if sys.argv[1] == "held":
    allocator.hold_freed_memory(True)  # as Engine.load does, before its thread starts
thread = EngineThread()

def fewest_faults(nbytes):
    def one():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(nbytes // 4)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(10):  # until the heap's layout settles (posix_memalign's slack, small neighbours)
        one()
    return min(one() for _ in range(3))

print(thread.call(fewest_faults, 100 * 2**20))
"""


@pytest.mark.skipif(allocator.glibc() is None, reason="mallopt is glibc's: Linux with glibc only")
def test_the_engine_thread_reuses_held_memory_like_the_main_thread():
    """A thread's own glibc arena maps buffers over 64 MiB afresh whatever the thresholds say: the
    engine thread, started after hold_freed_memory(True), must share the main arena instead."""
    import subprocess
    import sys

    from cogserver import ROOT

    faults = {}
    for mode in ("held", "default"):
        done = subprocess.run(
            [sys.executable, "-c", ENGINE_THREAD_FAULTS, mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        faults[mode] = int(done.stdout.split()[-1])
    pages = 100 * 2**20 // resource.getpagesize()
    assert faults["held"] < pages // 20 and faults["default"] > pages // 2, (faults, pages)


@pytest.mark.parametrize("name,value", [("LCM_COMPILE", "maybe"), ("LCM_VAE_DTYPE", "int8")])
def test_bad_switch_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(LCMError, match=f"{name}='{value}' is not allowed"):
        accel.Accel.from_env(torch.device("cpu"), torch.float32, SimpleNamespace(force_upcast=True))
