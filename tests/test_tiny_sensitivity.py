"""The tiny checkpoint reacts to its conditioning, so equality tests have a margin against wiring bugs.

Tests compare the engine with diffusers within 1/255; that catches a dropped prompt, guidance or clip
skip with a margin only if changing one moves the image by much more (lcm.synthetic's tiny UNet gains).
"""

from __future__ import annotations

import numpy as np
import pytest

from lcm.params import Request

MIN_MAX_DIFF = 20  # levels in 255: far above the equality tests' 1
MIN_MEAN_DIFF = 2.0  # across the image, not only a few pixels at its border
CHANGES = {"prompt": {"prompt": ""}, "guidance": {"guidance_scale": 9.0}, "clip-skip": {"clip_skip": 1}}


def pixels(engine, **changes) -> np.ndarray:
    request = Request.build(
        **{
            "prompt": "a photo of a cat",
            "width": 256,
            "height": 256,
            "num_inference_steps": 2,
            "seed": 5,
            "disable_safety_checker": True,
            **changes,
        }
    )
    return engine.generate(request).pixels[0].astype(np.int16)


@pytest.fixture(scope="module")
def default_pixels(engine) -> np.ndarray:
    return pixels(engine)


@pytest.mark.parametrize("changes", CHANGES.values(), ids=CHANGES.keys())
def test_each_conditioning_input_moves_the_image_by_tens_of_levels(engine, default_pixels, changes):
    diff = np.abs(pixels(engine, **changes) - default_pixels)
    assert diff.max() >= MIN_MAX_DIFF, f"{changes}: max diff {diff.max()}/255"
    assert diff.mean() >= MIN_MEAN_DIFF, f"{changes}: mean diff {diff.mean():.2f}/255"
