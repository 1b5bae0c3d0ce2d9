"""Request parameters, validated once at the boundary.

Every limit lives here; predict.py repeats them as literals because `cog build` reads its
source statically, and a test keeps the two in step.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from PIL import Image

import lcm
from lcm.errors import InputError

MIN_SIZE = 256
MAX_SIZE = 1024
SIZE_MULTIPLE = 8
MAX_IMAGES = 8
MAX_STEPS = 50
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 20.0
MAX_ORIGIN_STEPS = 1000  # the scheduler's num_train_timesteps
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 5000  # a cheap bound before tokenizing; the real limit is prompts.MAX_WINDOWS
DEFAULT_SIZE = 768
DEFAULT_STRENGTH = 0.8
MAX_CLIP_SKIP = 11  # the real text encoder has 12 layers; the engine checks the loaded one
OUTPUT_FORMATS = ("png", "webp", "jpg")


def random_seed() -> int:
    """A seed from the full 32-bit range, drawn without touching any global RNG."""
    return secrets.randbelow(MAX_SEED + 1)


def _integral(value: Any) -> Any:
    """JSON Schema counts 256.0 as an integer, so Cog passes such floats on: take them as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_int(field: str, value: Any, low: int, high: int, extra: str = "") -> int:
    value = _integral(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, value, f"an integer from {low} to {high}{extra}")
    if not low <= value <= high:
        raise InputError(field, value, f"an integer from {low} to {high}{extra}")
    return value


def _check_float(field: str, value: Any, low: float, high: float) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value <= high):
        raise InputError(field, value, f"a number from {low} to {high}")
    return float(value)


def _check_size(field: str, value: Any) -> int:
    allowed = f"a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}"
    value = _integral(value)
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SIZE <= value <= MAX_SIZE:
        raise InputError(field, value, allowed)
    if value % SIZE_MULTIPLE:
        lower = value - value % SIZE_MULTIPLE
        raise InputError(field, value, f"{allowed} (nearest: {lower} or {lower + SIZE_MULTIPLE})")
    return value


