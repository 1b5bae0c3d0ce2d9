"""Cog training adapter: typed inputs in, one call into lcm.training, the weights archive out.

`cog train -i input_images=@photos.zip -i caption="..."`; Replicate's trainings run it the same
way and hand the returned archive to the new version's `Predictor.setup(weights=...)`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import shutil
import tempfile
from typing import Optional

from cog import BaseModel, Input, Path

from lcm.training import TrainingConfig, train_lora
from lcm.worker import EngineThread
from predict import take_downloads  # also makes Cog record its downloads, as for predictions

# Literals for cog build's static parser; tests/test_training.py holds them to lcm.training.TRAIN_INPUTS.
RESOLUTIONS = [512, 768]
LORA_TARGETS = ["attention", "all"]


class TrainingOutput(BaseModel):
    weights: Path


@functools.cache
def _trainer() -> EngineThread:
    """The one thread every training runs on, one at a time, in arrival order.

    cog.yaml's concurrency (8 slots, for batching predictions) applies to trainings too, and each
    training loads its own fp32 pipeline and takes the whole device: eight at once would run out
    of memory. A cancelled training keeps the thread until it has stopped at its next step, so the
    next one never overlaps it.
    """
    return EngineThread("lcm-train")


_queued = 0  # trainings submitted and not yet finished (all on Cog's one event loop)


async def train(
    input_images: Path = Input(
        description="A zip or tar (.tar, .tar.gz, .tar.bz2, .tar.xz) of PNG, JPEG or WebP images (each at most 50 megapixels and 50 MB; at most 1000 files, 1 GB unpacked). A .txt beside an image (same name) is its caption.",
    ),
    caption: str = Input(
        description="Caption of every image without its own .txt (at most 75 CLIP tokens). Empty: every image needs a .txt.",
        default="",
    ),
    resolution: int = Input(
        description="Side of the square training images in pixels (each image is scaled to cover it and centre-cropped): 512 or 768. Default 512.",
        default=512,
        choices=RESOLUTIONS,
    ),
    max_train_steps: int = Input(
        description="Optimizer steps: 1 to 20000. Default 500.", default=500, ge=1, le=20000
    ),
    learning_rate: float = Input(
        description="AdamW learning rate for the LoRA: 0.000001 to 0.01. Default 0.0001.",
        default=1e-4,
        ge=1e-6,
        le=1e-2,
    ),
    lora_rank: int = Input(
        description="LoRA rank (alpha equals it, so its scale is 1): 1 to 128. Default 16; larger: more capacity, a larger file.",
        default=16,
        ge=1,
        le=128,
    ),
    lora_target: str = Input(
        description="UNet layers the LoRA adapts: attention (the attention projections) or all (also feed-forward, resnet convolutions, samplers and time projections). Default attention.",
        default="attention",
        choices=LORA_TARGETS,
    ),
    batch_size: int = Input(description="Images per step: 1 to 16. Default 1.", default=1, ge=1, le=16),
    seed: Optional[int] = Input(
        description="Random seed, 0 to 4294967295: the same seed, images and settings give the same LoRA. Empty: random, logged.",
        default=None,
        ge=0,
        le=4294967295,
    ),
    skip_interval: int = Input(
        description="LCF's skipping interval k, in training timesteps between the online point t_{n+k} and the target's t_n: 1 to 250. Default 20 (the paper's; a 50-step schedule).",
        default=20,
        ge=1,
        le=250,
    ),
    ema_rate: float = Input(
        description="EMA rate mu of the target network (the LoRA weights' moving average): 0 to 0.9999. Default 0.95 (the paper's).",
        default=0.95,
        ge=0.0,
        le=0.9999,
    ),
    guidance_scale_min: float = Input(
        description="Lower end of the guidance scale drawn each step (this service's convention, w + 1): 1 to 20, at most guidance_scale_max. Default 3 (the paper's w = 2).",
        default=3.0,
        ge=1.0,
        le=20.0,
    ),
    guidance_scale_max: float = Input(
        description="Upper end of the guidance scale drawn each step (w + 1): 1 to 20. Default 15 (the paper's w = 14).",
        default=15.0,
        ge=1.0,
        le=20.0,
    ),
) -> TrainingOutput:
    """Fine-tune a LoRA with latent consistency fine-tuning and return it as one tar archive.

    A coroutine, as predict() is: the image's COG_MAX_CONCURRENCY (cog.yaml's concurrency) applies
    to trainings too, and Cog refuses a sync function with more than one slot. Trainings queue for
    one thread (`_trainer`); Cog cancels with asyncio.CancelledError at the await, which sets the
    training's flag, and the training stops at its next step (or never starts) before this returns.
    """
    global _queued
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    inputs = {name: value for name, value in locals().items() if name != "input_images"}
    take_downloads({"input_images": input_images})
    config = TrainingConfig.build(**inputs)
    log = logging.getLogger("lcm")
    log.info("training seed=%d", config.seed)
    # Cog files a log line with the training whose context writes it: the training thread's lines
    # are written on this coroutine's loop, in its context.
    loop, context = asyncio.get_running_loop(), contextvars.copy_context()

    def report(line: str) -> None:
        loop.call_soon_threadsafe(log.info, "%s", line, context=context)

    out_dir = Path(tempfile.mkdtemp(prefix="lcm-train-"))
    if _queued:
        log.info("waiting for %d earlier training(s) to finish", _queued)
    job = _trainer().submit(
        lambda flag: train_lora(input_images, out_dir, config, cancel=flag, report=report)
    )
    _queued += 1
    try:
        result = await job.outcome()
    except BaseException:
        await job.cancelled()  # the training stops at its next step; then its files go
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        _queued -= 1
    return TrainingOutput(weights=Path(result.archive))
