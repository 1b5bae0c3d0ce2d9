"""The engine's fidelity contract on the tiny checkpoint, against diffusers' reference pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from lcm import params
from lcm.errors import InputError
from lcm.params import Request
from lcm.sampler import guidance_embedding

SIZE = 256


def request(**kw) -> Request:
    base = dict(prompt="a photo of a cat", width=SIZE, height=SIZE, seed=1234)
    return Request.build(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        tiny_checkpoint, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)

    def run(req: Request, seed: int) -> np.ndarray:
        out = pipe(
            req.prompt,
            height=req.height,
            width=req.width,
            num_inference_steps=req.num_inference_steps,
            original_inference_steps=req.lcm_origin_steps,
            guidance_scale=req.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]
        return (out * 255).round().astype(np.uint8)

    return run


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# Text-to-image requests held to diffusers' pipeline (test_bf16 holds the same ones in bf16).
TXT2IMG_CASES = [
    {},
    {"num_inference_steps": 1},
    {"num_inference_steps": 8, "guidance_scale": 2.5},
    {"num_inference_steps": 3, "lcm_origin_steps": 20, "width": 320, "height": 256},
]


@pytest.mark.parametrize("kw", TXT2IMG_CASES)
def test_single_image_equals_diffusers_pipeline(engine, reference, kw):
    req = request(**kw)
    ours = engine.generate(req).pixels
    assert ours.shape == (1, req.height, req.width, 3) and ours.dtype == np.uint8
    assert max_diff(ours[0], reference(req, req.seed)) <= 1


def test_batch_item_equals_same_seed_alone(engine, reference):
    batch = engine.generate(request(num_images=3)).pixels
    for i in range(3):
        alone = engine.generate(request(seed=1234 + i)).pixels[0]
        assert max_diff(batch[i], alone) <= 1
    assert max_diff(batch[2], reference(request(), 1236)) <= 1


def test_same_seed_same_pixels_other_seed_other_image(engine):
    a = engine.generate(request()).pixels
    assert np.array_equal(a, engine.generate(request()).pixels)
    assert max_diff(a, engine.generate(request(seed=4321)).pixels) > 10


def test_lcm_origin_steps_changes_the_schedule_and_image(engine):
    s50, s20 = engine.model.scheduler(request()), engine.model.scheduler(request(lcm_origin_steps=20))
    assert s50.timesteps.tolist() != s20.timesteps.tolist()
    assert not np.array_equal(
        engine.generate(request()).pixels, engine.generate(request(lcm_origin_steps=20)).pixels
    )


def test_guidance_scale_reaches_the_unet(engine):
    assert not np.array_equal(
        engine.generate(request()).pixels, engine.generate(request(guidance_scale=2.0)).pixels
    )


def test_guidance_embedding_is_diffusers_w_embedding():
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([7.0, 7.0]), 256)
    torch.testing.assert_close(guidance_embedding(8.0, 2, 256), ref, atol=1e-4, rtol=1e-4)


def test_one_unet_pass_per_step_with_timestep_cond(engine):
    calls = []
    handle = engine.model.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("timestep_cond")), with_kwargs=True
    )
    try:
        engine.generate(request(num_inference_steps=5, num_images=2))
    finally:
        handle.remove()
    assert len(calls) == 5
    assert all(
        c is not None and c.shape == (2, engine.model.pipe.unet.config.time_cond_proj_dim) for c in calls
    )


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("width", 100, "width=100"),
        ("width", 777, "multiple of 8"),
        ("height", 1032, "height=1032"),
        ("num_images", 0, "num_images=0"),
        ("num_images", 9, "1 to 8"),
        ("num_inference_steps", 51, "num_inference_steps=51"),
        ("guidance_scale", float("nan"), "guidance_scale=nan"),
        ("guidance_scale", 0.5, "1.0 to 20.0"),
        ("lcm_origin_steps", 3, "at least num_inference_steps=4"),
        ("seed", -1, "seed=-1"),
        ("seed", 2**32, "4294967295"),
        ("seed", True, "seed=True"),
    ],
)
def test_bad_values_are_refused_naming_field_and_allowed(field, value, needle):
    with pytest.raises(InputError) as info:
        request(**{field: value})
    assert info.value.field == field
    assert needle in str(info.value)


def test_missing_seed_is_drawn_from_32_bits():
    seeds = {Request.build("x", width=SIZE, height=SIZE).seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s <= params.MAX_SEED for s in seeds)
    assert request(seed=0).seed == 0


def test_predict_py_spells_every_input_as_the_engine_declares_it():
    """predict.py repeats INPUTS as literals for cog build's static parser: name, order, default,
    bounds and choices must stay equal to lcm.params, the one place they are declared."""
    import inspect

    import predict

    inputs = list(inspect.signature(predict.Predictor.predict).parameters.values())[1:]
    assert [p.name for p in inputs] == [spec.name for spec in params.INPUTS]
    for parameter, spec in zip(inputs, params.INPUTS, strict=True):
        declared = parameter.default
        assert declared.default == spec.default, spec.name
        if spec.kind in (int, float):
            assert (declared.ge, declared.le) == (spec.low, spec.high), spec.name
        assert list(declared.choices or []) == list(spec.choices), spec.name
    assert predict.DEFAULT_PROMPT == params.DEFAULT_PROMPT
