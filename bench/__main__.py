"""The benchmark's command line: torch and the pipelines load only after parsing, so --help is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from bench import BENCH_DIR, DEFAULT_WEIGHTS, RESULTS, passive_openmp, positive


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: at least 0")
    return value


def parser() -> argparse.ArgumentParser:
    """The benchmark's options; every default is the one bench/README.md documents."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Time the project's predict() path against diffusers' LatentConsistencyModelPipeline "
            "in one process, on the same weights and inputs. The last line printed is "
            "speedup_vs_reference=<reference median / ours median, end to end>."
        ),
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    p.add_argument("--size", type=int, default=768, help="image width and height in pixels (default 768)")
    p.add_argument("--steps", type=positive, default=4, help="inference steps (default 4)")
    p.add_argument("--batch", type=positive, default=1, help="images per request (default 1)")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"weights directory (default: {DEFAULT_WEIGHTS.relative_to(BENCH_DIR.parent)}, "
        "a full-size synthetic checkpoint built there on first use, about 25 s and 2.6 GB)",
    )
    p.add_argument(
        "--runs", type=positive, default=None, help="timed runs per method (default 5 on cuda, 3 on cpu)"
    )
    p.add_argument(
        "--warmup", type=_non_negative, default=1, help="untimed runs per method first (default 1)"
    )
    p.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="torch CPU threads for both methods (default: torch's own, one per core)",
    )
    p.add_argument(
        "--reference-dtype",
        default=None,
        metavar="DTYPE",
        help="the reference pipeline's dtype: float32, bfloat16 or float16, as the device allows "
        "(default: diffusers' for the device, float16 on cuda and float32 on cpu); ours keeps the engine's "
        "choice (LCM_DTYPE)",
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="ours decodes with TAESD (predict's fast_decode); the reference keeps the full VAE",
    )
    p.add_argument(
        "--mode",
        choices=("txt2img", "inpaint", "controlnet"),
        default="txt2img",
        help="txt2img (default), or inpaint: a photo-like input and a mask over its centre quarter, "
        "prompt_strength 1, against diffusers' StableDiffusionInpaintPipeline on the same components, "
        "or controlnet: the canny ControlNet on a random grey mosaic's edges, against diffusers' "
        "StableDiffusionControlNetPipeline on the same components (the weights need controlnet-canny/)",
    )
    p.add_argument(
        "--freeu",
        action="store_true",
        help="both methods run FreeU: predict's freeu, and the reference's enable_freeu at the same scales",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="the prompt of both methods (default: predict's). In Compel's weighting syntax, the reference "
        "is given compel's embeddings (CompelForSD) as prompt_embeds, timed as its text stage",
    )
    p.add_argument(
        "--clients",
        type=positive,
        default=None,
        help="serving mode: Cog's real server driven by this many concurrent clients, against one "
        "client at a time in the same run (bench/serving.py); no reference pipeline",
    )
    p.add_argument(
        "--requests", type=positive, default=8, help="serving mode: requests per phase (default 8)"
    )
    p.add_argument(
        "--record",
        nargs="?",
        type=Path,
        const=RESULTS,
        default=None,
        metavar="FILE",
        help="append the results as a dated section to FILE "
        f"(default FILE: {RESULTS.relative_to(BENCH_DIR.parent)})",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m bench`; returns the exit status."""
    args = parser().parse_args(argv)
    passive_openmp()
    from bench.harness import run_cli

    return run_cli(args, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
