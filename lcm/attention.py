"""The VAE's attention on a CPU in bf16: diffusers' classic processor up to MAX_TOKENS positions,
SDPA beyond (LCM_VAE_CLASSIC_ATTENTION, lcm.accel).

Why: torch's scaled_dot_product_attention is slow on a CPU in bf16 for the VAE's single head of 512
channels. On a 2-core AMD EPYC with AVX512-BF16, one call at 4096 positions (512 px) took 164.6 ms
against 43.3 ms for diffusers' AttnProcessor (baddbmm, softmax, bmm), at 9216 (768 px) 831 against
214; in fp32 the two decoders took the same time. The classic processor holds the scores whole
(about 10 bytes per query and key pair, its softmax in fp32): at 768 px the decoder's peak memory
did not move, its full-resolution activations being larger, while at 1024 px it rose by 1.4 GB; so
above MAX_TOKENS a call goes to SDPA. The UNet keeps SDPA: the classic processor made its step
slower (1975 -> 2481 ms at 512 px). Figures: bench/RESULTS.md, "VAE attention".
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

MAX_TOKENS = 96 * 96  # a 768 px image's latent positions: the largest measured not to raise the peak


class BoundedClassicAttention:
    """An attention processor: diffusers' AttnProcessor while the sequence is at most MAX_TOKENS
    long, its AttnProcessor2_0 (SDPA) beyond."""

    def __init__(self) -> None:
        self.classic = AttnProcessor()
        self.sdpa = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        tokens = max(_positions(hidden_states), _positions(source))
        processor = self.classic if tokens <= MAX_TOKENS else self.sdpa
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _positions(states: torch.Tensor) -> int:
    """Sequence length: height x width for (N, C, H, W) feature maps, else dimension 1 of (N, L, C)."""
    return math.prod(states.shape[2:]) if states.ndim == 4 else states.shape[1]
