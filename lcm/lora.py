"""Trained weights for serving: the LoRA a training wrote, found, checked and put on the UNet.

A training's output (lcm.training) is a tar holding the LoRA as safetensors in diffusers' format
and training.json; serving takes that archive or the bare .safetensors, from a local path or the
http(s) URL Cog hands setup() (a Replicate training's weights), downloaded by lcm.downloads. Only
safetensors are read: a pickle, or anything else, fails with a message naming the field.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lcm import downloads
from lcm.downloads import MAX_BYTES
from lcm.errors import InputError, LCMError
from lcm.weights import file_sha256

log = logging.getLogger("lcm")

ADAPTER = "trained"  # the adapter's name on the UNet
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, which load_lora_weights(folder) finds
INFO_FILE = "training.json"
FIELD = "weights"  # setup's argument (COG_WEIGHTS)
_ALLOWED = f"a training's output (.tar holding {WEIGHTS_FILE}) or a LoRA .safetensors file"


def _refuse(field: str, value: str, problem: str) -> InputError:
    return InputError(field, value, f"{_ALLOWED}; {problem}")


def fetch(weights: str, scratch: str | os.PathLike) -> Path:
    """setup's `weights`, a local path or URL, as the LoRA's .safetensors file on local disk.

    A URL goes through lcm.downloads' cache and limits, except that it may name a private host:
    COG_WEIGHTS is the operator's own choice, which may be a bucket on their own network.
    Raises InputError (an LCMError) naming `weights` when it is not a LoRA.
    """
    if "://" in weights or weights.startswith("data:"):
        fetched = downloads.download(weights, FIELD, private_ok=True)
        log.info("%s: %s from %s", FIELD, fetched.summary(), weights)
        path = fetched.path
    else:
        path = Path(weights)
        if not path.is_file():
            raise _refuse(FIELD, weights, "no such file")
    return safetensors_in(path, scratch, FIELD, weights)


def safetensors_in(
    path: Path, scratch: str | os.PathLike, field: str = FIELD, value: Optional[str] = None
) -> Path:
    """The LoRA in a file as downloaded or given: the file itself when safetensors, else the one a
    training's tar holds, taken out into `scratch`; its header checked either way.

    Raises InputError naming `field` and `value` (default: the path) when it is neither.
    """
    value = str(path) if value is None else value
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(path):
        path = _from_tar(field, value, path, scratch)
    try:
        with safe_open(path, framework="pt") as opened:
            names = list(opened.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(field, value, "this file is not safetensors") from exc
    if not names:
        raise _refuse(field, value, "this safetensors file holds no tensor")
    return path


def _from_tar(field: str, value: str, archive: Path, scratch: Path) -> Path:
    """The LoRA file from a training's tar; nothing else in it is unpacked."""
    with tarfile.open(archive, "r:*") as tf:
        try:
            entry = tf.getmember(WEIGHTS_FILE)
        except KeyError:
            raise _refuse(field, value, f"this archive has no {WEIGHTS_FILE}") from None
        if not entry.isfile() or entry.size > MAX_BYTES:
            limit = MAX_BYTES // 1_000_000
            raise _refuse(field, value, f"{WEIGHTS_FILE} in this archive is not a file under {limit} MB")
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
