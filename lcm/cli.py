"""Command line without Cog: the same engine, the same files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from lcm import params
from lcm.errors import LCMError


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory for the files (created if absent)")
    parser.add_argument("--weights", type=Path, default=None, help="default: LCM_WEIGHTS_DIR, else weights/")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: LCM_DEVICE, else CUDA)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcm", description="LCM Dreamshaper v7 image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from a prompt (and optionally an image)")
    gen.add_argument("prompt", help="text describing the image")
    _engine_options(gen)
    gen.add_argument("--image", type=Path, default=None, help="starting image for image-to-image")
    gen.add_argument("--strength", type=float, default=params.DEFAULT_STRENGTH, help="img2img: 0..1 (0.8)")
    gen.add_argument(
        "--width", type=int, default=None, help="a multiple of 8 in 256..1024 (768, or from --image)"
    )
    gen.add_argument(
        "--height", type=int, default=None, help="a multiple of 8 in 256..1024 (768, or from --image)"
    )
    gen.add_argument("--num-images", type=int, default=1, help=f"1..{params.MAX_IMAGES} (default 1)")
    gen.add_argument("--steps", type=int, default=4, help=f"1..{params.MAX_STEPS} (default 4)")
    gen.add_argument("--guidance-scale", type=float, default=8.0, help="1..20, w = scale - 1 (default 8)")
    gen.add_argument("--origin-steps", type=int, default=50, help="LCM original schedule length (default 50)")
    gen.add_argument("--seed", type=int, default=None, help="0..2^32-1; image i: seed + i (random)")
    gen.add_argument("--clip-skip", type=int, default=0, help="text-encoder layers to skip (default 0)")
    gen.add_argument("--format", default="png", choices=params.OUTPUT_FORMATS, help="file format (png)")
    gen.add_argument("--quality", type=int, default=90, help="webp/jpg quality 1..100 (default 90)")
    gen.add_argument("--disable-safety-checker", action="store_true", help="keep images the checker flags")
    gen.add_argument("--fast-decode", action="store_true", help="decode with TAESD: faster, less detail")

    rep = commands.add_parser("reproduce", help="regenerate an image from the parameters stored in its file")
    rep.add_argument("file", type=Path, help="a PNG, WebP or JPEG written by this project")
    _engine_options(rep)
    rep.add_argument("--image", type=Path, default=None, help="the input image, for an image-to-image file")
    return parser


def _request(args: argparse.Namespace) -> params.Request:
    if args.command == "reproduce":
        from lcm.metadata import read_metadata

        return params.Request.from_metadata(read_metadata(args.file), image=args.image)
    return params.Request.build(
        prompt=args.prompt,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        lcm_origin_steps=args.origin_steps,
        seed=args.seed,
        image=args.image,
        prompt_strength=args.strength,
        clip_skip=args.clip_skip,
        output_format=args.format,
        output_quality=args.quality,
        safety_checker=not args.disable_safety_checker,
        fast_decode=args.fast_decode,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m lcm`; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lcm.engine import Engine  # heavy imports only once the arguments parsed

    try:
        request = _request(args)
        engine = Engine.load(args.weights, device=args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        for path in engine.generate_files(request, args.out):
            print(path)
    except LCMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
