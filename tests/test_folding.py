"""Folded upsamplers (lcm/folding.py) compute what diffusers' Upsample2D computes, at any size and
memory format, and hand every call they do not cover to it."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from lcm.folding import FoldedUpsample, fold_upsamplers, foldable


def upsampler(channels: int, out_channels: int | None = None, seed: int = 0, **kw) -> Upsample2D:
    torch.manual_seed(seed)
    module = Upsample2D(channels, use_conv=True, out_channels=out_channels, **kw).eval()
    with torch.no_grad():  # a bias as large as the weights, so that a misplaced one shows
        module.conv.bias.normal_(0, 0.1)
    return module


def inputs(channels: int, height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("height,width", [(4, 4), (5, 7), (1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_equals_diffusers_upsampler(height, width, channels_last):
    """Exact in real arithmetic: float32 rounding apart (sums of 9 products in another order)."""
    original = upsampler(8, out_channels=6)
    x = inputs(8, height, width)
    if channels_last:
        original.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    folded = FoldedUpsample(original)
    with torch.inference_mode():
        expected, got = original(x), folded(x)
    assert got.shape == expected.shape == (2, 6, 2 * height, 2 * width)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_is_as_close_to_float32_as_diffusers_bfloat16():
    """The folded kernels are sums of bf16 weights, rounded to bf16 once more: that rounding is of the
    weights' own size, so the folded bf16 output lands about as far from the float32 result as
    diffusers' bf16 does. Measured over seeds 0 to 5: a mean error 1.15 to 1.18 times diffusers'
    bf16's, a largest error 0.97 to 1.38 times; bounds 1.3 and 1.5. (Over the whole full-size decoder
    at 256 px the mean pixel error from fp32 went from 0.536 to 0.553 levels, the largest 5-6 to 6.)"""
    for seed in range(3):
        original = upsampler(32, seed=seed)
        x = inputs(32, 9, 9)
        with torch.inference_mode():
            exact = original(x)
            original.to(torch.bfloat16)
            theirs = original(x.bfloat16()).float()
            ours = FoldedUpsample(original)(x.bfloat16()).float()
        assert (ours - exact).abs().mean() <= 1.3 * (theirs - exact).abs().mean()
        assert (ours - exact).abs().max() <= 1.5 * (theirs - exact).abs().max()


def test_calls_it_does_not_cover_run_diffusers_upsampler():
    """An output size other than twice the input's (diffusers' UNet passes the skip connection's),
    or an argument it does not know, goes to the original module."""
    original = upsampler(4)
    folded = FoldedUpsample(original)
    x = inputs(4, 5, 5)
    with torch.inference_mode():
        assert torch.equal(folded(x, (11, 9)), original(x, (11, 9)))
        torch.testing.assert_close(folded(x, (10, 10)), original(x), rtol=1e-5, atol=1e-5)
    calls = []
    original.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        folded(x, (11, 9))
        with pytest.warns(FutureWarning, match="scale"):  # deprecated: diffusers warns and ignores it
            folded(x, None, 1.0)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "kw,expected",
    [
        ({}, True),
        ({"kernel_size": 1, "padding": 0}, False),
        ({"use_conv_transpose": True}, False),
        ({"norm_type": "rms_norm", "eps": 1e-5, "elementwise_affine": True}, False),
        ({"interpolate": False}, False),
    ],
)
def test_only_nearest_upsampling_and_a_3x3_convolution_is_folded(kw, expected):
    module = Upsample2D(4, use_conv=not kw.get("use_conv_transpose"), **kw)
    assert foldable(module) is expected
    assert not foldable(torch.nn.Conv2d(4, 4, 3, padding=1))


def test_fold_upsamplers_replaces_each_up_blocks_upsampler(tiny_checkpoint):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_checkpoint, subfolder="vae", use_safetensors=True).eval()
    blocks = [block for block in vae.decoder.up_blocks if block.upsamplers]
    assert blocks and fold_upsamplers(vae.decoder) == len(blocks)
    assert all(isinstance(block.upsamplers[0], FoldedUpsample) for block in blocks)
    assert fold_upsamplers(vae.decoder) == 0  # already folded


def test_folded_folds_the_unets_upsamplers_inside_the_block_only(tiny_checkpoint):
    """What lcm.openvino_runtime traces: inside the block the UNet runs folded, to float32 rounding
    of diffusers' output; after it, the same Upsample2D objects are back where they were."""
    from diffusers import UNet2DConditionModel

    from lcm.folding import folded

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint, subfolder="unet", use_safetensors=True)
    unet.eval()
    before = [(block, block.upsamplers[0]) for block in unet.up_blocks if block.upsamplers]
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    w = torch.randn(1, unet.config.time_cond_proj_dim, generator=generator)

    def run() -> torch.Tensor:
        return unet(sample, 999, encoder_hidden_states=emb, timestep_cond=w).sample

    with torch.inference_mode():
        expected = run()
        with folded(unet) as count:
            assert count == len(before) > 0
            assert all(isinstance(block.upsamplers[0], FoldedUpsample) for block, _ in before)
            calls = []
            for block, original in before:
                block.upsamplers[0].register_forward_hook(lambda *_: calls.append("folded"))
                original.register_forward_hook(lambda *_: calls.append("diffusers"))
            got = run()
    assert calls == ["folded"] * count  # at 16x16 latents every upsampler doubles exactly
    assert all(block.upsamplers[0] is original for block, original in before)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
