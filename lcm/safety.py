"""The checkpoint's safety checker, as a verdict per image; the policy lives in the engine."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor


@torch.no_grad()
def flag_nsfw(
    feature_extractor: CLIPImageProcessor,
    checker: StableDiffusionSafetyChecker,
    pixels: np.ndarray,
    device: torch.device,
) -> list[bool]:
    """One verdict per (H, W, 3) uint8 image, all images in one checker pass.

    diffusers' checker also blacks out flagged images in the array it is given; it gets a
    throwaway array, since flagged images are left out rather than returned black.
    """
    clip_input = feature_extractor([Image.fromarray(p) for p in pixels], return_tensors="pt").pixel_values
    _, flags = checker(
        images=np.zeros((len(pixels), 1)), clip_input=clip_input.to(device=device, dtype=checker.dtype)
    )
    return [bool(f) for f in flags]
