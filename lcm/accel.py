"""Speed settings, read from the environment at load time, each with a switch.

    LCM_PLANNED_STEP=0      diffusers' scheduler.step instead of the host-planned step (sampler.plan_steps)
    LCM_CHANNELS_LAST=0|1 the UNet and VAE in channels_last memory format (default: on for CPU)
    LCM_FUSE_QKV=1        one fused query/key/value projection in attention (default: off)
    LCM_FOLD_UPSAMPLE=0|1 the VAE decoder's upsamplers, and those of OpenVINO's converted UNet, as
                          2x2 convolutions of their input (default: on for CPU; lcm/folding.py)
    LCM_VAE_CLASSIC_ATTENTION=0|1  the VAE's attention through diffusers' classic processor up to
                          768 px (default: on for a bf16 VAE on CPU without LCM_FUSE_QKV; lcm/attention.py)
    LCM_COMPILE=1         torch.compile the UNet and VAE decoder in setup (default: off; lcm/compiling.py)
    LCM_COMPILE_SIZES=... with LCM_COMPILE or LCM_RUNTIME=openvino, the request sizes compiled in
                          setup: WxH or WxHxN (N images), comma-separated, at most MAX_COMPILE_SIZES
                          (default 768x768)
    LCM_RUNTIME=...       torch, or openvino for the UNet on a CPU (default: openvino
                          on a CPU running bf16 where it is installed, else torch; lcm/openvino_runtime.py)
    LCM_OPENVINO_SNIPPETS=auto|on|off  with LCM_RUNTIME=openvino, attention fused into OpenVINO's
                          Snippets kernels or not; auto (default) times both per compiled shape
    LCM_CUDA_GRAPHS=1     with LCM_COMPILE on CUDA, record CUDA graphs (mode "reduce-overhead")
    LCM_VAE_DTYPE=...     float16, bfloat16 or float32 for the VAE (default: see vae_dtype)
    LCM_DECODE_CHUNK=N    images per VAE decoder pass, 1 to MAX_IMAGES (default: 8 on CUDA, 1 on CPU)
    LCM_BATCH_PIXELS=N    images x width x height that queued requests may share UNet passes up to
                          (0: one request at a time; default: see batch_pixels)
    LCM_HOLD_MEMORY=0     let glibc unmap freed activations and give its heap back (see hold_freed_memory)

A setting is on by default on a device only where a benchmark on that device (bench/RESULTS.md)
shows it wins: channels_last, folded upsamplers, holding memory and (running bf16) OpenVINO on CPU;
nothing yet on CUDA beyond the host-planned step, which is device-agnostic. The tests check every
setting against the unoptimised path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lcm import allocator, attention, folding
from lcm.errors import InputError, LCMError
from lcm.loading import DTYPES
from lcm.params import DEFAULT_SIZE, MAX_IMAGES, Request

log = logging.getLogger("lcm")

COMPILE_SIZES_ENV = "LCM_COMPILE_SIZES"
DECODE_CHUNK_ENV = "LCM_DECODE_CHUNK"
BATCH_PIXELS_ENV = "LCM_BATCH_PIXELS"
# A guess until a GPU benchmark says otherwise (bench/RESULTS.md): 8 images at 512x512 per batch.
CUDA_BATCH_PIXELS = 8 * 512 * 512
MAX_COMPILE_SIZES = 4  # each costs a compilation in setup (minutes on a CPU, tens of seconds on a GPU)
RUNTIME_ENV = "LCM_RUNTIME"
RUNTIMES = ("torch", "openvino")
CPU_RUNTIME = "openvino"  # LCM_RUNTIME's default on a CPU running bf16 (see runtime; CUDA: torch only)
SNIPPETS_ENV = "LCM_OPENVINO_SNIPPETS"
SNIPPETS_CHOICES = ("auto", "on", "off")  # auto, and lcm.openvino_runtime.SNIPPETS' modes


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise LCMError(f"{name}={value!r} is not allowed: use 1 or 0")


def decode_chunk(device: torch.device) -> int:
    """LCM_DECODE_CHUNK, else 8 on CUDA and 1 on CPU.

    The decoder's activations at 1024 px are about 3 GB per image in fp32: on a CPU, one image
    per pass keeps a request's peak memory that of one image. Neither default is measured for speed.
    """
    text = os.environ.get(DECODE_CHUNK_ENV)
    if not text:
        return 8 if device.type == "cuda" else 1
    if not text.strip().isdecimal() or not 1 <= int(text) <= MAX_IMAGES:
        raise LCMError(
            f"{DECODE_CHUNK_ENV}={text!r} is not allowed: use an integer from 1 to {MAX_IMAGES}, "
            "the images decoded per VAE pass"
        )
    return int(text)


def batch_pixels(device: torch.device) -> int:
    """LCM_BATCH_PIXELS, else CUDA_BATCH_PIXELS on CUDA (a guess) and 0 on CPU (measured:
    docs/configuration.md, "Concurrency and batching").

    The budget bounds what queued requests add to the oldest one's batch; a request alone is
    served whatever its size.
    """
    text = os.environ.get(BATCH_PIXELS_ENV)
    if not text:
        return CUDA_BATCH_PIXELS if device.type == "cuda" else 0
    if not text.strip().isdecimal():
        raise LCMError(
            f"{BATCH_PIXELS_ENV}={text!r} is not allowed: use a whole number of pixels (images x width "
            f"x height) that requests served together may add up to, or 0 for one request at a time"
        )
    return int(text)


def runtime(device: torch.device, dtype: torch.dtype, compile_on: bool) -> str:
    """LCM_RUNTIME, else what runs the UNet by default (lcm.openvino_runtime).

    On a CPU running bf16, OpenVINO (CPU_RUNTIME) where the package is installed: 1.78x diffusers'
    bf16 pipeline end to end at 512 px against 1.11x for torch eager, holding less memory than the
    fp32 torch engine (bench/RESULTS.md). Not in fp32, where it was 1.76x diffusers' fp32 pipeline
    against torch's 1.30x at 512 px but held 11.0 GB after setup against 7.25 (3.6 GB of the
    difference the compiled f32 weights; bench/RESULTS.md, "Setup's garbage"), nor with
    LCM_COMPILE=1 (one runtime at a time), nor on CUDA.
    """
    name = os.environ.get(RUNTIME_ENV)
    if not name:
        if device.type != "cpu" or dtype != torch.bfloat16 or compile_on or CPU_RUNTIME == "torch":
            return "torch"
        if not _installed(CPU_RUNTIME):
            log.info("%s is not installed (requirements-cpu.txt): the UNet runs on torch", CPU_RUNTIME)
            return "torch"
        return CPU_RUNTIME
    if name not in RUNTIMES:
        raise LCMError(f"{RUNTIME_ENV}={name!r} is not allowed: use {' or '.join(RUNTIMES)}")
    if name == "openvino" and device.type != "cpu":
        raise LCMError(
            f"{RUNTIME_ENV}={name!r} is not allowed on {device}: use torch (openvino runs on a CPU)"
        )
    if name == "openvino" and not _installed(name):
        raise LCMError(
            f"{RUNTIME_ENV}={name!r} is not allowed: the openvino package is not installed; "
            "install requirements-cpu.txt or use torch"
        )
    return name


def declares_sizes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether setup compiles or converts for LCM_COMPILE_SIZES: LCM_COMPILE=1, or OpenVINO as the runtime."""
    compile_on = _flag("LCM_COMPILE", False)
    return compile_on or runtime(device, dtype, compile_on) != "torch"


