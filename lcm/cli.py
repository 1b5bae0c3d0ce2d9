"""Command line without Cog: the same engine, the same files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from lcm import params
from lcm.errors import LCMError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcm", description="LCM Dreamshaper v7 image generation")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="text describing the image")
    gen.add_argument(
        "--out", required=True, type=Path, help="directory for the PNG files (created if absent)"
    )
    gen.add_argument("--width", type=int, default=768, help="pixels, multiple of 8, 256..1024 (default 768)")
    gen.add_argument("--height", type=int, default=768, help="pixels, multiple of 8, 256..1024 (default 768)")
    gen.add_argument("--num-images", type=int, default=1, help=f"1..{params.MAX_IMAGES} (default 1)")
    gen.add_argument(
        "--steps", type=int, default=4, help=f"denoising steps 1..{params.MAX_STEPS} (default 4)"
    )
    gen.add_argument(
        "--guidance-scale", type=float, default=8.0, help="1..20, w = guidance_scale - 1 (default 8)"
    )
    gen.add_argument("--origin-steps", type=int, default=50, help="LCM original schedule length (default 50)")
    gen.add_argument(
        "--seed", type=int, default=None, help="0..2^32-1; image i uses seed + i (default random)"
    )
    gen.add_argument("--weights", type=Path, default=None, help="default: LCM_WEIGHTS_DIR, else weights/")
    gen.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: LCM_DEVICE, else CUDA if present)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m lcm`; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lcm.engine import Engine  # heavy imports only once the arguments parsed

    try:
        request = params.Request.build(
            prompt=args.prompt,
            width=args.width,
            height=args.height,
            num_images=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            lcm_origin_steps=args.origin_steps,
            seed=args.seed,
        )
        engine = Engine.load(args.weights, device=args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        for path in engine.generate_files(request, args.out):
            print(path)
    except LCMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
