"""A request's images as files, each carrying what reproduces it; flagged images are left out."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm import images
from lcm.errors import LCMError
from lcm.generation import Generation
from lcm.loading import dtype_name
from lcm.model import Model
from lcm.params import Request
from lcm.worker import CancelFlag

DTYPE_KEY = "dtype"  # in each file's metadata; files made before it ran in loading.legacy_dtype


@dataclass(frozen=True)
class Served:
    """A request's files and its log line, which whoever waited logs: Cog attributes a log line to a
    prediction by the context it is written in (the predict coroutine's), not by the engine thread."""

    paths: list[Path]
    summary: str


def file_metadata(model: Model, request: Request, seed: int) -> dict[str, Any]:
    """The request's metadata, the dtype the models ran in, and the LoRA's sha256 when one is
    loaded: reproduce needs both again."""
    meta = request.metadata(seed)
    meta[DTYPE_KEY] = dtype_name(model.dtype)
    if model.lora is not None:
        meta["lora_sha256"] = model.lora.sha256
    return meta


def write(generation: Generation, model: Model, out_dir: Path, cancel: CancelFlag) -> list[Path]:
    """The unflagged images (in parallel) and, when asked for, the edge map; none when every image
    was flagged. Records the time as the "encode" stage.

    Cancelled or failed while writing, it removes what it wrote.
    """
    request = generation.request
    cancel.check()
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = [
        (s, p) for s, p, bad in zip(request.seeds, generation.pixels, generation.nsfw, strict=True) if not bad
    ]
    written: list[Path] = []

    def save(item: tuple[int, np.ndarray]) -> Path:
        seed, pixels = item
        cancel.check()
        stem = out_dir / f"lcm-{seed}"
        meta = file_metadata(model, request, seed)
        path = images.save_image(pixels, stem, request.output_format, request.output_quality, meta)
        written.append(path)
        return path

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(kept), os.cpu_count() or 1))) as pool:
            paths = list(pool.map(save, kept))
        if request.return_control_image and kept and generation.edges is not None:
            paths.append(images.save_control_image(generation.edges, out_dir / f"lcm-{request.seed}-control"))
            written.append(paths[-1])
        cancel.check()
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    generation.timings["encode"] = time.perf_counter() - start
    return paths


def all_flagged(request: Request) -> LCMError:
    """The error of a request whose every image the safety checker flagged: it never silently
    returns nothing."""
    return LCMError(
        f"the safety checker flagged all {request.num_images} image(s) as possibly NSFW, so none is "
        "returned: try another seed or prompt"
    )
