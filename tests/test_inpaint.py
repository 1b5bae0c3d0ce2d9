"""Inpainting (`mask` with `image`) against diffusers' own inpainting method, on the tiny checkpoint.

Where prompt_strength's meaning here (the LCM scheduler's `set_timesteps(strength=...)`, as
image to image) and StableDiffusionInpaintPipeline's (slicing its timestep list) give the same
timesteps, the pipeline itself is the reference; elsewhere, and for grey masks (which the
pipeline rounds to black or white), the same blending built from diffusers' own scheduler calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import LCMScheduler, StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lcm import batching, prompts, sampler
from lcm.cli import main as cli_main
from lcm.errors import InputError
from lcm.metadata import read_metadata
from lcm.params import Request
from lcm.sampler import guidance_embedding

SIZE = 256
INNER = slice(64, 192)  # the redrawn square of MASK, on the 8-pixel latent grid


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The input photo (a colour gradient with noise), a black mask with a white square, a grey one."""
    folder = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    photo = np.stack([x, y, (x + y) // 2], axis=-1) + rng.integers(0, 40, (SIZE, SIZE, 3))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(folder / "photo.png")
    square = np.zeros((SIZE, SIZE), dtype=np.uint8)
    square[INNER, INNER] = 255
    Image.fromarray(square).save(folder / "mask.png")
    grey = square.copy()
    grey[:, :32] = 128  # a grey band at the left edge, besides the white square
    grey[:, 32:48] = 64
    Image.fromarray(grey).save(folder / "grey.png")
    return {"photo": folder / "photo.png", "mask": folder / "mask.png", "grey": folder / "grey.png"}


def inpaint(files, **kw) -> Request:
    base = dict(prompt="a photo of a cat", image=files["photo"], mask=files["mask"], seed=7)
    base |= dict(num_inference_steps=2, disable_safety_checker=True)
    return Request.build(**{**base, **kw})


@pytest.fixture(scope="module")
def pipeline(engine) -> StableDiffusionInpaintPipeline:
    """diffusers' inpainting pipeline over the engine's own components, with the LCM scheduler."""
    names = ("vae", "text_encoder", "tokenizer", "unet", "feature_extractor")
    parts = {name: engine.pipe.components[name] for name in names}
    parts |= {"scheduler": LCMScheduler.from_config(engine.pipe.scheduler.config), "safety_checker": None}
    pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, req: Request, steps: int, strength: float) -> np.ndarray:
    out = pipe(
        req.prompt,
        image=req.image,
        mask_image=req.mask,
        height=req.height,
        width=req.width,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="np",
    ).images[0]
    return to_uint8(out)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"prompt_strength": 1.0}, {"steps": 2, "strength": 1.0}),
        # LCM's schedule at strength 0.5 with 2 steps is [499, 259]; the pipeline's 4 steps
        # [999, 759, 499, 259] sliced at strength 0.5 give the same two.
        ({"prompt_strength": 0.5}, {"steps": 4, "strength": 0.5}),
    ],
)
def test_equals_diffusers_inpainting_pipeline_where_the_schedules_agree(
    engine, pipeline, files, ours, theirs
):
    req = inpaint(files, **ours)
    pipe_scheduler = LCMScheduler.from_config(engine.pipe.scheduler.config)
    pipe_scheduler.set_timesteps(theirs["steps"])
    sliced = pipe_scheduler.timesteps[theirs["steps"] - int(theirs["steps"] * theirs["strength"]) :]
    assert engine.scheduler(req).timesteps.tolist() == sliced.tolist()
    pipeline.scheduler = LCMScheduler.from_config(engine.pipe.scheduler.config)
    mine = engine.generate(req).pixels[0]
    assert max_diff(mine, run_pipeline(pipeline, req, **theirs)) <= 1
