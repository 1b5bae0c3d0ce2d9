"""References the tests compare with, built from the loaded components."""

from __future__ import annotations

import io

import numpy as np
import torch
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
