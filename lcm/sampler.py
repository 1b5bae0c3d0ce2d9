"""The multistep latent-consistency sampler with embedded guidance.

One UNet pass per step: the guidance scale is not applied as classifier-free guidance (no
negative branch) but fed to the UNet as the w-embedding `timestep_cond`, the model having been
distilled with it. The loop returns to Python between steps, so a cancellation lands within one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from lcm.control import Control


def guidance_embedding(guidance_scale: float | Sequence[float], batch: int, dim: int) -> torch.Tensor:
    """The w-embedding (float32, CPU) with diffusers' convention w = guidance_scale - 1.

    One scale for every row, or one per row (requests served together each keep their own).
    Computed by diffusers' own LCM pipeline code, which uses no pipeline state: a generic
    sinusoidal embedding differs by up to 5e-4 at w * 1000 ~ 7000.
    """
    scales = [guidance_scale] * batch if isinstance(guidance_scale, (int, float)) else list(guidance_scale)
    if len(scales) != batch:
        raise ValueError(f"{len(scales)} guidance scales for {batch} rows")
    w = torch.tensor(scales, dtype=torch.float64).sub(1.0).to(torch.float32)
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so image i depends only on its own seed, on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian latents, drawn per image from its generator."""
    return randn_tensor(shape, generator=generators, device=device, dtype=dtype)


@dataclass(frozen=True)
class StepPlan:
    """Everything one LCM step needs, computed on the host before the loop.

    `scheduler.step` reads device tensors back to the host every step (the next timestep's sign,
    alphas indexed by a device timestep) and copies freshly drawn noise from pageable memory, so
    on CUDA each step waits for the one before. The plan holds plain floats and all the step
    noise, drawn up front in diffusers' order and copied to the device once.
    """

    sample_scale: list[float]  # 1 / sqrt(alpha_t)
    model_scale: list[float]  # sqrt(1 - alpha_t) / sqrt(alpha_t)
    c_skip: list[float]
    c_out: list[float]
    keep: list[float]  # sqrt(alpha_prev)
    fresh: list[float]  # sqrt(1 - alpha_prev)
    noise: Optional[torch.Tensor]  # (steps - 1, N, C, H, W) on the device, None for one step


@dataclass(frozen=True)
class Inpaint:
    """What keeps the unmasked part of an image: diffusers' inpainting method for a 4-channel UNet.

    After step i the latents become (1 - mask) * kept[i] + mask * latents, as
    StableDiffusionInpaintPipeline blends them: outside the mask (0) the input image's latents
    noised to the next timestep, with the noise drawn at the start; after the last step the
    clean image latents. Grey (between 0 and 1) mixes the two.
    """

    mask: torch.Tensor  # (N, 1, h, w) at the latents' size: 1 redraws, 0 keeps
    kept: torch.Tensor  # (steps, N, C, h, w)


def inpaint_targets(
    scheduler: LCMScheduler, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor
) -> Inpaint:
    """The kept latents for every step, computed before the loop with diffusers' own add_noise calls.

    Each is what the inpainting pipeline computes inside its loop (add_noise at timestep i + 1),
    so both step paths blend the same values and neither waits for the device mid-loop.
    """
    ts = scheduler.timesteps
    kept = [scheduler.add_noise(image_latents, noise, ts[i + 1 : i + 2]) for i in range(len(ts) - 1)]
    return Inpaint(mask=mask, kept=torch.stack([*kept, image_latents]))


def planned_step_supported(scheduler: LCMScheduler) -> bool:
    """The plan covers epsilon prediction without thresholding or clipping: this checkpoint's config."""
    config = scheduler.config
    return config.prediction_type == "epsilon" and not config.thresholding and not config.clip_sample


