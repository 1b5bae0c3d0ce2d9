"""Synthetic SD 1.5 LoRAs for a synthetic checkpoint (lcm.synthetic), in the formats users bring:
diffusers/peft (what `save_lora_weights` writes) and kohya-ss/A1111 (what most community LoRAs are),
for the tests (tests/test_request_lora.py) and the switch benchmark (bench/lora_switch.py).

Weights are random and nonzero: peft starts lora_B at zero, which would make a freshly initialised
LoRA a no-op and a test of it prove nothing. `peft_lora` and `kohya_lora` with the same seed and rank
are the same LoRA: the kohya file's lora_up is lora_B times rank/alpha, undone by the alpha/rank its
loader applies (a power of two by default, so exactly).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lcm.synthetic import WEIGHT_FILES

# The layers a LoRA trained by kohya-ss's sd-scripts (networks/lora.py) adapts in SD 1.5: every Linear and
# 1x1 Conv2d of the UNet's transformer blocks (proj_in/proj_out are 1x1 convolutions in SD 1.5), and the
# text encoder's attention and MLP. Names are the modules' own (the checkpoint's weight names less
# ".weight"); the text encoder's keep the hub's "text_model." prefix, as transformers 4 wrote them.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# Each LoRA's update B·A (what the layer adds at scale 1) has entries of about STRENGTH / sqrt(fan_in):
# on the tiny checkpoint that moves a 256x256 image by tens of levels in 255 without saturating it.
STRENGTH = 0.1


def _targets(checkpoint: Path, component: str, names: tuple[str, ...]) -> dict[str, torch.Size]:
    """Module name -> weight shape of each target layer in the checkpoint's file, read from its header."""
    with safe_open(checkpoint / WEIGHT_FILES[component], framework="pt") as opened:
        return {
            key.removesuffix(".weight"): torch.Size(opened.get_slice(key).get_shape())
            for key in sorted(opened.keys())
            if key.endswith(".weight") and key.removesuffix(".weight").endswith(names)
        }


def factors(shape: torch.Size, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random down (A: fan_in -> rank) and up (B: rank -> fan_out) factors for a layer of this shape,
    both nonzero, shaped as peft and kohya store them (a 1x1 convolution's with trailing 1x1)."""
    fan_out, fan_in, *kernel = shape
    down = torch.randn((rank, fan_in, *kernel), generator=generator) / math.sqrt(fan_in)
    up = torch.randn((fan_out, rank, *kernel), generator=generator) * (STRENGTH / math.sqrt(rank))
    return down, up


def _layers(
    checkpoint: Path, seed: int, rank: int, text_encoder: bool
) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(component, module name, A, B) for every target layer, drawn in one fixed order from `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    parts = [("unet", UNET_TARGETS)] + ([("text_encoder", TEXT_ENCODER_TARGETS)] if text_encoder else [])
    for component, names in parts:
        for module, shape in _targets(checkpoint, component, names).items():
            yield (component, module, *factors(shape, rank, generator))


def peft_lora(
    checkpoint: Path,
    out: Path,
    seed: int = 0,
    rank: int = 4,
    text_encoder: bool = True,
    text_model: bool = True,
) -> Path:
    """A LoRA for `checkpoint` in diffusers' format, as `save_lora_weights` writes it: per layer
    `unet.<module>.lora_A.weight` and `.lora_B.weight`, and `text_encoder.text_model.<module>...`, with no
    alphas (peft's alpha = rank: the update is B·A). `text_model=False` drops "text_model.", as
    save_lora_weights does under transformers 5, whose CLIPTextModel has no .text_model; the hub's
    SD 1.5 LoRAs, written under transformers 4, have it. Returns `out`."""
    tensors = {}
    for component, module, down, up in _layers(checkpoint, seed, rank, text_encoder):
        if not text_model:
            module = module.removeprefix("text_model.")
        tensors[f"{component}.{module}.lora_A.weight"] = down
        tensors[f"{component}.{module}.lora_B.weight"] = up
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata={"format": "pt"})
    return out


def kohya_lora(
    checkpoint: Path,
    out: Path,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 2.0,
    text_encoder: bool = True,
) -> Path:
    """The LoRA `peft_lora(checkpoint, seed=seed, rank=rank)` writes, in kohya-ss/A1111 format: per layer
    `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight` and `.alpha` (and
    `lora_te_text_model_...`), whose update is (alpha / rank)·up·down. An alpha other than rank makes a
    reader that skips the alpha scaling draw another image. Returns `out`."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    tensors = {}
    for component, module, down, up in _layers(checkpoint, seed, rank, text_encoder):
        name = prefixes[component] + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up * (rank / alpha)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out)
    return out
