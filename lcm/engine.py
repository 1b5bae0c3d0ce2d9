"""One loaded model, many requests: request -> embeddings -> latents -> images -> files."""

from __future__ import annotations

import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import AutoencoderTiny, LCMScheduler

from lcm import accel, images, prompts, safety, sampler
from lcm.errors import InputError, LCMError
from lcm.loading import default_dtype, load_pipeline, load_tiny_decoder, pick_device
from lcm.params import Request
from lcm.weights import weights_dir

log = logging.getLogger("lcm")


@dataclass
class Generation:
    """What one request produced, with the time each stage took (seconds)."""

    request: Request
    pixels: np.ndarray  # (N, H, W, 3) uint8
    num_tokens: int
    nsfw: list[bool]  # all False when the safety checker did not run
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

    def __init__(
        self,
        pipe,
        device: torch.device,
        dtype: torch.dtype,
        path: Path,
        taesd: Optional[AutoencoderTiny] = None,
        settings: Optional[accel.Accel] = None,
    ) -> None:
        self.pipe = pipe
        self.accel = settings or accel.Accel()
        self.taesd = taesd  # fast_decode's tiny decoder, when the weights directory has one
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
        pipe = load_pipeline(resolved, dev, dtype)
        taesd = load_tiny_decoder(resolved, dev, dtype)
        settings = accel.Accel.from_env(dev, dtype, pipe.vae.config)
        accel.apply(pipe, taesd, settings)
        accel.compile_modules(pipe, settings)
        engine = cls(pipe, dev, dtype, resolved, taesd, settings)
        loaded = time.perf_counter() - start
        if settings.compile and settings.warmup:  # compile for the default request now, not in the first one
            engine.generate(Request.build("warm-up", seed=0))
        log.info(
            "loaded %s on %s (%s, %s) in %.1fs, warm-up %.1fs",
            resolved,
            dev,
            str(dtype).removeprefix("torch."),
            settings.describe(),
            loaded,
            time.perf_counter() - start - loaded,
        )
        return engine

    def scheduler(self, request: Request) -> LCMScheduler:
        """A fresh scheduler per request (schedulers keep step state), holding this request's timesteps.

        With an input image, prompt_strength keeps only the lower part of the original schedule.
        """
        scheduler = LCMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(
            request.num_inference_steps,
            device=self.device,
            original_inference_steps=request.lcm_origin_steps,
            strength=request.prompt_strength if request.image is not None else 1.0,
        )
        return scheduler

    def check(self, request: Request) -> None:
        """The limits that depend on the loaded model rather than on the request alone."""
        layers = self.pipe.text_encoder.config.num_hidden_layers
        if request.clip_skip >= layers:
            raise InputError(
                "clip_skip", request.clip_skip, f"an integer from 0 to {layers - 1} for this model"
            )
        if request.fast_decode and self.taesd is None:
            raise LCMError(
                f"fast_decode needs the TAESD decoder in {self.weights_dir / 'taesd'}, which is missing: "
                "run scripts/download-weights (it fetches madebyollin/taesd), or leave fast_decode off"
            )
        if request.safety_checker and self.pipe.safety_checker is None:
            raise LCMError(
                "this checkpoint has no safety checker: set disable_safety_checker to run without one"
            )

    def start_latents(
        self, request: Request, scheduler: LCMScheduler, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Pure noise for text to image; for image to image, the encoded image noised to the first timestep.

        Draws from each image's generator in diffusers' order (VAE posterior, then noise), so
        each image matches diffusers' img2img pipeline run with that image's seed alone.
        """
        pipe, n = self.pipe, request.num_images
        if request.image is None:
            shape = (
                n,
                pipe.unet.config.in_channels,
                request.height // self.vae_scale_factor,
                request.width // self.vae_scale_factor,
            )
            noise = sampler.initial_noise(generators, shape, self.device, self.dtype)
            return noise * scheduler.init_noise_sigma
        pixels = pipe.image_processor.preprocess(request.image).to(device=self.device, dtype=pipe.vae.dtype)
        posterior = pipe.vae.encode(pixels).latent_dist  # encoded once, sampled per image
        clean = torch.cat([posterior.sample(generator=g) for g in generators]).to(self.dtype)
        clean = clean * pipe.vae.config.scaling_factor
        noise = sampler.initial_noise(generators, tuple(clean.shape), self.device, self.dtype)
        return scheduler.add_noise(clean, noise, scheduler.timesteps[:1].repeat(n))

    def generate(
        self, request: Request, on_step: Optional[Callable[[int, torch.Tensor], None]] = None
    ) -> Generation:
        """Every image of the request, with the safety checker's verdicts when it is on.

        Running out of device memory fails this request only: the memory is given back and the
        error says what to ask for instead.
        """
        self.check(request)
        try:
            return self._generate(request, on_step)
        except torch.OutOfMemoryError as exc:
            log.warning("out of memory: %s", exc)
            self.free_memory()
            raise LCMError(
                f"out of {self.device.type.upper()} memory generating {request.num_images} image(s) at "
                f"{request.width}x{request.height}: try a smaller size or fewer images"
            ) from None

    def free_memory(self) -> None:
        """Give cached allocations back to the device after a failure."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generate(
        self, request: Request, on_step: Optional[Callable[[int, torch.Tensor], None]]
    ) -> Generation:
        clock = _Clock(self.device)
        pipe = self.pipe
        embedding = prompts.encode_prompt(
            pipe.tokenizer, pipe.text_encoder, request.prompt, self.device, request.clip_skip
        )
        clock.lap("text")
        generators = sampler.generators_for(request.seeds)
        scheduler = self.scheduler(request)
        latents = self.start_latents(request, scheduler, generators)
        clock.lap("prepare")
        denoised = sampler.sample(
            pipe.unet,
            scheduler,
            embedding.embeds,
            latents,
            request.guidance_scale,
            generators,
            on_step,
            fused=self.accel.fused_step,
        )
        clock.lap("unet")
        if request.fast_decode:  # TAESD is small: the whole batch in one pass
            pixels = images.decode(self.taesd, denoised, chunk=request.num_images)
        else:
            pixels = images.decode(pipe.vae, denoised, chunk=self.decode_chunk)
        clock.lap("vae")
        nsfw = [False] * len(pixels)
        if request.safety_checker:
            nsfw = safety.flag_nsfw(
                pipe.feature_extractor, pipe.safety_checker, pixels, self.device, self.dtype
            )
            clock.lap("safety")
        return Generation(request, pixels, embedding.num_tokens, nsfw, clock.timings)

    @property
    def decode_chunk(self) -> int:
        """Images per VAE decoder pass: the decoder's activations at 1024 px are ~3 GB per image in fp32."""
        return 8 if self.device.type == "cuda" else 1

    def generate_files(self, request: Request, out_dir: str | os.PathLike) -> list[Path]:
        """Generate, leave out flagged images, write the rest in parallel; log one line for the request.

        Raises LCMError when the safety checker flags every image, so a request never
        silently returns nothing.
        """
        generation = self.generate(request)
        start = time.perf_counter()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        kept = [
            (s, p)
            for s, p, bad in zip(request.seeds, generation.pixels, generation.nsfw, strict=True)
            if not bad
        ]

        def write(item: tuple[int, np.ndarray]) -> Path:
            seed, pixels = item
            stem = Path(out_dir) / f"lcm-{seed}"
            return images.save_image(
                pixels, stem, request.output_format, request.output_quality, request.metadata(seed)
            )

        with ThreadPoolExecutor(max_workers=max(1, min(len(kept), os.cpu_count() or 1))) as pool:
            paths = list(pool.map(write, kept))
        generation.timings["encode"] = time.perf_counter() - start
        self.log(generation)
        if not kept:
            raise LCMError(
                f"the safety checker flagged all {request.num_images} image(s) as possibly NSFW, so none is "
                "returned: try another seed or prompt"
            )
        return paths

    def log(self, generation: Generation) -> None:
        """One line an operator can act on: seed, size, steps, device, dtype, time per stage."""
        r = generation.request
        stages = " ".join(f"{k}={v:.3f}s" for k, v in generation.timings.items())
        log.info(
            "seed=%d images=%d size=%dx%d steps=%d guidance=%.2f origin_steps=%d tokens=%d mode=%s "
            "flagged=%s device=%s dtype=%s %s",
            r.seed,
            r.num_images,
            r.width,
            r.height,
            r.num_inference_steps,
            r.guidance_scale,
            r.lcm_origin_steps,
            generation.num_tokens,
            "img2img" if r.image is not None else "txt2img",
            sum(generation.nsfw) if r.safety_checker else "off",
            self.device,
            str(self.dtype).removeprefix("torch."),
            stages,
        )
