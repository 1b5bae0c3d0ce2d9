"""LoRA files the engine must refuse, and diffusers' own reading of a LoRA: the truth the engine is held
to. The LoRAs users bring, in both formats, are lcm.synthetic_loras' (re-exported here for the tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline
from safetensors.torch import save_file

from lcm.synthetic_loras import factors, kohya_lora, peft_lora
from reference import pretrained

__all__ = ["ADAPTER", "kohya_lora", "not_a_lora", "other_model_lora", "peft_lora", "reference_pipeline"]

ADAPTER = "request"  # the adapter's name in the reference pipeline


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
        down, up = factors(torch.Size(shape), rank, generator)
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
