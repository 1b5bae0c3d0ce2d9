"""Where each mode starts the sampler: its first latents, and what each step must keep or add.

Text to image starts from noise; image to image from the encoded image noised to the first
timestep; inpainting also keeps the unmasked part at every step; a control image adds the
ControlNet's residuals. A new mode extends `prepare` and leaves the sampler alone. Each draws
from its images' generators in diffusers' order, so that every image matches diffusers' own
pipeline for that mode run with that image's seed alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lcm import control, sampler
from lcm.model import Model
from lcm.params import Request


@dataclass
class Start:
    """A batch's first latents, its rows' inpainting targets and ControlNet guide (None: not that
    mode), and each request's Canny edge map (None without a control image)."""

    latents: torch.Tensor
    inpaint: Optional[sampler.Inpaint]
    control: Optional[control.Control]
    edges: list[Optional[Image.Image]]


def prepare(
    model: Model, requests: list[Request], scheduler: LCMScheduler, generators: list[list[torch.Generator]]
) -> Start:
    """The start of requests that share a batching.shape_key (so all or none are masked, and all or
    none have a control image), the requests' rows one after another."""
    first = requests[0]
    inpaint = None
    if first.mask is not None:
        made = [inpaint_start(model, r, scheduler, g) for r, g in zip(requests, generators, strict=True)]
        starts = [start for start, _ in made]
        inpaint = sampler.Inpaint(
            torch.cat([keep.mask for _, keep in made]), torch.cat([keep.kept for _, keep in made], dim=1)
        )
    else:
        starts = [start_latents(model, r, scheduler, g) for r, g in zip(requests, generators, strict=True)]
    edges = [
        control.canny_edges(r.control_image, r.canny_low_threshold, r.canny_high_threshold)
        if r.control_image is not None
        else None
        for r in requests
    ]
    guide = None
    if first.control_image is not None:
        sizes = [r.num_images for r in requests]
        guide = control.Control(
            model.controlnet,
            control.condition(
                _control_processor(model.vae_scale_factor), edges, sizes, model.device, model.dtype
            ),
            control.step_scales(
                len(scheduler.timesteps),
                first.controlnet_conditioning_scale,
                first.control_guidance_start,
                first.control_guidance_end,
            ),
        )
    latents = torch.cat(starts) if len(starts) > 1 else starts[0]
    return Start(latents, inpaint, guide, edges)


def start_latents(
    model: Model, request: Request, scheduler: LCMScheduler, generators: list[torch.Generator]
) -> torch.Tensor:
    """Pure noise for text to image; for image to image, the encoded image noised to the first timestep.

    Draws from each image's generator in diffusers' order (VAE posterior, then noise), so
    each image matches diffusers' img2img pipeline run with that image's seed alone.
    """
    if request.image is None:
        shape = (
            request.num_images,
            model.pipe.unet.config.in_channels,
            request.height // model.vae_scale_factor,
            request.width // model.vae_scale_factor,
        )
        noise = sampler.initial_noise(generators, shape, model.device, model.dtype)
        return noise * scheduler.init_noise_sigma
    clean, noise, _ = _encode_image(model, request, generators)
    return _noised(clean, noise, scheduler)


def inpaint_start(
    model: Model, request: Request, scheduler: LCMScheduler, generators: list[torch.Generator]
) -> tuple[torch.Tensor, sampler.Inpaint]:
    """A masked request's start latents and what keeps its unmasked part, as diffusers' inpainting
    pipeline (4-channel UNet) makes them.

    At prompt_strength 1 it starts from pure noise, as that pipeline does. Each generator
    then draws one more latent-sized sample, which the start discards: that pipeline encodes
    the masked image with the same generator (for a 9-channel UNet's input), so the step
    noise after it comes from the same place in the stream as there.
    """
    clean, noise, posterior = _encode_image(model, request, generators)
    for g in generators:
        posterior.sample(generator=g)
    if request.prompt_strength == 1.0:
        start = noise * scheduler.init_noise_sigma
    else:
        start = _noised(clean, noise, scheduler)
    scale = model.vae_scale_factor
    pixels = _mask_processor(scale).preprocess(request.mask, height=request.height, width=request.width)
    latent_size = (request.height // scale, request.width // scale)
    mask = F.interpolate(pixels, size=latent_size).to(device=model.device, dtype=model.dtype)
    mask = mask.expand(request.num_images, -1, -1, -1)
    return start, sampler.inpaint_targets(scheduler, clean, noise, mask)


def _encode_image(
    model: Model, request: Request, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The input image's scaled latents sampled per image, the start noise, and the VAE posterior."""
    pipe = model.pipe
    pixels = pipe.image_processor.preprocess(request.image).to(device=model.device, dtype=pipe.vae.dtype)
    posterior = pipe.vae.encode(pixels).latent_dist  # encoded once, sampled per image
    clean = torch.cat([posterior.sample(generator=g) for g in generators]).to(model.dtype)
    clean = clean * pipe.vae.config.scaling_factor
    noise = sampler.initial_noise(generators, tuple(clean.shape), model.device, model.dtype)
    return clean, noise, posterior


def _noised(clean: torch.Tensor, noise: torch.Tensor, scheduler: LCMScheduler) -> torch.Tensor:
    noised = scheduler.add_noise(clean, noise, scheduler.timesteps[:1].repeat(clean.shape[0]))
    return noised.contiguous()  # the VAE's channels_last output would give the UNet other strides


@functools.cache
def _mask_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """StableDiffusionInpaintPipeline's mask processor, except that it does not binarize: grey is kept."""
    return VaeImageProcessor(
        vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=False, do_convert_grayscale=True
    )


@functools.cache
def _control_processor(vae_scale_factor: int) -> VaeImageProcessor:
    return control.image_processor(vae_scale_factor)
