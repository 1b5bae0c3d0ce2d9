"""One batch of requests through the model: text -> start latents -> sampler -> pixels -> verdicts.

Runs on the engine thread (lcm.engine), under torch.inference_mode, for requests that share a
batching.shape_key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from lcm import images, prompts, safety, sampler, starts
from lcm.model import Model
from lcm.params import Request
from lcm.worker import CancelFlag

StepCallback = Callable[[int, torch.Tensor], None]
# FreeU's scales for Stable Diffusion v1-5, as diffusers' documentation passes them to enable_freeu
# ("FreeU" in its image-quality guide, which takes each model's values from the authors' repository,
# github.com/ChenyangSi/FreeU).
FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6}


@dataclass
class Generation:
    """What one request produced, with the time each stage took (seconds)."""

    request: Request
    pixels: np.ndarray  # (N, H, W, 3) uint8
    num_tokens: int
    nsfw: list[bool]  # all False when the safety checker did not run
    timings: dict[str, float] = field(default_factory=dict)
    eager: Optional[list[str]] = None  # with compile or OpenVINO: the modules this request ran eagerly
    batch: tuple[int, int] = (1, 1)  # the batch it ran in: requests, images
    edges: Optional[Image.Image] = None  # the canny edge map the ControlNet was given, with a control image
    weighted: bool = False  # the prompt was encoded by compel (Compel's weighting syntax)


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


@torch.inference_mode()
def generate_batch(
    model: Model,
    requests: list[Request],
    cancels: list[CancelFlag],
    on_step: Optional[StepCallback] = None,
) -> list[Optional[Generation]]:
    """Requests that share a batching.shape_key, in one set of UNet passes.

    Each request keeps its own prompt embedding, its images their own CPU generators, its
    guidance its own rows of the w-embedding, and its safety setting. A request whose flag
    is set leaves the batch at the next step (None in its place); the others go on.
    `on_step(i, t)` is called after each step.
    """
    sizes = [r.num_images for r in requests]
    owners = [k for k, n in enumerate(sizes) for _ in range(n)]  # the request of each running row
    for module in model.compiled:
        module.eager_calls = 0
        # The compiled UNet was traced without FreeU or a request's LoRA: such a batch runs it eagerly.
        module.eager_only = (requests[0].freeu or requests[0].lora is not None) and module.name == "unet"
    clock = _Clock(model.device)
    pipe, first = model.pipe, requests[0]
    # The same LoRA and lora_scale for all (the shape key); before the text encoder, which it may adapt.
    model.adapters.activate(pipe, model.lora, first.lora, first.lora_scale)
    if first.lora is not None:
        clock.lap("lora")  # loading it the first time, else switching to it
    embeddings = [
        prompts.encode_prompt(
            pipe.tokenizer, pipe.text_encoder, r.prompt, model.device, r.clip_skip, r.compel
        )
        for r in requests
    ]
    clock.lap("text")
    scheduler = model.scheduler(first)  # the same timesteps for all: they share a shape key
    generators = [sampler.generators_for(r.seeds) for r in requests]
    start = starts.prepare(model, requests, scheduler, generators)
    clock.lap("prepare")

    def prune() -> Optional[list[int]]:
        keep = [i for i, k in enumerate(owners) if not cancels[k].is_set()]
        if len(keep) == len(owners):
            return None
        owners[:] = [owners[i] for i in keep]
        return keep

    if first.freeu:  # the whole batch: FreeU is in the shape key
        pipe.unet.enable_freeu(**FREEU)
    try:
        denoised = sampler.sample(
            pipe.unet,
            scheduler,
            _rows([e.embeds for e in embeddings], sizes),
            start.latents,
            [r.guidance_scale for r in requests for _ in range(r.num_images)],
            [g for per_request in generators for g in per_request],
            on_step,
            planned=model.accel.planned_step,
            prune=prune,
            inpaint=start.inpaint,
            control=start.control,
        )
    finally:
        pipe.unet.disable_freeu()
    kept = prune()  # flags set during the last step: decode nothing for them
    if kept is not None:
        denoised = denoised[kept]
    clock.lap("unet")
    pixels = np.zeros((0, first.height, first.width, 3), dtype=np.uint8)
    if owners:
        if first.fast_decode:  # TAESD is small: the whole batch in one pass
            pixels = images.decode(model.taesd, denoised, chunk=len(owners))
        else:
            pixels = images.decode(pipe.vae, denoised, chunk=model.accel.decode_chunk)
    clock.lap("vae")
    nsfw = [False] * len(owners)
    checked = [i for i, k in enumerate(owners) if requests[k].safety_checker]
    if checked:
        verdicts = safety.flag_nsfw(
            pipe.feature_extractor, pipe.safety_checker, pixels[checked], model.device
        )
        for i, verdict in zip(checked, verdicts, strict=True):
            nsfw[i] = verdict
        clock.lap("safety")
    eager = [m.name for m in model.compiled if m.eager_calls] if model.compiled else None
    batch = (len(requests), sum(sizes))
    results: list[Optional[Generation]] = []
    for k, (request, embedding) in enumerate(zip(requests, embeddings, strict=True)):
        rows = [i for i, owner in enumerate(owners) if owner == k]
        results.append(
            Generation(
                request,
                pixels[rows],
                embedding.num_tokens,
                [nsfw[i] for i in rows],
                dict(clock.timings),
                eager,
                batch,
                start.edges[k],
                embedding.weighted,
            )
            if rows
            else None
        )
    return results


def _rows(embeds: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Each request's prompt embedding repeated for its images, the requests one after another."""
    if len(embeds) == 1:
        return embeds[0]  # the sampler expands it without a copy
    return torch.cat([e.expand(n, -1, -1) for e, n in zip(embeds, sizes, strict=True)])
