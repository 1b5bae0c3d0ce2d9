"""LoRA files for the tiny checkpoint, in the formats users bring, and diffusers' reference for them.

A request's `lora_weights` is an SD 1.5 LoRA as found on the hub: diffusers/peft format (what
`save_lora_weights` writes) or kohya-ss/A1111 format (what most community LoRAs are). The helpers here
write both for the tiny synthetic checkpoint (lcm.synthetic), with random nonzero weights: peft starts
lora_B at zero, which would make a freshly initialised LoRA a no-op and a test of it prove nothing.
`peft_lora` and `kohya_lora` with the same seed and rank are the same LoRA: the kohya file's lora_up is
lora_B times rank/alpha, undone by the alpha/rank its loader applies (a power of two by default, so
exactly). `reference_pipeline` is diffusers' own reading of either, the truth the engine is held to.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from lcm.synthetic import WEIGHT_FILES
from reference import pretrained

ADAPTER = "request"  # the adapter's name in the reference pipeline

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


def _factors(shape: torch.Size, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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
            yield (component, module, *_factors(shape, rank, generator))


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


def other_model_lora(out: Path, rank: int = 4) -> Path:
    """An SDXL LoRA as kohya-ss writes one, for the refusal of a LoRA made for another model: its UNet's
    layers under the sgm names (input_blocks_4_1 is down_blocks.1.attentions.0) at SDXL's widths, with
    2048-wide cross-attention, and both SDXL text encoders (lora_te1_, lora_te2_). It fits no layer of the
    tiny UNet by name, nor by shape once the sgm names are mapped (middle_block_1 is the tiny mid_block's
    attention, 64 wide, not 1280): diffusers' load_lora_weights refuses it. Returns `out`."""
    generator = torch.Generator("cpu").manual_seed(0)
    layers = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
        "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_v": (1280, 2048),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": (1280, 1280),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2": (1280, 5120),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }
    tensors = {}
    for name, shape in layers.items():
        down, up = _factors(torch.Size(shape), rank, generator)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out)
    return out


def not_a_lora(out: Path) -> Path:
    """A valid safetensors file that is no LoRA: a small language model's tensors, no "lora" in any name
    (diffusers: "Invalid LoRA checkpoint"). Returns `out`."""
    generator = torch.Generator("cpu").manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=generator),
        "lm_head.weight": torch.randn(64, 16, generator=generator),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata={"format": "pt"})
    return out


def reference_pipeline(
    checkpoint: Path,
    lora: Path | None,
    scale: float,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> LatentConsistencyModelPipeline:
    """diffusers' own LCM pipeline on `checkpoint` with `lora` applied at `scale` (`scale` unused when
    `lora` is None: the base model), the reference a request's `lora_weights` and `lora_scale` are held to.

    Loaded as the other references are (tests/test_engine.py, tests/test_bf16.py): from the checkpoint's
    safetensors, offline, without the safety checker (the compared requests disable it). `channels_last`
    puts the UNet and VAE in the memory format the engine runs them in on a CPU (lcm.accel), which bf16
    comparisons need (see tests/test_bf16.py's docstring). The LoRA goes in by `load_lora_weights` (UNet
    and text encoder, either format) as adapter ADAPTER, then `set_adapters([ADAPTER],
    adapter_weights=[scale])`, which sets the same weight on both: each adapted layer computes
    W·x + scale·(alpha/rank)·B·A·x, alpha/rank being 1 for a peft file without alphas and the file's
    `.alpha` over its rank for a kohya one. Scale 0 gives the base model's output exactly.
    """
    pipe = pretrained(checkpoint, dtype, channels_last)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
        pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    return pipe
