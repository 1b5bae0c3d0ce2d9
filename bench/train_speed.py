"""Training speed: LCF steps per second on a checkpoint, with a flat-colour image set made here.

python -m bench.train_speed CHECKPOINT_DIR --resolution 512 --steps 20 [--images 8] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

from lcm import training


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--resolution", type=int, default=512, help="pixels, any multiple of 8 from 64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target", default="attention", choices=list(training.LORA_TARGETS))
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: LCM_DEVICE, else CUDA)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scratch = Path(tempfile.mkdtemp(prefix="train-speed-"))
    with zipfile.ZipFile(scratch / "set.zip", "w") as zf:
        for i in range(args.images):
            out = io.BytesIO()
            Image.new("RGB", (args.resolution, args.resolution), (200, 40 + i, 40)).save(out, format="PNG")
            zf.writestr(f"{i}.png", out.getvalue())
    config = training.TrainingConfig.build(
        any_resolution=True,
        caption="a red square",
        resolution=args.resolution,
        max_train_steps=args.steps,
        lora_rank=args.rank,
        lora_target=args.target,
        seed=0,
    )
    result = training.train_lora(scratch / "set.zip", scratch / "out", config, args.checkpoint, args.device)
    print(
        f"checkpoint={args.checkpoint} resolution={args.resolution} steps={args.steps} images={args.images} "
        f"rank={args.rank} target={args.target} steps_per_s={result.steps_per_s:.4f} "
        f"lora_bytes={result.lora.stat().st_size}"
    )


if __name__ == "__main__":
    main()
