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
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
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
    """The trained LoRA on the UNet: its file's sha256 (what files record). Adapters sets its scale."""

    sha256: str


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
    return LoadedLora(digest)


# A request's LoRA (the input lora_weights): fetched by URL through lcm.downloads' cache, loaded as
# a peft adapter by diffusers' own loader (UNet and text-encoder parts, diffusers/peft or kohya/A1111
# keys), kept loaded among the last MAX_LOADED, and switched per batch.
REQUEST_FIELD = "lora_weights"
# Adapters kept loaded: switching among them is set_adapters only (no file read). Each holds its
# LoRA's weights (SD 1.5 LoRAs: 10-150 MB), beside a 2-4 GB model.
MAX_LOADED = 4
_UNPACKED = Path(tempfile.gettempdir()) / "lcm-lora-unpacked"  # LoRAs taken out of training tars


@dataclass(frozen=True)
class RequestLora:
    """A request's LoRA as fetched: its URL, its .safetensors file, that file's sha256 (what files
    record), and how it was fetched (downloaded or cached, the time) for the request's log line."""

    url: str
    path: Path
    sha256: str
    fetched: str


def fetch_request_lora(url: str, expected_sha256: Optional[str] = None) -> RequestLora:
    """The LoRA a request names by URL, from the cache or downloaded (public hosts only unless
    LCM_ALLOW_PRIVATE_URLS=1); a training's tar is taken apart once per archive.

    `expected_sha256` (a file's record, for reproduce): the LoRA must still be that one. Raises
    InputError naming lora_weights.
    """
    fetched = downloads.download(url, REQUEST_FIELD)
    path = fetched.path
    if tarfile.is_tarfile(path):
        # Named <archive's sha256>-<its LoRA's sha256>: a later request hashes nothing again.
        unpacked = next(_UNPACKED.glob(f"{fetched.sha256}-*.safetensors"), None)
        if unpacked is None:
            _UNPACKED.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(dir=_UNPACKED))
            try:
                taken = safetensors_in(fetched.path, scratch, REQUEST_FIELD, url)
                unpacked = _UNPACKED / f"{fetched.sha256}-{file_sha256(taken)}.safetensors"
                os.replace(taken, unpacked)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        path, digest = unpacked, unpacked.stem.split("-", 1)[1]
    else:
        safetensors_in(path, fetched.path.parent, REQUEST_FIELD, url)  # checks the header only
        digest = fetched.sha256
    if expected_sha256 is not None and digest != expected_sha256:
        raise InputError(
            REQUEST_FIELD,
            url,
            f"the LoRA the file was made with (sha256 {expected_sha256}); the file at this URL is now "
            f"another (sha256 {digest}), so the image would not be the same",
        )
    return RequestLora(url, path, digest, fetched.summary())


class Adapters:
    """The request LoRAs loaded on the pipeline (least recently used first) and what runs now.

    Only the engine thread uses it. A batch without a request LoRA runs the base model (with the
    trained LoRA, if any, at lora_scale) through peft's disabled adapters: each adapted layer
    computes its base layer alone, so its output is the base model's, bit for bit. With a request
    LoRA, lora_scale is that LoRA's and a trained LoRA stays at 1: a fine-tuned version with a
    style on top.
    """

    def __init__(self, limit: int = MAX_LOADED) -> None:
        self.limit = limit
        self.loaded: OrderedDict[str, tuple[str, bool, bool]] = OrderedDict()  # sha -> name, unet, te
        self._active: Optional[tuple] = None

    def activate(
        self, pipe: Any, trained: Optional[LoadedLora], wanted: Optional[RequestLora], scale: float
    ) -> None:
        """The adapters for the next passes: `wanted` at `scale` (loaded if it is not), or none."""
        name, in_unet, in_text = self._load(pipe, wanted) if wanted is not None else (None, False, False)
        unet = [(ADAPTER, 1.0 if wanted is not None else scale)] if trained is not None else []
        if in_unet:
            unet.append((name, scale))
        state = (tuple(unet), name if in_text else None, scale)
        if state == self._active:
            return
        if unet:
            pipe.unet.enable_adapters()
            pipe.unet.set_adapters([n for n, _ in unet], weights=[w for _, w in unet])
        elif getattr(pipe.unet, "peft_config", None):
            pipe.unet.disable_adapters()
        if in_text:
            enable_lora_for_text_encoder(pipe.text_encoder)
            set_adapters_for_text_encoder([name], pipe.text_encoder, [scale])
        elif getattr(pipe.text_encoder, "peft_config", None):
            disable_lora_for_text_encoder(pipe.text_encoder)
        self._active = state

    def _load(self, pipe: Any, wanted: RequestLora) -> tuple[str, bool, bool]:
        if wanted.sha256 in self.loaded:
            self.loaded.move_to_end(wanted.sha256)
            self._evict(pipe)
            return self.loaded[wanted.sha256]
        if not wanted.path.is_file():  # evicted from the download cache since the request was built
            wanted = fetch_request_lora(wanted.url, wanted.sha256)
        name = f"request-{wanted.sha256[:16]}"
        try:
            with torch.inference_mode(False):  # the adapters' parameters are ordinary tensors
                pipe.load_lora_weights(load_file(wanted.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:  # peft's no-matching-module among them
            self._forget(pipe, name)
            raise InputError(
                REQUEST_FIELD, wanted.url, f"an SD 1.5 LoRA; this one does not fit ({exc})"
            ) from exc
        in_unet = name in (getattr(pipe.unet, "peft_config", None) or {})
        in_text = name in (getattr(pipe.text_encoder, "peft_config", None) or {})
        if not (in_unet or in_text):
            self._forget(pipe, name)
            raise InputError(
                REQUEST_FIELD,
                wanted.url,
                "an SD 1.5 LoRA; this file fits no layer of this model's UNet or text encoder",
            )
        for module in (pipe.unet, pipe.text_encoder):
            module.requires_grad_(False)
        self.loaded[wanted.sha256] = (name, in_unet, in_text)
        self._evict(pipe)
        self._active = None  # loading may have changed which adapters are set
        return self.loaded[wanted.sha256]

    def _evict(self, pipe: Any) -> None:
        """Least recently used out, down to `limit`; never the one just asked for (the last)."""
        while len(self.loaded) > max(1, self.limit):
            _, (old, _, _) = self.loaded.popitem(last=False)
            pipe.delete_adapters(old)

    def _forget(self, pipe: Any, name: str) -> None:
        """Take a half-loaded adapter off again (the UNet's part may have loaded before the text
        encoder's failed), and set the adapters anew next time: the loader may have switched them."""
        self._active = None
        for module in (pipe.unet, pipe.text_encoder):
            if name in (getattr(module, "peft_config", None) or {}):
                pipe.delete_adapters(name)
                return
