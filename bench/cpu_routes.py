"""One UNet step and one VAE decode on the CPU by each route we could run them on, side by side.

    python -m bench.cpu_routes WEIGHTS --size N [--routes torch-fp32,...] [--runs R] [--record [FILE]]

Routes: torch eager in fp32 and in bf16 (channels_last, as lcm/accel.py sets it on CPU), each also
with its upsamplers folded (lcm/folding.py; the engine folds the decoder's only, so the UNet's
folded rows are for information), torch-bf16-classic (folded, and attention through
lcm.attention's bounded classic processor: the engine's decoder on a bf16 CPU; the UNet's row for
information again), torch.compile of the bf16 modules with inductor's freezing, and
OpenVINO at f32 and bf16 inference precision (an optional package: its routes say "not installed"
without it). Every route gets the same inputs, as
the sampler and the decoder pass them, in one process; each route's model is loaded fresh and freed
before the next. Per route and model: median ms over --runs after one warm-up, the speedup over
torch-fp32, and the largest absolute difference of its output from torch-fp32's and torch-bf16's.
What it decides: which CPU runtime the engine's one UNet/decoder seam should pick (STYLE.md).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from bench import RESULTS, passive_openmp, positive

passive_openmp()  # before torch starts OpenMP

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from bench import report  # noqa: E402
from bench.memory import release  # noqa: E402
from lcm import attention, folding  # noqa: E402
from lcm.params import SPECS  # noqa: E402
from lcm.sampler import guidance_embedding  # noqa: E402

CPU = torch.device("cpu")
TIMESTEP = 999  # the first of the default 4-step schedule: what a request's first step runs
PROMPT_TOKENS = 77  # CLIP's padded prompt length
SEED = 0
# The two eager routes every other route's output is compared with.
FP32, BF16 = "torch-fp32", "torch-bf16"


class UNetStep(torch.nn.Module):
    """The UNet called as lcm.sampler calls it, with positional inputs a tracer can take."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, t: torch.Tensor, w: torch.Tensor, emb: torch.Tensor) -> Any:
        return self.unet(latents, t, timestep_cond=w, encoder_hidden_states=emb, return_dict=False)[0]


class Decode(torch.nn.Module):
    """The VAE's decoder called as lcm.images.decode calls it."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> Any:
        return self.vae.decode(latents, return_dict=False)[0]


@dataclass
class Model:
    """One thing to time: how to load it wrapped (in float32), and its inputs (float32 and int64)."""

    name: str
    load: Callable[[], torch.nn.Module]
    inputs: tuple[torch.Tensor, ...]


def models(weights: Path, size: int) -> list[Model]:
    """The UNet step and the VAE decode at `size` pixels, with seeded inputs shaped from the configs."""
    config = UNet2DConditionModel.load_config(weights / "unet")
    vae_config = AutoencoderKL.load_config(weights / "vae")
    generator = torch.Generator().manual_seed(SEED)
    side = size // 8
    latents = torch.randn(1, config["in_channels"], side, side, generator=generator)
    w = guidance_embedding(SPECS["guidance_scale"].default, 1, config["time_cond_proj_dim"])
    emb = torch.randn(1, PROMPT_TOKENS, config["cross_attention_dim"], generator=generator)
    decode_in = torch.randn(1, vae_config["latent_channels"], side, side, generator=generator)

    def load(cls: Any, folder: str) -> Any:
        return cls.from_pretrained(
            weights, subfolder=folder, local_files_only=True, use_safetensors=True, dtype=torch.float32
        ).eval()

    return [
        Model(
            "UNet step",
            lambda: UNetStep(load(UNet2DConditionModel, "unet")),
            (latents, torch.tensor(TIMESTEP), w, emb),
        ),
        Model(
            "VAE decode",
            lambda: Decode(load(AutoencoderKL, "vae")),
            (decode_in / vae_config["scaling_factor"],),
        ),
    ]


@dataclass
class Prepared:
    """A route's callable on the model, and what preparing it cost (seconds by name)."""

    call: Callable[[], torch.Tensor]
    setup: dict[str, float] = field(default_factory=dict)


