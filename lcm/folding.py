"""The VAE decoder's upsamplers folded: nearest 2x upsampling and a 3x3 convolution as one 2x2
convolution of the input per output pixel phase (LCM_FOLD_UPSAMPLE, lcm.accel).

Why: after nearest upsampling, each 3x3 window sees only 2x2 distinct input pixels; which rows and
columns, and which of the 9 weights fall on the same pixel, depend only on the output pixel's row
and column parity. Summing those weights once in setup gives four 2x2 kernels, one per phase, run
as one convolution with four times the output channels over the input, whose phases are then
interleaved: 16 multiply-adds per input pixel and channel pair where the upsampled convolution
does 36. The SD VAE decoder's three upsampler convolutions are about 28% of its FLOPs
(2.48 TFLOP at 512 px, torch.utils.flop_counter). Measured on the full-size synthetic VAE, one
decode at 512 px on a 2-core AMD EPYC with AVX512-BF16: 3338 -> 2702 ms in bf16, 5936 -> 5276 ms
in fp32 (bench/RESULTS.md, "Folded upsamplers").

Exact in real arithmetic: in float32 the decoder's output stays within 1.5e-5 of diffusers'. In
bf16 the summed weights are rounded to bf16 once (they are summed in float32), a rounding of the
same size as the weights' own. The torch UNet keeps diffusers' upsamplers: a request's LoRA may
patch their convolutions, which folded kernels would not see, under the module names it targets.
OpenVINO's converted UNet, which no LoRA request reaches, is traced with them folded (`folded`,
lcm.openvino_runtime).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D

# Which of a 3x3 kernel's rows (or columns) land on each of the two input rows a phase reads:
# phase 0 (even output rows) reads input rows i-1 and i, with kernel rows 0 and 1+2; phase 1 (odd)
# reads rows i and i+1, with kernel rows 0+1 and 2.
TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) parity, in the folded kernel's order


def foldable(module: Any) -> bool:
    """Whether the module is diffusers' nearest 2x upsampler followed by a plain 3x3 convolution."""
    if not isinstance(module, Upsample2D) or module.use_conv_transpose or module.norm is not None:
        return False
    conv = getattr(module, "conv", None) if module.name == "conv" else getattr(module, "Conv2d_0", None)
    return (
        module.use_conv
        and module.interpolate
        and isinstance(conv, torch.nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.bias is not None
    )


class FoldedUpsample(torch.nn.Module):
    """Stands in for one diffusers Upsample2D; a call it does not cover runs the original module."""

    def __init__(self, upsample: Upsample2D) -> None:
        super().__init__()
        self.upsample = upsample
        conv = upsample.conv if upsample.name == "conv" else upsample.Conv2d_0
        weight = conv.weight.detach()
        taps = TAPS.to(weight.device)
        kernels = torch.einsum("apr,oirc,bqc->aboipq", taps, weight.float(), taps)
        out_channels = weight.shape[0]
        self.out_channels = out_channels
        folded = kernels.reshape(4 * out_channels, weight.shape[1], 2, 2).to(weight.dtype)
        layout = torch.channels_last if _channels_last(weight) else torch.contiguous_format
        self.register_buffer("weight", folded.contiguous(memory_format=layout), persistent=False)
        self.register_buffer("bias", conv.bias.detach().repeat(4), persistent=False)

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        batch, _, height, width = hidden_states.shape
        if args or kwargs or (output_size is not None and tuple(output_size) != (2 * height, 2 * width)):
            return self.upsample(hidden_states, output_size, *args, **kwargs)
        # Over the input padded by 1, phase (a, b)'s 2x2 windows start at row i + a, column j + b.
        phases = F.conv2d(hidden_states, self.weight, self.bias, padding=1)
        layout = torch.channels_last if _channels_last(hidden_states) else torch.contiguous_format
        out = torch.empty(
            (batch, self.out_channels, 2 * height, 2 * width),
            dtype=phases.dtype,
            device=phases.device,
            memory_format=layout,
        )
        for index, (a, b) in enumerate(PHASES):
            channels_of = slice(index * self.out_channels, (index + 1) * self.out_channels)
            out[:, :, a::2, b::2] = phases[:, channels_of, a : a + height, b : b + width]
        return out


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def _slots(model: torch.nn.Module) -> list[tuple[torch.nn.ModuleList, int]]:
    """Where the model's up blocks hold a foldable upsampler: (the block's upsamplers, index)."""
    return [
        (upsamplers, index)
        for block in getattr(model, "up_blocks", ())
        for upsamplers in [getattr(block, "upsamplers", None) or ()]
        for index, upsampler in enumerate(upsamplers)
        if foldable(upsampler)
    ]


def fold_upsamplers(decoder: torch.nn.Module) -> int:
    """Replace each foldable upsampler in the decoder's up blocks; returns how many were.

    Run it after the decoder's dtype and memory format are set: the folded kernels are computed
    from the weights as they are then, and follow a later `.to()` only as a cast.
    """
    slots = _slots(decoder)
    for upsamplers, index in slots:
        upsamplers[index] = FoldedUpsample(upsamplers[index])
    return len(slots)


@contextmanager
def folded(model: torch.nn.Module) -> Iterator[int]:
    """The model's foldable upsamplers folded inside the block (it gives how many), diffusers' own
    again after it: for a copy made meanwhile, such as a trace. The folded kernels live until the
    block ends."""
    originals = [(upsamplers, index, upsamplers[index]) for upsamplers, index in _slots(model)]
    for upsamplers, index, upsampler in originals:
        upsamplers[index] = FoldedUpsample(upsampler)
    try:
        yield len(originals)
    finally:
        for upsamplers, index, upsampler in originals:
            upsamplers[index] = upsampler