def plan_steps(scheduler: LCMScheduler, generators: list[torch.Generator], latents: torch.Tensor) -> StepPlan:
    """The plan for `scheduler.timesteps`; draws each image's step noise right after its start latents."""
    ts = [int(t) for t in scheduler.timesteps.cpu()]
    alphas = scheduler.alphas_cumprod.cpu().double()
    values: dict[str, list[float]] = {k: [] for k in ("sample", "model", "skip", "out", "keep", "fresh")}
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else t
        alpha = float(alphas[t])
        alpha_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        values["sample"].append(1 / math.sqrt(alpha))
        values["model"].append(math.sqrt(1 - alpha) / math.sqrt(alpha))
        values["skip"].append(float(c_skip))
        values["out"].append(float(c_out))
        values["keep"].append(math.sqrt(alpha_prev))
        values["fresh"].append(math.sqrt(1 - alpha_prev))
    noise = None
    if len(ts) > 1:
        shape = (1, *latents.shape[1:])
        per_image = [
            torch.stack([torch.randn(shape, generator=g, dtype=latents.dtype) for _ in ts[:-1]])
            for g in generators
        ]
        host = torch.cat(per_image, dim=1)  # (steps - 1, N, C, H, W)
        if latents.device.type == "cuda":
            host = host.pin_memory()
        noise = host.to(latents.device, non_blocking=True)
    return StepPlan(
        sample_scale=values["sample"],
        model_scale=values["model"],
        c_skip=values["skip"],
        c_out=values["out"],
        keep=values["keep"],
        fresh=values["fresh"],
        noise=noise,
    )


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    scheduler: LCMScheduler,
    prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    guidance_scale: float | Sequence[float],
    generators: list[torch.Generator],
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
    planned: bool = True,
    prune: Optional[Callable[[], Optional[Sequence[int]]]] = None,
    inpaint: Optional[Inpaint] = None,
    control: Optional[Control] = None,
) -> torch.Tensor:
    """Run the scheduler's timesteps from `latents`; return the final denoised latents.

    The scheduler must already hold its timesteps (set_timesteps); `latents` are the starting
    sample, already scaled (pure noise for text to image, the noised image for image to image).
    `guidance_scale` is one for all rows or one per row. `planned` runs the host-planned step
    (same arithmetic and noise as `scheduler.step`, no device-to-host waits); otherwise
    diffusers' `scheduler.step` runs each step. `prune()`, asked before each step, may name the
    rows (indices into the rows still running) that go on; the others leave the batch, and the
    result holds only the rows that stayed. Each row's arithmetic and noise are its own either way.
    With `inpaint`, each step's latents are blended with the kept image latents, and the result
    is the last step's blend (the last LCM step's sample is its denoised estimate). `control`,
    when given, adds its ControlNet's residuals to the UNet pass of each step it covers.
    """
    batch = latents.shape[0]
    w_embedding = guidance_embedding(guidance_scale, batch, unet.config.time_cond_proj_dim).to(
        device=latents.device, dtype=latents.dtype
    )
    if prompt_embeds.shape[0] != batch:
        prompt_embeds = prompt_embeds.expand(batch, -1, -1)
    plan = (
        plan_steps(scheduler, generators, latents) if planned and planned_step_supported(scheduler) else None
    )
    noise = plan.noise if plan is not None else None
    denoised = latents
    for i, t in enumerate(scheduler.timesteps):  # on the device: the UNet takes them without a copy
        kept = prune() if prune is not None else None
        if kept is not None and len(kept) < latents.shape[0]:
            rows = torch.tensor(list(kept), dtype=torch.long, device=latents.device)
            latents, denoised = latents.index_select(0, rows), denoised.index_select(0, rows)
            prompt_embeds = prompt_embeds.index_select(0, rows)
            w_embedding = w_embedding.index_select(0, rows)
            noise = noise.index_select(1, rows) if noise is not None else None
            if inpaint is not None:
                inpaint = Inpaint(inpaint.mask.index_select(0, rows), inpaint.kept.index_select(1, rows))
            generators = [generators[k] for k in kept]
            if not kept:
                return denoised
            if control is not None:
                control.select(rows)
        residuals = control.residuals(i, latents, t, prompt_embeds) if control is not None else None
        extra = {}
        if residuals is not None:  # only then: a compiled UNet keeps its plain signature on other steps
            extra = {
                "down_block_additional_residuals": residuals[0],
                "mid_block_additional_residual": residuals[1],
            }
        model_pred = unet(
            latents,
            t,
            timestep_cond=w_embedding,
            encoder_hidden_states=prompt_embeds,
            return_dict=False,
            **extra,
        )[0]
        if plan is None:
            latents, denoised = scheduler.step(
                model_pred, t, latents, generator=generators, return_dict=False
            )
        else:
            original = latents * plan.sample_scale[i] - model_pred * plan.model_scale[i]
            denoised = original * plan.c_out[i] + latents * plan.c_skip[i]
            last = i == len(plan.c_out) - 1
            latents = denoised if last else denoised * plan.keep[i] + noise[i] * plan.fresh[i]
        if inpaint is not None:
            latents = (1 - inpaint.mask) * inpaint.kept[i] + inpaint.mask * latents
        if on_step is not None:
            on_step(i, t)
    return latents if inpaint is not None else denoised
