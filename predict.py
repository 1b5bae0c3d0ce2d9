"""Cog adapter: typed inputs in, one call into the lcm engine, PNG files out."""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import List, Optional

from cog import BasePredictor, Input, Path

from lcm.engine import Engine
from lcm.params import Request

DEFAULT_PROMPT = "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"
MIN_SIZE = 256
MAX_SIZE = 1024
MAX_IMAGES = 8
MAX_STEPS = 50


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the pipeline once from local weights (LCM_WEIGHTS_DIR, else weights/), never the network."""
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.output_dir: Optional[str] = None
        self.engine = Engine.load()

    def predict(
        self,
        prompt: str = Input(
            description="Text describing the image. Up to 77 CLIP tokens are used.",
            default=DEFAULT_PROMPT,
        ),
        width: int = Input(
            description="Width of the output image in pixels: 256 to 1024, a multiple of 8. Default 768.",
            default=768,
            ge=MIN_SIZE,
            le=MAX_SIZE,
        ),
        height: int = Input(
            description="Height of the output image in pixels: 256 to 1024, a multiple of 8. Default 768.",
            default=768,
            ge=MIN_SIZE,
            le=MAX_SIZE,
        ),
        num_images: int = Input(
            description="Number of images to generate: 1 to 8. Image i uses seed + i. Default 1.",
            default=1,
            ge=1,
            le=MAX_IMAGES,
        ),
        num_inference_steps: int = Input(
            description="Denoising steps, one UNet pass each: 1 to 50; 2 to 8 recommended. Default 4.",
            default=4,
            ge=1,
            le=MAX_STEPS,
        ),
        guidance_scale: float = Input(
            description=(
                "Prompt adherence, embedded in the UNet (no negative branch): 1 to 20, default 8.0. "
                "Diffusers convention: w = guidance_scale - 1 (the original LCM code fed w = guidance_scale)."
            ),
            default=8.0,
            ge=1.0,
            le=20.0,
        ),
        lcm_origin_steps: int = Input(
            description=(
                "Length of the original (teacher) schedule the LCM timesteps are drawn from: "
                "1 to 1000, at least num_inference_steps. Default 50, as the model was distilled."
            ),
            default=50,
            ge=1,
            le=1000,
        ),
        seed: Optional[int] = Input(
            description="Random seed, 0 to 4294967295. Empty: a random seed, which is logged.",
            default=None,
            ge=0,
            le=4294967295,
        ),
    ) -> List[Path]:
        """Generate images and return them as PNG files."""
        self._remove_previous_outputs()
        self.output_dir = tempfile.mkdtemp(prefix="lcm-")
        try:
            request = Request.build(
                prompt=prompt,
                width=width,
                height=height,
                num_images=num_images,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                lcm_origin_steps=lcm_origin_steps,
                seed=seed,
            )
            paths = self.engine.generate_files(request, self.output_dir)
        except BaseException:  # failed or cancelled: leave no partial files behind
            self._remove_previous_outputs()
            raise
        return [Path(p) for p in paths]

    def _remove_previous_outputs(self) -> None:
        """Cog never deletes returned files: drop the last prediction's so disk use stays bounded."""
        if self.output_dir is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            self.output_dir = None
