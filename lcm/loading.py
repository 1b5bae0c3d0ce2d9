"""Load the saved pipeline from local weights and place it on a device.

Only local safetensors are read: no hub, no pickle, no remote code.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from diffusers import LatentConsistencyModelPipeline  # noqa: E402

from lcm.errors import LCMError, WeightsError  # noqa: E402
from lcm.weights import check_weights  # noqa: E402

DEVICE_ENV = "LCM_DEVICE"


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else LCM_DEVICE, else CUDA when available, else CPU."""
    name = requested or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise LCMError(f"{DEVICE_ENV}={name!r} is not a device: use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LCMError(f"device {name!r} was asked for but CUDA is not available here; use cpu")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU (CPU half-precision kernels are slow or missing)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(weights_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype):
    """The diffusers pipeline from a checked local directory, on `device` in `dtype`, in eval mode."""
    path = check_weights(weights_dir)
    try:
        pipe = LatentConsistencyModelPipeline.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dtype
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WeightsError(f"could not load the pipeline from {path}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
