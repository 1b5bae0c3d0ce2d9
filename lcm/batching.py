"""Requests waiting for the engine, and which of them can share UNet passes.

Requests queue here in arrival order. Whenever the engine is free it takes the oldest one and,
after it, every queued request whose tensors fit the same passes (same size, timesteps, image
to image or not, inpainting or not, decoder and prompt-embedding length), while the batch's
images x pixels stay within the device's budget. A request never waits for more than the batch
already running: the engine takes what is queued when it starts, and a later arrival waits for
the next batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional

from lcm.params import Request
from lcm.worker import Job


@dataclass(eq=False)
class Pending:
    """One submitted request, where its files go, and the Job its caller waits on."""

    request: Request
    out_dir: Path
    job: Job
    key: Optional[Hashable] = field(default=None, repr=False)

    @property
    def pixels(self) -> int:
        return self.request.num_images * self.request.width * self.request.height


def shape_key(request: Request, windows: int) -> Hashable:
    """What must be equal for two requests to run in the same UNet passes and decoder calls.

    Size, steps and origin steps (hence timesteps), image to image with its strength (the
    timesteps it keeps), inpainting or not (a mask blends every step; each row keeps its own
    mask and image latents), the decoder, FreeU (it changes the UNet itself), the prompt
    embedding's 77-token window count (the length of the cross-attention's context; a weighted
    prompt's counts its text without the syntax), the request's LoRA (by its file's sha256) and the
    LoRA's scale (one set of adapters per pass), and with a
    control image the ControlNet's residual schedule (scale, start, end). Prompts (weighted or
    not), seeds, guidance, clip skip, safety, format, quality, control images and their Canny
    thresholds are per request: they ride along as rows or are applied per request afterwards.
    """
    r = request
    strength = r.prompt_strength if r.image is not None else None
    inpaint = r.mask is not None
    guide = (
        (r.controlnet_conditioning_scale, r.control_guidance_start, r.control_guidance_end)
        if r.control_image is not None
        else None
    )
    return (
        r.width,
        r.height,
        r.num_inference_steps,
        r.lcm_origin_steps,
        strength,
        inpaint,
        r.fast_decode,
        r.freeu,
        windows,
        r.lora_scale,
        r.lora.sha256 if r.lora is not None else None,
        guide,
    )


class Queue:
    """Thread-safe arrival-order queue that hands out batches of compatible requests."""

    def __init__(self) -> None:
        self._items: list[Pending] = []
        self._lock = threading.Lock()

    def put(self, item: Pending) -> None:
        with self._lock:
            self._items.append(item)

    def take(self, key: Callable[[Pending], Hashable], budget: int) -> list[Pending]:
        """The oldest request, then each later one with its key while images x pixels <= budget.

        Only the engine thread takes, so what it saw queued stays queued until it takes it: keys
        are computed (tokenizing each prompt once) outside the lock, and a put() never waits for
        them. `key(item)` may raise (a prompt too long to encode, say): that item is returned
        alone, so its own error fails it and nothing else. Budget 0 serves one request at a time.
        """
        with self._lock:
            queued = list(self._items)
        if not queued:
            return []
        for item in queued:
            if item.key is None:
                try:
                    item.key = key(item)
                except Exception:
                    item.key = _Unkeyed()
        head = queued[0]
        batch, used = [head], head.pixels
        if not isinstance(head.key, _Unkeyed):
            for item in queued[1:]:
                if item.key == head.key and used + item.pixels <= budget:
                    batch.append(item)
                    used += item.pixels
        with self._lock:
            for item in batch:
                self._items.remove(item)
        return batch


class _Unkeyed:
    """The key of a request whose key raised: equal to no other, so it is served alone."""
