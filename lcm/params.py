"""Request parameters, validated once at the boundary.

Every limit lives here; predict.py repeats them as literals because `cog build` reads its
source statically, and a test keeps the two in step.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Optional

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


def random_seed() -> int:
    """A seed from the full 32-bit range, drawn without touching any global RNG."""
    return secrets.randbelow(MAX_SEED + 1)


def _check_int(field: str, value: Any, low: int, high: int, extra: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, value, f"an integer from {low} to {high}{extra}")
    if not low <= value <= high:
        raise InputError(field, value, f"an integer from {low} to {high}{extra}")
    return value


def _check_size(field: str, value: Any) -> int:
    allowed = f"a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}"
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SIZE <= value <= MAX_SIZE:
        raise InputError(field, value, allowed)
    if value % SIZE_MULTIPLE:
        lower = value - value % SIZE_MULTIPLE
        raise InputError(field, value, f"{allowed} (nearest: {lower} or {lower + SIZE_MULTIPLE})")
    return value


@dataclass(frozen=True)
class Request:
    """One generation request: everything that decides the output images."""

    prompt: str
    width: int
    height: int
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    lcm_origin_steps: int
    seed: int

    @classmethod
    def build(
        cls,
        prompt: str,
        width: int = 768,
        height: int = 768,
        num_images: int = 1,
        num_inference_steps: int = 4,
        guidance_scale: float = 8.0,
        lcm_origin_steps: int = 50,
        seed: Optional[int] = None,
    ) -> "Request":
        """Validate every field and resolve a missing seed; raise InputError naming the first bad one."""
        if not isinstance(prompt, str):
            raise InputError("prompt", prompt, "a string")
        width = _check_size("width", width)
        height = _check_size("height", height)
        num_images = _check_int("num_images", num_images, 1, MAX_IMAGES)
        num_inference_steps = _check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        guidance_ok = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
        if not (
            guidance_ok and math.isfinite(guidance_scale) and MIN_GUIDANCE <= guidance_scale <= MAX_GUIDANCE
        ):
            raise InputError(
                "guidance_scale", guidance_scale, f"a number from {MIN_GUIDANCE} to {MAX_GUIDANCE}"
            )
        lcm_origin_steps = _check_int(
            "lcm_origin_steps",
            lcm_origin_steps,
            num_inference_steps,
            MAX_ORIGIN_STEPS,
            f" (at least num_inference_steps={num_inference_steps})",
        )
        seed = random_seed() if seed is None else _check_int("seed", seed, 0, MAX_SEED)
        return cls(
            prompt=prompt,
            width=width,
            height=height,
            num_images=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=float(guidance_scale),
            lcm_origin_steps=lcm_origin_steps,
            seed=seed,
        )

    @property
    def seeds(self) -> list[int]:
        """Image i is generated from seed + i."""
        return [self.seed + i for i in range(self.num_images)]