def _cast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Floating inputs in the model's dtype, as the sampler casts its latents and embeddings."""
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def _eager(
    dtype: torch.dtype, folded: bool = False, classic: bool = False
) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], Prepared]:
    def prepare(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Prepared:
        module.to(dtype=dtype, memory_format=torch.channels_last)
        if folded:  # the UNet and the VAE's decoder are the modules with up blocks
            for part in [m for m in module.modules() if hasattr(m, "up_blocks")]:
                folding.fold_upsamplers(part)
        if classic:
            for part in [m for m in module.modules() if hasattr(m, "set_attn_processor")]:
                part.set_attn_processor(attention.BoundedClassicAttention())
        cast = _cast(inputs, dtype)
        return Prepared(lambda: module(*cast))

    return prepare


def _compiled(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Prepared:
    """torch.compile with freezing: weights become constants, prepacked for oneDNN; the first call
    compiles (its seconds are the compile figure)."""
    module.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    cast = _cast(inputs, torch.bfloat16)
    compiled = torch.compile(module, dynamic=False)
    with torch._inductor.config.patch(freezing=True):
        start = time.perf_counter()
        compiled(*cast)
        seconds = time.perf_counter() - start
    return Prepared(lambda: compiled(*cast), {"compile": seconds})


def _openvino(precision: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], Prepared]:
    def prepare(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Prepared:
        import openvino

        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants
            converted = openvino.convert_model(module, example_input=inputs)
        converting = time.perf_counter() - start
        start = time.perf_counter()
        compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        compiling = time.perf_counter() - start
        arrays = [x.numpy() for x in inputs]
        return Prepared(
            lambda: torch.from_numpy(compiled(arrays)[0]), {"convert": converting, "compile": compiling}
        )

    return prepare


ROUTES: dict[str, Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], Prepared]] = {
    FP32: _eager(torch.float32),
    "torch-fp32-folded": _eager(torch.float32, folded=True),
    BF16: _eager(torch.bfloat16),
    "torch-bf16-folded": _eager(torch.bfloat16, folded=True),
    "torch-bf16-classic": _eager(torch.bfloat16, folded=True, classic=True),
    "compile-bf16": _compiled,
    "openvino-f32": _openvino("f32"),
    "openvino-bf16": _openvino("bf16"),
}


def openvino_version() -> Optional[str]:
    """OpenVINO's version, or None where the optional package is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


@dataclass
class Measured:
    route: str
    model: str
    note: str = ""  # why there are no figures ("not installed")
    setup: dict[str, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    output: Optional[torch.Tensor] = None  # float32

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(model: Model, route: str, runs: int) -> Measured:
    """Load, prepare, one warm-up, `runs` timed calls; everything but the output is freed after."""
    if route.startswith("openvino") and openvino_version() is None:
        return Measured(route, model.name, "not installed")
    _say(f"{model.name}: {route}")
    module = model.load()
    mode = nullcontext() if route.startswith("openvino") else torch.inference_mode()
    with mode:
        prepared = ROUTES[route](module, model.inputs)
        prepared.call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            output = prepared.call()
            times.append(time.perf_counter() - start)
    result = Measured(route, model.name, setup=prepared.setup, times=times, output=output.float().clone())
    del module, prepared, output
    if route == "compile-bf16":
        torch._dynamo.reset()  # its graphs hold the frozen weights
    gc.collect()
    release(CPU)
    return result


def _difference(result: Measured, against: Optional[Measured]) -> str:
    if against is None or against.output is None or result.output is None:
        return "–"
    return f"{(result.output - against.output).abs().max().item():.3g}"


def table(results: list[Measured]) -> str:
    """One row per model and route; the comparisons are with the same model's eager routes."""
    lines = [
        f"| model | route | setup s | median ms | speedup vs {FP32} | max abs diff vs {FP32} | vs {BF16} |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        same = {o.route: o for o in results if o.model == r.model and o.output is not None}
        if r.output is None:
            lines.append(f"| {r.model} | {r.route} | – | {r.note} | – | – | – |")
            continue
        setup = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r.setup.items()) or "–"
        fp32 = same.get(FP32)
        speedup = f"{fp32.median / r.median:.2f}" if fp32 is not None else "–"
        cells = [r.model, r.route, setup, f"{r.median * 1000:.1f}", speedup]
        cells += [_difference(r, fp32), _difference(r, same.get(BF16))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _routes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROUTES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed: a comma-separated subset of {', '.join(ROUTES)}"
        )
    return names


def _size(text: str) -> int:
    value = int(text)
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(
            f"{value} is not allowed: a multiple of 64 (the UNet halves latents 3 times)"
        )
    return value


def _say(message: str) -> None:
    print(f"[cpu_routes] {message}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_routes", description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--size", type=_size, required=True, help="image side in pixels; latents are size/8")
    p.add_argument(
        "--routes", type=_routes, default=list(ROUTES), help=f"comma-separated (default: {','.join(ROUTES)})"
    )
    p.add_argument(
        "--runs",
        type=positive,
        default=3,
        help="timed calls per route and model, after one warm-up (default 3)",
    )
    p.add_argument("--record", nargs="?", type=Path, const=RESULTS, default=None, metavar="FILE")
    args = p.parse_args(argv)
    routes = [name for name in ROUTES if name in args.routes]  # the eager references first
    results = [
        measure(model, route, args.runs) for model in models(args.weights, args.size) for route in routes
    ]
    text = table(results)
    bullets = [
        f"device: cpu — {report.device_name(CPU)}",
        f"versions: {report.versions()}, openvino {openvino_version() or 'not installed'}; "
        f"commit {report.commit()}",
        f"inputs: {args.size}x{args.size} px (latents {args.size // 8}x{args.size // 8}), "
        f"timestep {TIMESTEP}, seed {SEED}; {args.runs} timed calls after one warm-up; "
        f"weights {args.weights}",
        report.load_average(),
    ]
    print("\n".join([*bullets, "", text]))
    if args.record is not None:
        command = f"python -m bench.cpu_routes {shlex.join(sys.argv[1:] if argv is None else argv)}"
        lines = [*(f"- {line}" for line in bullets), f"- command: `{command}`", "", text, ""]
        report.append_section(args.record, f"CPU routes, {args.size}x{args.size}", lines)
        _say(f"appended to {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