@dataclass(frozen=True)
class Request:
    """One generation request: everything that decides the output images and files."""

    prompt: str
    width: int
    height: int
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    lcm_origin_steps: int
    seed: int
    image: Optional[Image.Image] = field(default=None, compare=False, repr=False)  # fitted to width x height
    image_sha256: Optional[str] = None
    prompt_strength: float = DEFAULT_STRENGTH
    clip_skip: int = 0
    output_format: str = "png"
    output_quality: int = 90
    safety_checker: bool = True
    fast_decode: bool = False

    @classmethod
    def build(
        cls,
        prompt: str,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_images: int = 1,
        num_inference_steps: int = 4,
        guidance_scale: float = 8.0,
        lcm_origin_steps: int = 50,
        seed: Optional[int] = None,
        image: Optional[str | Path] = None,
        prompt_strength: float = DEFAULT_STRENGTH,
        clip_skip: int = 0,
        output_format: str = "png",
        output_quality: int = 90,
        safety_checker: bool = True,
        fast_decode: bool = False,
    ) -> "Request":
        """Validate every field, read the input image, resolve size and seed.

        Raises InputError naming the first bad field. Without an image, width and height default
        to 768; with one, they follow images.output_size and the image is fitted to them.
        """
        from lcm import images  # images reads this module's limits

        if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
            raise InputError("prompt", prompt, f"a string of at most {MAX_PROMPT_CHARS} characters")
        width = None if width is None else _check_size("width", width)
        height = None if height is None else _check_size("height", height)
        num_images = _check_int("num_images", num_images, 1, MAX_IMAGES)
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        guidance_scale = _check_float("guidance_scale", guidance_scale, MIN_GUIDANCE, MAX_GUIDANCE)
        lcm_origin_steps = _check_int(
            "lcm_origin_steps",
            lcm_origin_steps,
            num_inference_steps,
            MAX_ORIGIN_STEPS,
            f" (at least num_inference_steps={num_inference_steps})",
        )
        seed = random_seed() if seed is None else _check_int("seed", seed, 0, MAX_SEED)
        prompt_strength = _check_float("prompt_strength", prompt_strength, 0.0, 1.0)
        clip_skip = _check_int("clip_skip", clip_skip, 0, MAX_CLIP_SKIP)
        if output_format not in OUTPUT_FORMATS:
            raise InputError("output_format", output_format, f"one of {', '.join(OUTPUT_FORMATS)}")
        output_quality = _check_int("output_quality", output_quality, 1, 100)
        if not isinstance(safety_checker, bool):
            raise InputError("disable_safety_checker", safety_checker, "true or false")
        if not isinstance(fast_decode, bool):
            raise InputError("fast_decode", fast_decode, "true or false")

        fitted, digest = None, None
        if image is None:
            if prompt_strength != DEFAULT_STRENGTH:
                raise InputError(
                    "prompt_strength",
                    prompt_strength,
                    "only with an image (it sets how much of the image changes)",
                )
            width, height = width or DEFAULT_SIZE, height or DEFAULT_SIZE
        else:
            loaded = images.load_input_image(image)  # checks size limits before anything is read whole
            digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()
            width, height = images.output_size(loaded.size, width, height)
            fitted = images.fit_image(loaded, width, height)
            used = int(lcm_origin_steps * prompt_strength)
            if used < num_inference_steps:
                least = math.ceil(num_inference_steps / lcm_origin_steps * 100) / 100
                raise InputError(
                    "prompt_strength",
                    prompt_strength,
                    f"at least {least} with num_inference_steps={num_inference_steps} and "
                    f"lcm_origin_steps={lcm_origin_steps} (each step needs one of the "
                    f"lcm_origin_steps x prompt_strength = {used} timesteps left)",
                )
        return cls(
            prompt=prompt,
            width=width,
            height=height,
            num_images=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            lcm_origin_steps=lcm_origin_steps,
            seed=seed,
            image=fitted,
            image_sha256=digest,
            prompt_strength=prompt_strength,
            clip_skip=clip_skip,
            output_format=output_format,
            output_quality=output_quality,
            safety_checker=safety_checker,
            fast_decode=fast_decode,
        )

    @property
    def seeds(self) -> list[int]:
        """Image i is generated from seed + i."""
        return [self.seed + i for i in range(self.num_images)]

    def metadata(self, seed: int) -> dict[str, Any]:
        """What a file needs to be regenerated alone: this request with one image and its own seed."""
        skip = {"image", "num_images", "safety_checker"}
        if self.image is None:
            skip |= {"prompt_strength", "image_sha256"}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**values, "seed": seed, "model": lcm.MODEL_NAME, "version": lcm.__version__}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], image: Optional[str | Path] = None) -> "Request":
        """The one-image request a file's metadata describes; its input image must be the same file."""
        wanted = meta.get("image_sha256")
        if wanted is not None:
            if image is None:
                raise InputError("image", None, f"the input image this file was made from (sha256 {wanted})")
            found = hashlib.sha256(Path(image).read_bytes()).hexdigest()
            if found != wanted:
                raise InputError(
                    "image", str(image), f"the input image with sha256 {wanted}; this one is {found}"
                )
        keys = (
            "prompt",
            "width",
            "height",
            "num_inference_steps",
            "guidance_scale",
            "lcm_origin_steps",
            "seed",
            "prompt_strength",
            "clip_skip",
            "output_format",
            "output_quality",
            "fast_decode",
        )
        try:
            kwargs = {key: meta[key] for key in keys if key in meta}
            return cls.build(**kwargs, image=image if wanted else None)
        except TypeError as exc:
            raise InputError("file", meta, f"metadata written by this project ({exc})") from exc
