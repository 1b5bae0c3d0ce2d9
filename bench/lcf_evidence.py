"""Does LCF learn the set, and only for its caption? Each prompt's 4-step images before and after.

    python -m bench.lcf_evidence WEIGHTS [--device cuda] [--steps 500] [--record [FILE]]

Makes --images images of one strong colour (with mild noise) at --resolution, trains a LoRA on them
with --caption (lcm.training.train_lora: the API's defaults but those given here), then generates
4-step images (seeds 0 to 3, guidance 8) for --caption and each --other prompt with the base model
and with the LoRA, and reports per prompt: the mean-colour distance of its images to the set's
colour before and after (0 to 441, RGB levels), and how much its images changed at all (mean
absolute pixel difference). What the real model should show: the caption's distance falls and the
other prompts' images change much less. The synthetic checkpoints' VAE is random and decodes grey,
so their figures only show that the script runs.

The last line: `trained_ratio=<caption's distance after / before> other_ratio=<the largest of the
other prompts'>`.
"""

from __future__ import annotations

import argparse
import io
import logging
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench import report
from lcm import training
from lcm.engine import Engine
from lcm.loading import pick_device
from lcm.params import Request

COLOUR = (230, 110, 20)  # a strong orange: far from the grey a base model's images average to
SEEDS = 0, 4  # first seed, images per prompt
OTHERS = ("a house beside a mountain lake", "a bowl of fruit on a wooden table")


def colour_set(path: Path, images: int, side: int) -> np.ndarray:
    """Write the set as a zip of PNGs; return its mean colour."""
    rng = np.random.default_rng(0)
    means = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(images):
            pixels = np.clip(np.array(COLOUR) + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            means.append(pixels.reshape(-1, 3).mean(axis=0))
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            zf.writestr(f"{i}.png", out.getvalue())
    return np.mean(means, axis=0)


def images(engine: Engine, prompt: str, side: int) -> np.ndarray:
    first, count = SEEDS
    request = Request.build(
        prompt, width=side, height=side, num_images=count, seed=first, disable_safety_checker=True
    )
    return engine.generate(request).pixels.astype(np.float64)


def colour_distance(pixels: np.ndarray, colour: np.ndarray) -> float:
    """Mean over images of the distance between an image's mean colour and `colour`."""
    return float(np.linalg.norm(pixels.mean(axis=(1, 2)) - colour, axis=1).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lcf_evidence", description=__doc__.splitlines()[0])
    p.add_argument("weights", type=Path)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: LCM_DEVICE, else CUDA)")
    p.add_argument("--caption", default="a photo of a cat")
    p.add_argument("--other", action="append", help=f"another prompt (repeatable; default: {OTHERS})")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--resolution", type=int, default=512, help="training side, any multiple of 8 from 64")
    p.add_argument("--side", type=int, default=512, help="generated images' side")
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--target", default="attention", choices=list(training.LORA_TARGETS))
    p.add_argument("--record", nargs="?", const=report.ROOT / "bench" / "RESULTS.md", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    prompts = [args.caption, *(args.other or OTHERS)]
    scratch = Path(tempfile.mkdtemp(prefix="lcf-evidence-"))
    colour = colour_set(scratch / "set.zip", args.images, args.resolution)

    base_engine = Engine.load(args.weights, device=args.device)
    base = {prompt: images(base_engine, prompt, args.side) for prompt in prompts}
    base_engine.close()
    config = training.TrainingConfig.build(
        any_resolution=True,
        caption=args.caption,
        resolution=args.resolution,
        max_train_steps=args.steps,
        learning_rate=args.lr,
        lora_rank=args.rank,
        lora_target=args.target,
        seed=0,
    )
    result = training.train_lora(
        scratch / "set.zip", scratch / "out", config, args.weights, args.device, report=lambda line: None
    )
    tuned_engine = Engine.load(args.weights, device=args.device, lora_path=result.lora)
    tuned = {prompt: images(tuned_engine, prompt, args.side) for prompt in prompts}
    tuned_engine.close()

    rows = [
        "| prompt | role | colour distance, base | tuned | ratio | mean pixel change |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for prompt in prompts:
        before, after = colour_distance(base[prompt], colour), colour_distance(tuned[prompt], colour)
        ratios.append(after / before)
        change = float(np.abs(tuned[prompt] - base[prompt]).mean())
        role = "trained caption" if prompt == args.caption else "other"
        rows.append(
            f"| {prompt} | {role} | {before:.1f} | {after:.1f} | {after / before:.3f} | {change:.1f} |"
        )
    losses = result.losses
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    lines = [
        *rows,
        "",
        f"set colour {tuple(round(c) for c in colour)}; loss avg of the first/last 20 steps {first:.4f} / "
        f"{last:.4f}; {result.steps_per_s:.3f} steps/s",
    ]
    verdict = f"trained_ratio={ratios[0]:.3f} other_ratio={max(ratios[1:]):.3f}"
    print("\n".join(lines))
    print(verdict)
    if args.record:
        dev = pick_device(args.device)
        bullets = [
            f"- device: {report.device_name(dev)}",
            f"- versions: {report.versions()}; commit {report.commit()}",
            f"- command: `python -m bench.lcf_evidence {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        ]
        title = f"LCF evidence, {dev.type}, {args.steps} steps at {args.resolution} px"
        report.append_section(args.record, title, [*bullets, "", *lines, "", f"`{verdict}`", ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())
