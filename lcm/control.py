"""The canny ControlNet: edge maps from control images, and the residuals it adds to each UNet pass.

The semantics are those of diffusers' StableDiffusionControlNetPipeline: the control image is the
edge map as RGB in [0, 1] (its `control_image_processor`, no normalisation), and step i of n gets
the ControlNet's residuals scaled by controlnet_conditioning_scale when it lies wholly inside
[control_guidance_start, control_guidance_end] as fractions of the steps, and none otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image


def canny_edges(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges of the image's luma, as a white-on-black RGB image of the same size."""
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def step_scales(steps: int, scale: float, start: float, end: float) -> list[float]:
    """The conditioning scale of each step: diffusers' `controlnet_keep` times the scale.

    Step i of n is kept unless i / n < start or (i + 1) / n > end, the pipeline's own test.
    """
    keep = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
    return [scale * k for k in keep]


def condition(
    processor: VaeImageProcessor,
    edges: Sequence[Image.Image],
    sizes: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ControlNet's conditioning rows: each request's edge map repeated for its images."""
    rows = [
        processor.preprocess(e, height=e.height, width=e.width)
        .to(dtype=torch.float32)
        .repeat_interleave(n, dim=0)
        for e, n in zip(edges, sizes, strict=True)
    ]
    return torch.cat(rows).to(device=device, dtype=dtype)


def image_processor(vae_scale_factor: int) -> VaeImageProcessor:
    """StableDiffusionControlNetPipeline's processor for control images: RGB, [0, 1], no normalising."""
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)


@dataclass
class Control:
    """What the sampler needs to add the ControlNet to each step: the model, its rows, its scales."""

    model: ControlNetModel
    cond: torch.Tensor  # (N, 3, H, W) edge maps in [0, 1]
    scales: list[float]  # per step; 0 skips the ControlNet that step (its residuals would be zeros)

    def residuals(
        self, step: int, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> Optional[tuple[list[torch.Tensor], torch.Tensor]]:
        """The down-block and mid-block residuals for this step, or None where the ControlNet is off."""
        if self.scales[step] == 0.0:
            return None
        down, mid = self.model(
            latents,
            t,
            encoder_hidden_states=prompt_embeds,
            controlnet_cond=self.cond,
            conditioning_scale=self.scales[step],
            return_dict=False,
        )
        return list(down), mid

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (the requests still running)."""
        self.cond = self.cond.index_select(0, rows)
