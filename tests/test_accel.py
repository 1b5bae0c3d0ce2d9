"""Every speed setting takes effect and keeps outputs close to the unoptimised path (CPU, tiny checkpoint)."""

from __future__ import annotations

import json
import mmap
import os
import resource
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from PIL import Image

from lcm import accel, allocator, folding, sampler, starts
from lcm.engine import Engine
from lcm.errors import LCMError
from lcm.loading import default_dtype, pick_device
from lcm.params import Request
from lcm.synthetic import VENDORED_DIR

OFF = {
    "LCM_PLANNED_STEP": "0",
    "LCM_CHANNELS_LAST": "0",
    "LCM_FUSE_QKV": "0",
    "LCM_FOLD_UPSAMPLE": "0",
    "LCM_COMPILE": "0",
    "LCM_CUDA_GRAPHS": "0",
    "LCM_HOLD_MEMORY": "0",
    "LCM_DECODE_CHUNK": "1",
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
    assert engine.model.accel == accel.Accel(
        planned_step=False, channels_last=False, fold_upsample=False, hold_memory=False
    )
    return engine


def load_with(tiny_checkpoint, monkeypatch, **env: str) -> Engine:
    for name, value in {**OFF, **env}.items():
        monkeypatch.setenv(name, value)
    return Engine.load(tiny_checkpoint, device="cpu")


@pytest.fixture
def gradient(tmp_path) -> str:
    """An input image for image to image."""
    path = tmp_path / "in.png"
    Image.fromarray(np.linspace(0, 255, 256 * 256 * 3).reshape(256, 256, 3).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture
def steps_taken(monkeypatch) -> Counter:
    """Counts the sampler's step paths: host plans made (sampler.plan_steps), scheduler.step calls."""
    taken: Counter = Counter()
    plan, step = sampler.plan_steps, LCMScheduler.step

    def planning(*args, **kwargs):
        taken["planned"] += 1
        return plan(*args, **kwargs)

    def stepping(self, *args, **kwargs):
        taken["scheduler.step"] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(sampler, "plan_steps", planning)
    monkeypatch.setattr(LCMScheduler, "step", stepping)
    return taken


@pytest.mark.parametrize("image", [False, True])
def test_planned_step_matches_scheduler_step(
    baseline, tiny_checkpoint, monkeypatch, image, gradient, steps_taken
):
    planned = load_with(tiny_checkpoint, monkeypatch, LCM_PLANNED_STEP="1")
    kw = {"image": gradient, "num_inference_steps": 2} if image else {}
    steps = len(baseline.model.scheduler(request(**kw)).timesteps)
    ours = planned.generate(request(**kw)).pixels
    assert steps_taken == {"planned": 1}  # one plan per request, and no scheduler.step
    steps_taken.clear()
    ref = baseline.generate(request(**kw)).pixels
    assert steps_taken == {"scheduler.step": steps}
    assert max_diff(ours, ref) <= 1


def test_planned_step_equals_scheduler_step_on_latents(baseline):
    """Tighter than pixels: the denoised latents themselves."""
    pipe = baseline.model.pipe
    req = request()
    embeds = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)
    runs = []
    for planned in (False, True):
        gens = sampler.generators_for(req.seeds)
        sched = baseline.model.scheduler(req)
        start = starts.start_latents(baseline.model, req, sched, gens)
        runs.append(sampler.sample(pipe.unet, sched, embeds, start, 8.0, gens, planned=planned))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def channels_last_weights(engine: Engine) -> list[bool]:
    """Per spatial conv weight of the UNet, VAE and TAESD: is it in channels_last memory format?

    (A 1x1 kernel's weight is both contiguous and channels_last, so those say nothing.)
    """
    modules = (engine.model.pipe.unet, engine.model.pipe.vae, engine.model.taesd)
    convs = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    formats = [
        c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1)
    ]
    assert formats
    return formats


def test_channels_last_keeps_outputs_and_is_set(baseline, tiny_checkpoint, monkeypatch):
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_CHANNELS_LAST="1")
    assert all(channels_last_weights(engine)) and not any(channels_last_weights(baseline))
    assert max_diff(engine.generate(request()).pixels, baseline.generate(request()).pixels) <= 1


