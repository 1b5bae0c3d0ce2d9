"""References the tests compare with, built from the loaded components."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from diffusers import LatentConsistencyModelPipeline
from PIL import Image


def gradient_png() -> bytes:
    """A smooth, photo-like 320x256 RGB gradient as a PNG: the tests' starting image."""
    y, x = np.mgrid[0:256, 0:320]
    pixels = np.stack([x * 255 / 319, y * 255 / 255, (x + y) * 255 / 575], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def cut_text_encoder(encoder: torch.nn.Module, clip_skip: int) -> torch.nn.Module:
    """The text encoder cut to L - clip_skip layers: its last layer's output is clip_skip's layer.

    (diffusers 0.42's own clip_skip path fails with transformers 5, whose CLIPTextModel has no .text_model.)
    """
    config = encoder.config.__class__.from_dict(
        {**encoder.config.to_dict(), "num_hidden_layers": encoder.config.num_hidden_layers - clip_skip}
    )
    cut = encoder.__class__(config).eval()
    missing, _ = cut.load_state_dict(encoder.state_dict(), strict=False)
    assert missing == []
    return cut


def pretrained(checkpoint: Path, dtype: torch.dtype, channels_last: bool) -> LatentConsistencyModelPipeline:
    """diffusers' LCM pipeline loaded in `dtype`, without the safety checker (the compared requests
    disable it), its UNet and VAE in the memory format the engine runs them in (lcm.accel's
    channels_last): bf16 comparisons need the same layout (tests/test_bf16.py)."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        checkpoint, local_files_only=True, use_safetensors=True, dtype=dtype
    )
    pipe.safety_checker = None
    if channels_last:
        for module in (pipe.unet, pipe.vae):
            module.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe
