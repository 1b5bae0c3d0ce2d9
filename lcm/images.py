"""Latents -> pixels -> files."""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

PNG_COMPRESS_LEVEL = 6  # Pillow's default; zlib level 0 (none) to 9 (smallest)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, chunk: int) -> np.ndarray:
    """Decode latents to uint8 RGB arrays (N, H, W, 3), `chunk` images per VAE pass.

    Rounded as diffusers' image processor rounds ((x / 2 + 0.5) clamped, * 255, rounded), but on
    the device, so only bytes cross to the host.
    """
    out = []
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    for part in latents.split(chunk):
        image = vae.decode(part, return_dict=False)[0]
        pixels = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def save_png(pixels: np.ndarray, path: str | os.PathLike) -> None:
    """Write one (H, W, 3) uint8 image as PNG."""
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