def test_folded_upsamplers_keep_outputs_and_run_folded(baseline, tiny_checkpoint, monkeypatch, gradient):
    """Each of the decoder's upsamplers runs folded, and only the decoder's: the UNet's keep
    diffusers' (a request's LoRA may patch their convolutions); in fp32 within 1/255 of the baseline."""
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_FOLD_UPSAMPLE="1")
    pipe = engine.model.pipe
    ran: Counter = Counter()
    folded = [m for m in pipe.vae.decoder.modules() if isinstance(m, folding.FoldedUpsample)]
    handles = [m.register_forward_hook(lambda *_: ran.update(["folded"])) for m in folded]
    try:
        for req in (request(), request(image=gradient, num_inference_steps=2)):
            assert max_diff(engine.generate(req).pixels, baseline.generate(req).pixels) <= 1
    finally:
        for handle in handles:
            handle.remove()
    upsamplers = sum(bool(block.upsamplers) for block in pipe.vae.decoder.up_blocks)
    assert len(folded) == upsamplers > 0
    assert ran["folded"] == 2 * 2 * upsamplers  # two requests of two images, decoded one at a time
    assert not any(isinstance(m, folding.FoldedUpsample) for m in pipe.unet.modules())
    assert "fold_upsample" in engine.model.accel.describe()


PROJECTIONS = ("to_q", "to_k", "to_v", "to_qkv", "to_kv")


def generate_counting_projections(engine: Engine, req: Request) -> tuple[np.ndarray, Counter]:
    """The request's pixels, and how often each attention projection of the UNet and VAE ran."""
    calls: Counter = Counter()
    handles = [
        projection.register_forward_hook(lambda *_, name=name: calls.update([name]))
        for model in (engine.model.pipe.unet, engine.model.pipe.vae)
        for attention in model.modules()
        if isinstance(attention, Attention)
        for name in PROJECTIONS
        if (projection := getattr(attention, name, None)) is not None
    ]
    try:
        return engine.generate(req).pixels, calls
    finally:
        for handle in handles:
            handle.remove()


def test_fused_qkv_keeps_outputs_and_runs_fused(baseline, tiny_checkpoint, monkeypatch):
    """Fused, self-attention runs one to_qkv and cross-attention one to_kv: to_k and to_v never run."""
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_FUSE_QKV="1")
    attentions = [
        m
        for model in (engine.model.pipe.unet, engine.model.pipe.vae)
        for m in model.modules()
        if isinstance(m, Attention)
    ]
    assert attentions and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in attentions)
    ours, fused = generate_counting_projections(engine, request())
    ref, unfused = generate_counting_projections(baseline, request())
    assert fused["to_qkv"] and fused["to_kv"] and fused["to_q"] == fused["to_kv"]  # to_q: cross-attention's
    assert not (fused["to_k"] or fused["to_v"])
    assert unfused["to_q"] == unfused["to_k"] == unfused["to_v"] > 0 and not (
        unfused["to_qkv"] or unfused["to_kv"]
    )
    assert max_diff(ours, ref) <= 1


@pytest.mark.skipif(allocator.glibc() is None, reason="mallopt is glibc's: Linux with glibc only")
def test_held_memory_keeps_outputs_and_is_held(baseline, tiny_checkpoint, monkeypatch):
    held = []
    hold = allocator.hold_freed_memory

    def holding(on: bool) -> bool:
        held.append((on, hold(on)))
        return held[-1][1]

    monkeypatch.setattr(allocator, "hold_freed_memory", holding)
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_HOLD_MEMORY="1")
    # before the engine thread starts (so it shares the main arena), and again as the settings are applied
    assert held == [(True, True), (True, True)]
    assert max_diff(engine.generate(request()).pixels, baseline.generate(request()).pixels) <= 1


def test_decode_chunk_decodes_several_images_per_pass(baseline, tiny_checkpoint, monkeypatch):
    """LCM_DECODE_CHUNK=2 decodes 3 images in passes of 2 and 1, as one-at-a-time decoding would."""
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_DECODE_CHUNK="2")
    req = request(num_images=3, num_inference_steps=1)
    passes: dict[str, list[int]] = {}
    pixels = {}
    for name, eng in (("chunked", engine), ("alone", baseline)):
        sizes = passes.setdefault(name, [])
        handle = eng.model.pipe.vae.decoder.register_forward_pre_hook(
            lambda _, args, s=sizes: s.append(len(args[0]))
        )
        try:
            pixels[name] = eng.generate(req).pixels
        finally:
            handle.remove()
    assert passes == {"chunked": [2, 1], "alone": [1, 1, 1]}
    assert max_diff(pixels["chunked"], pixels["alone"]) <= 1


