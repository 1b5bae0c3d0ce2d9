"""Training speed: LCF steps per second on a checkpoint, with a one-colour image set made here.

python -m bench.train_speed CHECKPOINT_DIR --resolution 512 --steps 20 [--images 8] [--device cuda]

steps_per_s counts the steps after --warmup untimed ones (first steps allocate and autotune), from
the time each step's progress line is written; peak_gib is the device's peak allocation (CUDA).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.lcf_evidence import colour_set
from lcm import training


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--resolution", type=int, default=512, help="pixels, any multiple of 8 from 64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="attention", choices=list(training.LORA_TARGETS))
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: LCM_DEVICE, else CUDA)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scratch = Path(tempfile.mkdtemp(prefix="train-speed-"))
    colour_set(scratch / "set.zip", args.images, args.resolution)
    config = training.TrainingConfig.build(
        any_resolution=True,
        caption="an orange square",
        resolution=args.resolution,
        max_train_steps=args.steps,
        lora_rank=args.rank,
        lora_target=args.target,
        seed=0,
    )
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    stamps: list[float] = []

    def report(line: str) -> None:
        stamps.append(time.perf_counter())
        logging.getLogger("lcm").info("%s", line)

    result = training.train_lora(
        scratch / "set.zip", scratch / "out", config, args.checkpoint, args.device, report=report
    )
    step_stamps = stamps[-args.steps :]  # each step's line; the first line is the loading one
    speed = result.steps_per_s
    if args.warmup:
        speed = (args.steps - args.warmup) / (step_stamps[-1] - step_stamps[args.warmup - 1])
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    peak = f" peak_gib={peak_bytes / 2**30:.1f}" if peak_bytes else ""
    print(
        f"checkpoint={args.checkpoint} resolution={args.resolution} steps={args.steps} warmup={args.warmup} "
        f"images={args.images} rank={args.rank} target={args.target} "
        f"steps_per_s={speed:.4f} lora_bytes={result.lora.stat().st_size}{peak}"
    )


if __name__ == "__main__":
    main()
