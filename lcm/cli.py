"""Command line without Cog: the same engine, the same files."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from lcm import params
from lcm.errors import InputError, LCMError
from lcm.weights import file_sha256


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory for the files (created if absent)")
    parser.add_argument("--weights", type=Path, default=None, help="default: LCM_WEIGHTS_DIR, else weights/")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: LCM_DEVICE, else CUDA)")
    parser.add_argument(
        "--lora", default=None, help="trained weights: a training's .tar or its .safetensors (path or URL)"
    )


def _flag_help(spec: params.Spec) -> str:
    """The spec's help with its range and default, as argparse shows them."""
    if spec.kind is bool:
        return spec.help
    bounds = f"{spec.low} to {spec.high}" if spec.low is not None and spec.kind in (int, float) else ""
    if spec.multiple > 1:
        bounds += f", a multiple of {spec.multiple}"
    default = "" if spec.default is None else f"default {spec.default}"
    return "; ".join(part for part in (spec.help, bounds, default) if part)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcm", description="LCM Dreamshaper v7 image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate images from a prompt (and optionally an image)")
    gen.add_argument("prompt", help=params.SPECS["prompt"].help)
    _engine_options(gen)
    gen.add_argument(
        "--dtype",
        default=None,
        help="the models' dtype: float32 or bfloat16 on a CPU, also float16 on CUDA (default: LCM_DTYPE, "
        "else bfloat16 on a CPU that computes it in hardware, float32 on other CPUs, float16 on CUDA)",
    )
    for spec in params.INPUTS[1:]:  # the API's inputs, by the API's names
        flag = "--" + spec.name.replace("_", "-")
        if spec.kind is bool:
            gen.add_argument(flag, action="store_true", help=_flag_help(spec))
        else:
            gen.add_argument(
                flag,
                type=spec.kind,
                default=spec.default,
                choices=spec.choices or None,
                help=_flag_help(spec),
            )

    rep = commands.add_parser(
        "reproduce", help="regenerate an image from the parameters stored in its file, in its recorded dtype"
    )
    rep.add_argument("file", type=Path, help="a PNG, WebP or JPEG written by this project")
    _engine_options(rep)
    rep.add_argument("--image", type=Path, default=None, help="the input image, for an image-to-image file")
    rep.add_argument("--mask", type=Path, default=None, help="the mask, for an inpainting file")
    rep.add_argument(
        "--control-image", type=Path, default=None, help="the control image, for a file made with one"
    )
    return parser


def _request(args: argparse.Namespace, lora_sha256: Optional[str]) -> tuple[params.Request, Optional[str]]:
    """The request to run and the dtype to run it in (None: the engine's choice); for reproduce, the
    file's request and dtype, refused unless --lora is the LoRA it was made with."""
    if args.command == "reproduce":
        from lcm.loading import legacy_dtype, pick_device
        from lcm.metadata import read_metadata
        from lcm.outputs import DTYPE_KEY

        meta = read_metadata(args.file)
        wanted = meta.get("lora_sha256")
        if wanted != lora_sha256:
            needed = (
                f"the LoRA with sha256 {wanted}"
                if wanted
                else "none: this file was made without trained weights"
            )
            raise InputError("lora", lora_sha256, f"{needed} (this LoRA's sha256 is {lora_sha256})")
        request = params.Request.from_metadata(
            meta, image=args.image, mask=args.mask, control_image=args.control_image
        )
        return request, meta.get(DTYPE_KEY) or legacy_dtype(pick_device(args.device))
    return params.Request.build(**{spec.name: getattr(args, spec.name) for spec in params.INPUTS}), args.dtype


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m lcm`; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lcm import lora
    from lcm.engine import Engine  # heavy imports only once the arguments parsed

    try:
        lora_path = lora.fetch(args.lora, tempfile.mkdtemp(prefix="lcm-lora-")) if args.lora else None
        digest = file_sha256(lora_path) if lora_path else None
        request, dtype = _request(args, digest)
        engine = Engine.load(args.weights, device=args.device, lora_path=lora_path, dtype=dtype)
        args.out.mkdir(parents=True, exist_ok=True)
        for path in engine.generate_files(request, args.out):
            print(path)
    except LCMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
