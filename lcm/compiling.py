"""torch.compile for a declared set of request shapes, compiled in setup, and a cache that ships.

A compilation takes tens of seconds to minutes and recording CUDA graphs takes more: neither may
land on a request's clock. Setup compiles the UNet forward and the VAE decoder for the request
sizes it is told (LCM_COMPILE_SIZES), recording every input signature those requests produce;
then the set is sealed. A later call whose signature is in the set runs the compiled graph, any
other runs eagerly, and the engine's log line says so. Signatures hold everything dynamo guards
on that a request can change: each tensor's shape, strides, dtype, device and autograd state,
plain argument values, and the grad and inference modes. Should a guard still fail, torch's
"eager_on_recompile" stance runs that call eagerly rather than compiling.

Portable cache: `save_cache` writes torch's cache artifacts (torch.compiler.save_cache_artifacts)
into the weights directory; setup loads them when they were made by the same torch, Triton and
device, so a new instance compiles from its cache instead of from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch._inductor.config

from lcm.errors import LCMError

log = logging.getLogger("lcm")

COMPILE_CACHE_ENV = "LCM_COMPILE_CACHE"
DEFAULT_COMPILE_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "torch-compile"
CACHE_ARTIFACTS = "torch-compile-cache.bin"  # in the weights directory, beside the checkpoint
CACHE_FINGERPRINT = "torch-compile-cache.json"  # what made it; artifacts load only where it matches
# Dynamo keeps at most this many graphs per function; each declared size needs one per distinct
# input signature (the first step's latents and the later steps' may differ in layout).
RECOMPILE_LIMIT = 32


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (
            tuple(value.shape),
            value.stride(),
            value.dtype,
            value.device,
            value.requires_grad,
            value.is_inference(),
        )
    try:
        hash(value)
    except TypeError:
        return type(value).__name__
    return value


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What decides which compiled graph a call needs."""
    return (
        tuple(_describe(a) for a in args),
        tuple(sorted((k, _describe(v)) for k, v in kwargs.items())),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )


class CompiledForShapes:
    """A module method compiled for the signatures seen before `seal()`; every other call runs eagerly.

    Only the engine thread calls it. `eager_calls` counts the eager calls since the engine last
    reset it, for the request's log line; `eager_only` runs every call eagerly.
    """

    def __init__(self, name: str, module: torch.nn.Module, method: str, mode: Optional[str]) -> None:
        self.name = name
        self.eager: Callable[..., Any] = getattr(module, method)
        self.compiled = torch.compile(self.eager, mode=mode, fullgraph=False, dynamic=False)
        self.signatures: set[tuple[Any, ...]] = set()
        self.sealed = False
        self.eager_calls = 0
        self.eager_only = False  # set by the engine for a batch the compiled graphs do not cover (FreeU)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager_only:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        key = signature(args, kwargs)
        if not self.sealed:
            self.signatures.add(key)
            return self.compiled(*args, **kwargs)
        if key not in self.signatures:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled(*args, **kwargs)

    def seal(self) -> None:
        self.sealed = True


def compile_modules(pipe: Any, cuda_graphs: bool, device: torch.device) -> list[CompiledForShapes]:
    """Wrap the UNet forward and the VAE decoder; kernels are cached on disk across restarts.

    On a CPU, inductor freezes the weights: it folds them into the graph as constants and lays
    them out for oneDNN once, in setup. Measured at 256 px with the full-size UNet in bf16 on an
    AVX512-BF16 CPU: 315 ms a step frozen, 561 ms eager (bench/RESULTS.md). Frozen weights are why
    a LoRA engine runs without compile (lcm.model.load): its weights would be baked in.
    """
    cache = Path(os.environ.get(COMPILE_CACHE_ENV) or DEFAULT_COMPILE_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    torch._inductor.config.fx_graph_cache = True
    torch._inductor.config.freezing = device.type == "cpu"
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    mode = "reduce-overhead" if cuda_graphs else None
    # Instance attributes shadow the methods; nn.Module.__call__ (and its hooks) still runs.
    pipe.unet.forward = CompiledForShapes("unet", pipe.unet, "forward", mode)
    pipe.vae.decode = CompiledForShapes("vae", pipe.vae, "decode", mode)
    log.info("torch.compile mode=%s cache=%s", mode or "default", cache)
    return [pipe.unet.forward, pipe.vae.decode]


def fingerprint(device: torch.device) -> dict[str, Optional[str]]:
    """What compiled kernels depend on: artifacts made elsewhere are not loaded."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        chip = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    else:
        chip = platform.processor() or platform.machine()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device": chip,
        "python": platform.python_version(),
    }


def load_cache(weights_dir: Path, device: torch.device) -> str:
    """Load the shipped artifacts into torch's caches when they fit this machine; says what happened."""
    artifacts, recorded = weights_dir / CACHE_ARTIFACTS, weights_dir / CACHE_FINGERPRINT
    if not artifacts.is_file():
        return f"no {CACHE_ARTIFACTS} in {weights_dir}: compiling from scratch"
    try:
        made_by = json.loads(recorded.read_text())
    except (OSError, ValueError):
        return f"{CACHE_ARTIFACTS} has no readable {CACHE_FINGERPRINT}: not loaded"
    here = fingerprint(device)
    if made_by != here:
        differ = ", ".join(
            f"{k} {made_by.get(k)} there, {v} here" for k, v in here.items() if made_by.get(k) != v
        )
        return f"{CACHE_ARTIFACTS} was made elsewhere ({differ}): not loaded"
    info = torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    counts = {kind: len(items) for kind, items in (info.artifacts.items() if info else [])}
    return f"loaded {CACHE_ARTIFACTS} ({', '.join(f'{n} {k}' for k, n in counts.items()) or 'empty'})"


def save_cache(weights_dir: Path, device: torch.device) -> Path:
    """Write what this process compiled as portable artifacts, with the fingerprint they need."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise LCMError("torch recorded no compile artifacts: nothing was compiled in this process")
    partial = weights_dir / (CACHE_ARTIFACTS + ".partial")
    partial.write_bytes(saved[0])
    (weights_dir / CACHE_FINGERPRINT).write_text(json.dumps(fingerprint(device), indent=2) + "\n")
    os.replace(partial, weights_dir / CACHE_ARTIFACTS)
    return weights_dir / CACHE_ARTIFACTS