def _installed(package: str) -> bool:
    """Whether the package can be imported, found without importing it (lcm.model imports it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules without a spec: an import of it fails
        return False


def compile_sizes() -> tuple[tuple[int, int, int], ...]:
    """LCM_COMPILE_SIZES as (width, height, images) triples, each a valid request size."""
    text = os.environ.get(COMPILE_SIZES_ENV) or f"{DEFAULT_SIZE}x{DEFAULT_SIZE}"
    allowed = (
        f"comma-separated WxH or WxHxN (N images), at most {MAX_COMPILE_SIZES}, each a size and "
        "image count a request may ask for, e.g. 768x768,512x512x4"
    )
    sizes = []
    for entry in text.split(","):
        parts = entry.strip().lower().split("x")
        if len(parts) not in (2, 3) or not all(part.isdigit() for part in parts):
            raise LCMError(f"{COMPILE_SIZES_ENV}={text!r} is not allowed: {allowed}")
        width, height, images = (int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else 1)
        try:
            Request.build("", width=width, height=height, num_images=images, seed=0)
        except InputError as exc:
            raise LCMError(f"{COMPILE_SIZES_ENV}={text!r} is not allowed: {exc}") from exc
        sizes.append((width, height, images))
    if len(set(sizes)) > MAX_COMPILE_SIZES:
        raise LCMError(f"{COMPILE_SIZES_ENV}={text!r} is not allowed: {allowed}")
    return tuple(dict.fromkeys(sizes))


@dataclass(frozen=True)
class Accel:
    """Which optimisations are on; the defaults are a CPU's, `from_env` picks each device's."""

    planned_step: bool = True
    channels_last: bool = True
    fuse_qkv: bool = False
    fold_upsample: bool = True
    vae_classic_attention: bool = False
    compile: bool = False
    compile_sizes: tuple[tuple[int, int, int], ...] = ((DEFAULT_SIZE, DEFAULT_SIZE, 1),)  # (w, h, images)
    cuda_graphs: bool = False
    runtime: str = "torch"  # what runs the UNet: RUNTIMES
    openvino_snippets: str = "auto"  # with runtime openvino: SNIPPETS_CHOICES
    hold_memory: bool = field(default_factory=lambda: allocator.glibc() is not None)
    vae_dtype: Optional[torch.dtype] = None  # None: the pipeline's dtype
    decode_chunk: int = 1  # images per VAE decoder pass (TAESD's fast_decode takes the whole batch)
    batch_pixels: int = 0  # what requests served together may add up to: images x width x height

    @classmethod
    def from_env(cls, device: torch.device, dtype: torch.dtype, vae_config: Any) -> "Accel":
        cuda = device.type == "cuda"
        compile_on, cuda_graphs = _flag("LCM_COMPILE", False), _flag("LCM_CUDA_GRAPHS", False)
        if cuda_graphs and not (cuda and compile_on):
            raise LCMError("LCM_CUDA_GRAPHS=1 needs LCM_COMPILE=1 on a CUDA device; unset it")
        runs = runtime(device, dtype, compile_on)
        if runs != "torch" and compile_on:
            raise LCMError(
                f"{RUNTIME_ENV}={runs!r} is not allowed with LCM_COMPILE=1: one runtime at a time, "
                f"unset LCM_COMPILE or {RUNTIME_ENV}"
            )
        snippets = os.environ.get(SNIPPETS_ENV) or "auto"
        if snippets not in SNIPPETS_CHOICES:
            raise LCMError(f"{SNIPPETS_ENV}={snippets!r} is not allowed: use {', '.join(SNIPPETS_CHOICES)}")
        if os.environ.get(SNIPPETS_ENV) and runs != "openvino":
            raise LCMError(f"{SNIPPETS_ENV} needs {RUNTIME_ENV}=openvino; set it or unset {SNIPPETS_ENV}")
        if os.environ.get(COMPILE_SIZES_ENV) and not compile_on and runs == "torch":
            raise LCMError(
                f"{COMPILE_SIZES_ENV} needs LCM_COMPILE=1 or {RUNTIME_ENV}=openvino; set one or unset it"
            )
        fuse_qkv = _flag("LCM_FUSE_QKV", False)
        vae = vae_dtype(device, dtype, vae_config)
        # measured on CPU in bf16 only: in fp32 the two processors decode in the same time
        classic = _flag(
            "LCM_VAE_CLASSIC_ATTENTION", not cuda and (vae or dtype) == torch.bfloat16 and not fuse_qkv
        )
        if classic and fuse_qkv:
            raise LCMError(
                "LCM_VAE_CLASSIC_ATTENTION=1 cannot run with LCM_FUSE_QKV=1 (the classic processor does "
                "not use fused projections): unset one of them"
            )
        return cls(
            planned_step=_flag("LCM_PLANNED_STEP", True),
            # measured on CPU (bench/RESULTS.md), not yet on CUDA
            channels_last=_flag("LCM_CHANNELS_LAST", not cuda),
            fuse_qkv=fuse_qkv,
            fold_upsample=_flag("LCM_FOLD_UPSAMPLE", not cuda),  # measured on CPU, not yet on CUDA
            vae_classic_attention=classic,
            compile=compile_on,
            compile_sizes=compile_sizes(),
            cuda_graphs=cuda_graphs,
            runtime=runs,
            openvino_snippets=snippets,
            hold_memory=holds_memory(device),
            vae_dtype=vae,
            decode_chunk=decode_chunk(device),
            batch_pixels=batch_pixels(device),
        )

    def describe(self) -> str:
        """For the setup log line."""
        on = [
            name
            for name in (
                "planned_step",
                "channels_last",
                "fuse_qkv",
                "fold_upsample",
                "vae_classic_attention",
                "compile",
                "cuda_graphs",
                "hold_memory",
            )
            if getattr(self, name)
        ]
        vae = str(self.vae_dtype).removeprefix("torch.") if self.vae_dtype else "same"
        described = f"accel={'+'.join(on) or 'none'} vae_dtype={vae} decode_chunk={self.decode_chunk}"
        described += f" batch_pixels={self.batch_pixels} runtime={self.runtime}"
        if self.compile or self.runtime != "torch":
            sizes = ",".join(f"{w}x{h}x{n}" for w, h, n in self.compile_sizes)
            described += f" compile_sizes={sizes}"
        if self.runtime == "openvino":
            described += f" snippets={self.openvino_snippets}"
        return described


def vae_dtype(device: torch.device, dtype: torch.dtype, vae_config: Any) -> Optional[torch.dtype]:
    """The VAE's dtype: LCM_VAE_DTYPE, else bfloat16 where the checkpoint asks for force_upcast.

    The SD VAE's activations can overflow float16 (NaN or black images); bfloat16 has float32's
    range and runs at half-precision speed on Ampere and newer GPUs. Elsewhere (a T4, a V100)
    torch would emulate it, slowly, and counts that as support unless asked not to: float32 there.
    """
    name = os.environ.get("LCM_VAE_DTYPE")
    if name:
        if name not in DTYPES:
            raise LCMError(f"LCM_VAE_DTYPE={name!r} is not allowed: use {', '.join(DTYPES)}")
        return DTYPES[name]
    if dtype != torch.float16 or not getattr(vae_config, "force_upcast", False):
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def holds_memory(device: torch.device) -> bool:
    """LCM_HOLD_MEMORY, by default on for CPU where the C library is glibc."""
    return _flag("LCM_HOLD_MEMORY", device.type != "cuda") and allocator.glibc() is not None


def apply(pipe: Any, taesd: Any, accel: Accel) -> None:
    """Apply the memory settings and fusions in place (compilation is lcm.compiling)."""
    if accel.hold_memory:
        allocator.hold_freed_memory(True)
    if accel.vae_dtype is not None:
        pipe.vae.to(dtype=accel.vae_dtype)
    if accel.fuse_qkv:
        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    if accel.channels_last:
        for module in (pipe.unet, pipe.vae, taesd):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if accel.vae_classic_attention:
        pipe.vae.set_attn_processor(attention.BoundedClassicAttention())
    if accel.fold_upsample:  # last: folded from the weights in their final dtype and layout
        folding.fold_upsamplers(pipe.vae.decoder)