def test_bfloat16_vae_stays_close(baseline, tiny_checkpoint, monkeypatch):
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_VAE_DTYPE="bfloat16")
    assert engine.model.pipe.vae.dtype == torch.bfloat16 and engine.model.pipe.unet.dtype == torch.float32
    small = request(num_images=1, num_inference_steps=2)  # bfloat16 is emulated, so slow, on most CPUs
    ours, ref = engine.generate(small).pixels, baseline.generate(small).pixels
    assert np.abs(ours.astype(float) - ref).mean() < 1.5 and max_diff(ours, ref) <= 12


def test_bfloat16_vae_encodes_the_input_image_for_the_float32_unet(
    baseline, tiny_checkpoint, monkeypatch, gradient
):
    """Image to image across dtypes: the image goes in as bfloat16, its latents come out as float32.

    At prompt_strength 0.2 the tiny checkpoint's result rests on the encoded image (at the default
    0.8 it hardly does: leaving the image out moves it only 11/255). Measured there (2 steps, seeds
    21-22): bfloat16 against float32 at most 6/255, 0.50-0.53 on average; latents 10% too small
    move it 18-22/255 (1.4-1.7 on average), another input image 43-69/255, no image 126-187/255.
    """
    engine = load_with(tiny_checkpoint, monkeypatch, LCM_VAE_DTYPE="bfloat16")
    small = request(num_images=1, num_inference_steps=2, image=gradient, prompt_strength=0.2)
    ours, ref = engine.generate(small).pixels, baseline.generate(small).pixels
    assert np.abs(ours.astype(float) - ref).mean() < 1.0 and max_diff(ours, ref) <= 12


def test_cpu_defaults(monkeypatch):
    for name in OFF:
        monkeypatch.delenv(name, raising=False)
    cpu = accel.Accel.from_env(torch.device("cpu"), torch.float32, SimpleNamespace(force_upcast=True))
    assert cpu == accel.Accel()  # an Engine made without settings runs what Engine.load runs
    assert cpu.planned_step and cpu.channels_last and cpu.fold_upsample
    assert not (cpu.compile or cpu.cuda_graphs or cpu.fuse_qkv)
    assert cpu.hold_memory == (allocator.glibc() is not None)
    assert cpu.vae_dtype is None
    assert (
        accel.vae_dtype(torch.device("cpu"), torch.float16, SimpleNamespace(force_upcast=True))
        == torch.float32
    )
    assert accel.vae_dtype(torch.device("cpu"), torch.float16, SimpleNamespace(force_upcast=False)) is None


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """Make this process see one CUDA GPU of that compute capability: torch's device and capability
    queries answer as on that machine. Emulated bf16 works on any GPU, as torch would find by trying."""
    major, minor = capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=minor)
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize(
    "capability,vae",
    [
        pytest.param((8, 0), torch.bfloat16, id="A100"),
        pytest.param((7, 5), torch.float32, id="T4"),
        pytest.param((7, 0), torch.float32, id="V100"),
    ],
)
def test_cuda_defaults_are_the_unmeasured_safe_ones(monkeypatch, capability, vae):
    """What Engine.load picks on a GPU, built here on the CPU: fp16, the host-planned step, nothing
    unmeasured (no compile, CUDA graphs, channels_last, fused QKV or held memory), 8 images per VAE
    pass, and the checkpoint's force_upcast VAE in bfloat16 only where the GPU has it in hardware
    (torch counts a T4's or a V100's emulated bfloat16 as supported unless asked not to)."""
    for name in [name for name in os.environ if name.startswith("LCM_")]:
        monkeypatch.delenv(name)
    fake_gpu(monkeypatch, capability)
    device = pick_device()
    dtype = default_dtype(device)
    vae_config = SimpleNamespace(**json.loads((VENDORED_DIR / "vae" / "config.json").read_text()))
    settings = accel.Accel.from_env(device, dtype, vae_config)
    assert (device, dtype) == (torch.device("cuda"), torch.float16)
    assert settings == accel.Accel(
        planned_step=True,
        channels_last=False,
        fuse_qkv=False,
        fold_upsample=False,
        compile=False,
        cuda_graphs=False,
        hold_memory=False,
        vae_dtype=vae,
        decode_chunk=8,
        batch_pixels=accel.CUDA_BATCH_PIXELS,
    )


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


