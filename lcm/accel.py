"""Speed settings, each with an off switch for debugging, read from the environment at load time.

    LCM_FUSED_STEP=0      diffusers' scheduler.step instead of the host-planned step (sampler.plan_steps)
    LCM_CHANNELS_LAST=0   keep the UNet and VAE in contiguous (NCHW) memory format
    LCM_FUSE_QKV=0        keep separate query/key/value projections in attention
    LCM_COMPILE=0         no torch.compile of the UNet and VAE decoder
    LCM_CUDA_GRAPHS=0     compile without CUDA graphs (mode "default" instead of "reduce-overhead")
    LCM_VAE_DTYPE=...     float16, bfloat16 or float32 for the VAE (default: see vae_dtype)
    LCM_WARMUP=0          with LCM_COMPILE, compile on the first request instead of during setup
    LCM_HOLD_MEMORY=0     let glibc unmap freed activations and give its heap back (see hold_freed_memory)

Defaults are what the benchmarks (bench/) support per device; the tests check every setting
against the unoptimised path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch._inductor.config

from lcm.errors import LCMError

log = logging.getLogger("lcm")

COMPILE_CACHE_ENV = "LCM_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "torch-compile"
MAX_COMPILED_SHAPES = 4  # distinct (batch, height, width) per compiled module; others run eagerly
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# glibc's mallopt parameters (malloc.h) and thresholds, in bytes
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HELD_MMAP_THRESHOLD = 2**30  # buffers under 1 GiB come from the heap, where freed ones are reused
HELD_TRIM_THRESHOLD = 2**31 - 1  # mallopt's largest value: freed heap stays with the process
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # where glibc's own sliding threshold stops on 64-bit systems


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise LCMError(f"{name}={value!r} is not allowed: use 1 or 0")


@dataclass(frozen=True)
class Accel:
    """Which optimisations are on; `from_env` picks per-device defaults."""

    fused_step: bool = True
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    warmup: bool = True
    hold_memory: bool = False
    vae_dtype: Optional[torch.dtype] = None  # None: the pipeline's dtype

    @classmethod
    def from_env(cls, device: torch.device, dtype: torch.dtype, vae_config: Any) -> "Accel":
        cuda = device.type == "cuda"
        return cls(
            fused_step=_flag("LCM_FUSED_STEP", True),
            channels_last=_flag("LCM_CHANNELS_LAST", True),  # CPU: 1.065x end to end (bench/RESULTS.md)
            fuse_qkv=_flag("LCM_FUSE_QKV", cuda),
            compile=_flag("LCM_COMPILE", cuda),
            cuda_graphs=cuda and _flag("LCM_CUDA_GRAPHS", True),
            warmup=_flag("LCM_WARMUP", True),
            hold_memory=_flag("LCM_HOLD_MEMORY", not cuda) and glibc() is not None,
            vae_dtype=vae_dtype(device, dtype, vae_config),
        )

    def describe(self) -> str:
        """For the setup log line."""
        on = [
            name
            for name in ("fused_step", "channels_last", "fuse_qkv", "compile", "cuda_graphs", "hold_memory")
            if getattr(self, name)
        ]
        vae = str(self.vae_dtype).removeprefix("torch.") if self.vae_dtype else "same"
        return f"accel={'+'.join(on) or 'none'} vae_dtype={vae}"


def vae_dtype(device: torch.device, dtype: torch.dtype, vae_config: Any) -> Optional[torch.dtype]:
    """The VAE's dtype: LCM_VAE_DTYPE, else bfloat16 where the checkpoint asks for force_upcast.

    The SD VAE's activations can overflow float16 (NaN or black images); bfloat16 has float32's
    range and runs at half-precision speed on Ampere and newer GPUs. float32 elsewhere.
    """
    name = os.environ.get("LCM_VAE_DTYPE")
    if name:
        if name not in DTYPES:
            raise LCMError(f"LCM_VAE_DTYPE={name!r} is not allowed: use {', '.join(DTYPES)}")
        return DTYPES[name]
    if dtype != torch.float16 or not getattr(vae_config, "force_upcast", False):
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@functools.cache
def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library where it is glibc (mallopt and malloc_trim), else None (macOS, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, glibc's among them
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def hold_freed_memory(on: bool) -> bool:
    """Make glibc keep and reuse freed memory (on), or behave as a default process does (off).

    By default glibc maps every buffer of 32 MiB or more afresh and unmaps it when freed, and gives
    the free top of its heap back to the kernel; new pages are then zero-filled one fault at a time
    on first touch. A CPU request allocates gigabytes of activations, about 600,000 page faults per
    UNet pass and VAE decode at 256x256: holding the memory made the UNet 17% and the VAE 5% faster
    (bench/RESULTS.md). The price is that the process keeps its peak working set between requests.
    A thread's own arena still unmaps a heap that falls wholly free: where predict() runs on
    threads other than the main one (Cog's server), MALLOC_ARENA_MAX=1 in the environment keeps it.
    Off is glibc's sliding threshold where it settles once large buffers have been freed, with the
    held memory given back. Returns False, changing nothing, where the C library is not glibc.
    """
    libc = glibc()
    if libc is None:
        return False
    if on:
        mmap, trim = HELD_MMAP_THRESHOLD, HELD_TRIM_THRESHOLD
    else:
        mmap, trim = GLIBC_MMAP_THRESHOLD_MAX, 2 * GLIBC_MMAP_THRESHOLD_MAX
    done = libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    if not on:
        libc.malloc_trim(0)
    return done


def apply(pipe: Any, taesd: Any, accel: Accel) -> None:
    """Apply the memory settings and fusions in place (compilation is `compile_modules`)."""
    if accel.hold_memory:
        hold_freed_memory(True)
    if accel.vae_dtype is not None:
        pipe.vae.to(dtype=accel.vae_dtype)
    if accel.fuse_qkv:
        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    if accel.channels_last:
        for module in (pipe.unet, pipe.vae, taesd):
            if module is not None:
                module.to(memory_format=torch.channels_last)


class ShapeBoundCompiled:
    """torch.compile for at most MAX_COMPILED_SHAPES input shapes; any other shape runs eagerly.

    Each new shape costs a compilation (tens of seconds on a GPU): bounding them keeps a
    stream of odd sizes from stalling the service, while the common sizes stay fast.
    """

    def __init__(self, module: torch.nn.Module, method: str, mode: Optional[str]) -> None:
        self.eager: Callable[..., Any] = getattr(module, method)
        self.compiled = torch.compile(self.eager, mode=mode, fullgraph=False, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()

    def __call__(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shape = tuple(sample.shape)
        if shape not in self.shapes and len(self.shapes) >= MAX_COMPILED_SHAPES:
            return self.eager(sample, *args, **kwargs)
        self.shapes.add(shape)
        return self.compiled(sample, *args, **kwargs)


def compile_modules(pipe: Any, accel: Accel) -> None:
    """Compile the UNet forward and the VAE decoder, caching kernels on disk across restarts."""
    if not accel.compile:
        return
    cache = Path(os.environ.get(COMPILE_CACHE_ENV) or DEFAULT_COMPILE_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    torch._inductor.config.fx_graph_cache = True  # kernels and graphs reused after a restart
    mode = "reduce-overhead" if accel.cuda_graphs else None
    # Instance attributes shadow the methods; nn.Module.__call__ (and its hooks) still runs.
    pipe.unet.forward = ShapeBoundCompiled(pipe.unet, "forward", mode)
    pipe.vae.decode = ShapeBoundCompiled(pipe.vae, "decode", mode)
    log.info("torch.compile mode=%s cache=%s", mode, cache)
