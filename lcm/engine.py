"""One loaded model, many requests: request -> embeddings -> latents -> images -> files."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import LCMScheduler

from lcm import images, prompts, sampler
from lcm.loading import default_dtype, load_pipeline, pick_device
from lcm.params import Request
from lcm.weights import weights_dir

log = logging.getLogger("lcm")


@dataclass
class Generation:
    """What one request produced, with the time each stage took (seconds)."""

    request: Request
    pixels: np.ndarray  # (N, H, W, 3) uint8
    num_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Stage timings; on CUDA it waits for the device at stage ends only, never inside the step loop."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now


class Engine:
    """The loaded components and the device they live on; generate() is not thread-safe."""

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype, path: Path) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.weights_dir = path
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str | None = None) -> "Engine":
        """Load from a local weights directory (default: LCM_WEIGHTS_DIR, else weights/)."""
        start = time.perf_counter()
        resolved = weights_dir(path)
        dev = pick_device(device)
        dtype = default_dtype(dev)
        engine = cls(load_pipeline(resolved, dev, dtype), dev, dtype, resolved)
        log.info(
            "loaded %s on %s (%s) in %.1fs",
            resolved,
            dev,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - start,
        )
        return engine

    def scheduler(self, request: Request) -> LCMScheduler:
        """A fresh scheduler per request (schedulers keep step state), holding this request's timesteps."""
        scheduler = LCMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(
            request.num_inference_steps, device=self.device, original_inference_steps=request.lcm_origin_steps
        )
        return scheduler

    def generate(
        self, request: Request, on_step: Optional[Callable[[int, torch.Tensor], None]] = None
    ) -> Generation:
        """Text to image for every seed of the request."""
        clock = _Clock(self.device)
        pipe = self.pipe
        embedding = prompts.encode_prompt(pipe.tokenizer, pipe.text_encoder, request.prompt, self.device)
        clock.lap("text")
        generators = sampler.generators_for(request.seeds)
        scheduler = self.scheduler(request)
        shape = (
            request.num_images,
            pipe.unet.config.in_channels,
            request.height // self.vae_scale_factor,
            request.width // self.vae_scale_factor,
        )
        latents = (
            sampler.initial_noise(generators, shape, self.device, self.dtype) * scheduler.init_noise_sigma
        )
        denoised = sampler.sample(
            pipe.unet, scheduler, embedding.embeds, latents, request.guidance_scale, generators, on_step
        )
        clock.lap("unet")
        pixels = images.decode(pipe.vae, denoised, chunk=self.decode_chunk)
        clock.lap("vae")
        return Generation(request, pixels, embedding.num_tokens, clock.timings)

    @property
    def decode_chunk(self) -> int:
        """Images per VAE decoder pass: the decoder's activations at 1024 px are ~3 GB per image in fp32."""
        return 8 if self.device.type == "cuda" else 1

    def generate_files(self, request: Request, out_dir: str | os.PathLike) -> list[Path]:
        """Generate and write one PNG per image into out_dir; log one line for the request."""
        generation = self.generate(request)
        start = time.perf_counter()
        paths = []
        for seed, pixels in zip(request.seeds, generation.pixels, strict=True):
            path = Path(out_dir) / f"lcm-{seed}.png"
            images.save_png(pixels, path)
            paths.append(path)
        generation.timings["encode"] = time.perf_counter() - start
        self.log(generation)
        return paths

    def log(self, generation: Generation) -> None:
        """One line an operator can act on: seed, size, steps, device, dtype, time per stage."""
        r = generation.request
        stages = " ".join(f"{k}={v:.3f}s" for k, v in generation.timings.items())
        log.info(
            "seed=%d images=%d size=%dx%d steps=%d guidance=%.2f origin_steps=%d tokens=%d "
            "device=%s dtype=%s %s",
            r.seed,
            r.num_images,
            r.width,
            r.height,
            r.num_inference_steps,
            r.guidance_scale,
            r.lcm_origin_steps,
            generation.num_tokens,
            self.device,
            str(self.dtype).removeprefix("torch."),
            stages,
        )
