"""The VAE's bounded classic attention (lcm/attention.py): diffusers' AttnProcessor up to MAX_TOKENS
positions, SDPA beyond, either way what diffusers' own processors compute."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0

from lcm import accel, attention
from lcm.engine import Engine
from lcm.errors import LCMError


class Recording:
    """A processor that notes its name each time it runs, then runs the one it wraps."""

    def __init__(self, processor, name: str, ran: list[str]) -> None:
        self.processor, self.name, self.ran = processor, name, ran

    def __call__(self, *args, **kwargs):
        self.ran.append(self.name)
        return self.processor(*args, **kwargs)


@pytest.mark.parametrize("side,expected", [(8, "classic"), (12, "sdpa")])
def test_each_call_goes_to_the_processor_its_length_allows(tiny_checkpoint, monkeypatch, side, expected):
    """With MAX_TOKENS at 100 positions, an 8x8 map (64) takes the classic processor and a 12x12
    (144) SDPA; both equal diffusers' SDPA processor in fp32."""
    monkeypatch.setattr(attention, "MAX_TOKENS", 100)
    vae = AutoencoderKL.from_pretrained(tiny_checkpoint, subfolder="vae", use_safetensors=True).eval()
    module = vae.decoder.mid_block.attentions[0]
    bounded, ran = attention.BoundedClassicAttention(), []
    bounded.classic = Recording(bounded.classic, "classic", ran)
    bounded.sdpa = Recording(bounded.sdpa, "sdpa", ran)
    x = torch.randn(2, module.to_q.in_features, side, side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        module.set_processor(AttnProcessor2_0())
        expected_out = module(x)
        module.set_processor(bounded)
        got = module(x)
    assert ran == [expected]
    torch.testing.assert_close(got, expected_out, rtol=1e-5, atol=1e-5)


def test_a_bf16_cpu_engine_puts_it_on_the_vae_alone(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("LCM_VAE_CLASSIC_ATTENTION", raising=False)
    engine = Engine.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    try:
        pipe = engine.model.pipe
        assert set(map(type, pipe.vae.attn_processors.values())) == {attention.BoundedClassicAttention}
        assert not any(
            isinstance(p, attention.BoundedClassicAttention) for p in pipe.unet.attn_processors.values()
        )
        assert "vae_classic_attention" in engine.model.accel.describe()
    finally:
        engine.close()


@pytest.mark.parametrize(
    "device,dtype,env,expected",
    [
        ("cpu", torch.bfloat16, {}, True),
        ("cpu", torch.float32, {}, False),  # measured: in fp32 the two processors decode in the same time
        ("cpu", torch.bfloat16, {"LCM_FUSE_QKV": "1"}, False),  # fused projections keep their processor
        ("cpu", torch.float32, {"LCM_VAE_CLASSIC_ATTENTION": "1"}, True),
        ("cpu", torch.bfloat16, {"LCM_VAE_CLASSIC_ATTENTION": "0"}, False),
    ],
)
def test_its_default_and_switch(monkeypatch, device, dtype, env, expected):
    for name in ("LCM_FUSE_QKV", "LCM_VAE_CLASSIC_ATTENTION", "LCM_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LCM_RUNTIME", "torch")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = accel.Accel.from_env(torch.device(device), dtype, SimpleNamespace(force_upcast=False))
    assert settings.vae_classic_attention is expected


def test_it_is_refused_with_fused_projections(monkeypatch):
    monkeypatch.setenv("LCM_FUSE_QKV", "1")
    monkeypatch.setenv("LCM_VAE_CLASSIC_ATTENTION", "1")
    with pytest.raises(LCMError, match="LCM_VAE_CLASSIC_ATTENTION=1 cannot run with LCM_FUSE_QKV=1"):
        accel.Accel.from_env(torch.device("cpu"), torch.bfloat16, SimpleNamespace(force_upcast=False))