def _fewest_faults(nbytes: int) -> int:
    """After a few buffers settle the heap's layout, the fewest faults one more buffer takes.

    Settling takes up to 7 buffers after earlier tests left small allocations in the heap.
    """
    for _ in range(10):
        _faults_of_a_fresh_buffer(nbytes)
    return min(_faults_of_a_fresh_buffer(nbytes) for _ in range(3))


HELD_BUFFER = 64 * 2**20  # above glibc's 32 MiB ceiling for heap buffers


@pytest.mark.skipif(allocator.glibc() is None, reason="mallopt is glibc's: Linux with glibc only")
def test_held_memory_is_reused_without_page_faults():
    pages = HELD_BUFFER // resource.getpagesize()
    try:
        assert allocator.hold_freed_memory(False)
        mapped_afresh = _fewest_faults(HELD_BUFFER)
        assert allocator.hold_freed_memory(True)
        held = _fewest_faults(HELD_BUFFER)
    finally:
        allocator.hold_freed_memory(False)
    assert held < pages // 20, (held, pages)
    assert mapped_afresh > 10 * held, (mapped_afresh, held)


@pytest.mark.skipif(allocator.glibc() is None, reason="malloc_trim is glibc's: Linux with glibc only")
def test_give_back_returns_held_memory_to_the_kernel():
    """What setup frees is given back even while memory is held: the next buffer faults in afresh."""
    pages = HELD_BUFFER // resource.getpagesize()
    try:
        assert allocator.hold_freed_memory(True)
        held = _fewest_faults(HELD_BUFFER)
        assert allocator.give_back()
        given_back = _faults_of_a_fresh_buffer(HELD_BUFFER)
        held_again = _fewest_faults(HELD_BUFFER)
    finally:
        allocator.hold_freed_memory(False)
    assert held < pages // 20 and held_again < pages // 20, (held, held_again, pages)
    assert given_back > pages // 2, (given_back, pages)


def resident_bytes(path: Path) -> int:
    """This process's resident bytes of every mapping of `path` (their Rss in /proc/self/smaps)."""
    target, inside, total = str(path.resolve()), False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(
    allocator.glibc() is None or not Path("/proc/self/smaps").exists(), reason="Linux with glibc only"
)
def test_drop_mapped_drops_a_read_only_mapping_from_memory_and_its_pages_read_back_the_same(tmp_path):
    size = 8 * 2**20
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    read_only, writable = tmp_path / "weights.bin", tmp_path / "scratch.bin"
    read_only.write_bytes(data)
    writable.write_bytes(data)
    with read_only.open("rb") as a, writable.open("r+b") as b:
        mapped = mmap.mmap(a.fileno(), 0, access=mmap.ACCESS_READ)
        written = mmap.mmap(b.fileno(), 0, access=mmap.ACCESS_WRITE)
    try:
        written[:4] = b"edit"
        assert mapped[:] == data and written[4:] == data[4:]  # every page resident
        assert resident_bytes(read_only) >= size - 2**20
        assert allocator.drop_mapped(read_only) == size
        assert resident_bytes(read_only) < 2**20
        assert allocator.drop_mapped(writable) == 0  # a writable mapping's pages may be its own
        assert resident_bytes(writable) >= size - 2**20
        assert mapped[:] == data and written[:] == b"edit" + data[4:]
        assert allocator.drop_mapped(tmp_path / "not-mapped.bin") == 0
    finally:
        mapped.close()
        written.close()


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
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        faults[mode] = int(done.stdout.split()[-1])
    pages = 100 * 2**20 // resource.getpagesize()
    assert faults["held"] < pages // 20 and faults["default"] > pages // 2, (faults, pages)


@pytest.mark.parametrize(
    "name,value,allowed",
    [
        ("LCM_COMPILE", "maybe", "use 1 or 0"),
        ("LCM_VAE_DTYPE", "int8", "use float16, bfloat16, float32"),
        ("LCM_DECODE_CHUNK", "0", "use an integer from 1 to 8"),
        ("LCM_DECODE_CHUNK", "9", "use an integer from 1 to 8"),
        ("LCM_DECODE_CHUNK", "two", "use an integer from 1 to 8"),
        ("LCM_DECODE_CHUNK", "2.5", "use an integer from 1 to 8"),
    ],
)
def test_bad_switch_values_are_refused(monkeypatch, name, value, allowed):
    monkeypatch.setenv(name, value)
    with pytest.raises(LCMError, match=f"^{name}='{value}' is not allowed: {allowed}"):
        accel.Accel.from_env(torch.device("cpu"), torch.float32, SimpleNamespace(force_upcast=True))
