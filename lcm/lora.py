"""Trained weights for serving: the LoRA a training wrote, found, checked and put on the UNet.

A training's output (lcm.training) is a tar holding the LoRA as safetensors in diffusers' format
and training.json; serving takes that archive or the bare .safetensors, from a local path or the
http(s) URL Cog hands setup() (a Replicate training's weights). Only safetensors are read: a
pickle, or anything else, fails setup with a message naming `weights`.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lcm.downloads import MAX_BYTES
from lcm.errors import LCMError
from lcm.weights import file_sha256

ADAPTER = "trained"  # the adapter's name on the UNet
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, which load_lora_weights(folder) finds
INFO_FILE = "training.json"
DOWNLOAD_TIMEOUT_S = 60
_ALLOWED = (
    "a local path or http(s) URL to a training's output (.tar holding "
    f"{WEIGHTS_FILE}) or to a LoRA .safetensors file"
)


def _refuse(weights: str, problem: str) -> LCMError:
    return LCMError(f"weights={weights!r} is not allowed: {_ALLOWED}; {problem}")


def fetch(weights: str, scratch: str | os.PathLike) -> Path:
    """The LoRA's .safetensors file on local disk: downloaded into `scratch` for a URL, taken out
    of the training's tar, and its header checked. Raises LCMError naming `weights` otherwise."""
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if weights.startswith(("http://", "https://")):
        path = scratch / "download"
        try:
            with urllib.request.urlopen(weights, timeout=DOWNLOAD_TIMEOUT_S) as answer:
                with open(path, "wb") as out:
                    copied = _copy(answer, out)
        except OSError as exc:
            raise _refuse(weights, f"the download failed ({exc})") from exc
        if copied > MAX_BYTES:
            raise _refuse(weights, f"the download is over {MAX_BYTES // 1_000_000} MB")
    elif "://" in weights or weights.startswith("data:"):
        raise _refuse(weights, "only http and https URLs are downloaded")
    else:
        path = Path(weights)
        if not path.is_file():
            raise _refuse(weights, "no such file")
    if tarfile.is_tarfile(path):
        path = _from_tar(weights, path, scratch)
    try:
        with safe_open(path, framework="pt") as opened:
            names = list(opened.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(weights, "this file is not safetensors") from exc
    if not names:
        raise _refuse(weights, "this safetensors file holds no tensor")
    return path


def _copy(source, out) -> int:
    copied = 0
    while chunk := source.read(1 << 20):
        copied += len(chunk)
        if copied > MAX_BYTES:
            break
        out.write(chunk)
    return copied


def _from_tar(weights: str, archive: Path, scratch: Path) -> Path:
    """The LoRA file from a training's tar; nothing else in it is unpacked."""
    with tarfile.open(archive, "r:*") as tf:
        try:
            entry = tf.getmember(WEIGHTS_FILE)
        except KeyError:
            raise _refuse(weights, f"this archive has no {WEIGHTS_FILE}") from None
        if not entry.isfile() or entry.size > MAX_BYTES:
            limit = MAX_BYTES // 1_000_000
            raise _refuse(weights, f"{WEIGHTS_FILE} in this archive is not a file under {limit} MB")
        path = scratch / WEIGHTS_FILE
        with tf.extractfile(entry) as source, open(path, "wb") as out:
            shutil.copyfileobj(source, out)
    return path


@dataclass(frozen=True)
class LoadedLora:
    """The LoRA on the UNet: its file's sha256 (what files record) and the scale last set."""

    sha256: str
    scale: float


def attach(pipe, path: str | os.PathLike) -> LoadedLora:
    """Load the LoRA onto the pipeline's UNet as adapter ADAPTER at scale 1, without gradients.

    Raises LCMError when the file fits no layer of this UNet (a LoRA for another model).
    """
    path = Path(path)
    digest = file_sha256(path)
    before = sum(1 for name, _ in pipe.unet.named_parameters() if "lora_" in name)
    try:
        # The UNet's own loader: the file holds UNet keys only (lcm.training), no text encoder.
        pipe.unet.load_lora_adapter(load_file(path), prefix="unet", adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LCMError(f"the LoRA in {path.name} does not fit this model's UNet: {exc}") from exc
    added = sum(1 for name, _ in pipe.unet.named_parameters() if "lora_" in name) - before
    if added == 0:
        raise LCMError(f"the LoRA in {path.name} fits no layer of this model's UNet")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return LoadedLora(digest, 1.0)


def set_scale(pipe, loaded: LoadedLora, scale: float) -> LoadedLora:
    """The LoRA at `scale` for the next passes (0: the base model's output exactly)."""
    if scale == loaded.scale:
        return loaded
    pipe.unet.set_adapters([ADAPTER], weights=[scale])
    return LoadedLora(loaded.sha256, scale)
