"""The engine in bfloat16 against diffusers' own pipelines loaded in bfloat16, mode by mode, on the tiny
checkpoint; a batch against its requests alone; and bf16 against the fp32 engine.

Each reference is built as the fp32 test of its mode builds it (test_engine, test_features, test_inpaint,
test_controlnet, test_weighting, test_batching), only from a pipeline loaded with dtype=torch.bfloat16;
the LoRA's is diffusers' own load_lora_weights on such a pipeline (the fp32 suite has no LoRA reference).

One bound for every mode, BOUND levels of 255, where fp32's tests allow 1. bf16 keeps an 8-bit mantissa:
each rounding is off by up to 2^-9 relative, and every operation rounds. Two things round differently
here than in diffusers. The engine runs the UNet and the VAE in channels_last on a CPU (lcm.accel), and
oneDNN's bf16 convolutions sum in another order per memory format: the references use channels_last too,
yet diffusers' img2img hands the UNet the VAE encoder's strided latents where the engine makes them
contiguous. And our sampler's host-planned step (lcm.sampler.plan_steps) does scheduler.step's
arithmetic in another order, with host doubles where diffusers multiplies by fp32 tensors. A latent one
bf16 unit off (2^-5 near 5) moves pixels by a few levels through the decoder. Batching changes the
convolutions' shapes, so their kernels' sums: a batch differs from its requests alone as the engine
from diffusers does (0 with channels_last off). Measured on this checkpoint on a CPU with AVX512-BF16
(max over each mode's cases; plain diffusers without channels_last in brackets): txt2img 5 (7),
img2img 5 (7), inpaint 10 (15), canny ControlNet 4 (6), FreeU 3 (5), weighted prompts 3 (7), LoRA 3 (6),
a batch against its requests alone 6; bf16 against the fp32 engine 6. With channels_last off and
scheduler.step, every mode but img2img (the strides) and LoRA comes within 1. The bound leaves room for
other kernels (AMX, or bf16 emulated where the CPU has neither) and stays below what a lost feature does
(FreeU left off: about 70 levels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from compel import CompelForSD
from diffusers import (
    ControlNetModel,
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
)
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image
from test_controlnet import CASES, edge_map
from test_engine import TXT2IMG_CASES, max_diff
from test_inpaint import run_pipeline, to_uint8

from lcm import lora, prompts
from lcm.engine import Engine
from lcm.generation import FREEU
from lcm.loading import CONTROLNET_DIR
from lcm.params import Request
from lcm.worker import CancelFlag
from reference import gradient_png, pretrained

BF16 = torch.bfloat16
SIZE = 256
PROMPT = "a photo of a cat"
BOUND = 16  # levels of 255, for every mode: see the module docstring


def within(mode: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    diff = max_diff(ours, theirs)
    print(f"{mode}: max pixel difference {diff}")
    assert diff <= BOUND, (mode, diff)


def request(**kw: Any) -> Request:
    base = dict(prompt=PROMPT, width=SIZE, height=SIZE, seed=5, num_inference_steps=2)
    return Request.build(**{**base, "disable_safety_checker": True, **kw})


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def bf16(tiny_checkpoint):
    engine = Engine.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ref(tiny_checkpoint, bf16) -> LatentConsistencyModelPipeline:
    """diffusers' pipeline in bf16, in the engine's memory format and with its VAE attention: a bf16
    engine on a CPU runs the VAE's attention through diffusers' classic AttnProcessor (lcm.attention,
    at the tests' sizes always), whose fp32 softmax rounds otherwise than bf16 SDPA (inpainting
    measured 17 levels from an SDPA reference, though no further from the fp32 engine than SDPA's)."""
    pipe = pretrained(tiny_checkpoint, BF16, bf16.model.accel.channels_last)
    if bf16.model.accel.vae_classic_attention:
        pipe.vae.set_attn_processor(AttnProcessor())
    return pipe


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """test_features' photo, test_inpaint's photo and square mask, test_controlnet's block mosaic, at SIZE."""
    folder = tmp_path_factory.mktemp("bf16")
    (folder / "gradient.png").write_bytes(gradient_png())
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    photo = np.stack([x, y, (x + y) // 2], axis=-1) + rng.integers(0, 40, (SIZE, SIZE, 3))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(folder / "photo.png")
    square = np.zeros((SIZE, SIZE), dtype=np.uint8)
    square[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 255
    Image.fromarray(square).save(folder / "mask.png")
    levels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    blocks = np.repeat(np.repeat(levels, SIZE // 16, axis=0), SIZE // 16, axis=1)
    Image.fromarray(np.stack([blocks] * 3, axis=-1)).save(folder / "blocks.png")
    return {name: folder / f"{name}.png" for name in ("gradient", "photo", "mask", "blocks")}


def run_lcm(pipe, req: Request, **kw: Any) -> np.ndarray:
    """A text-to-image pipeline call as `req` asks, with `kw` (prompt_embeds, say) for the prompt."""
    out = pipe(
        **(kw or {"prompt": req.prompt}),
        height=req.height,
        width=req.width,
        num_inference_steps=req.num_inference_steps,
        original_inference_steps=req.lcm_origin_steps,
        guidance_scale=req.guidance_scale,
        generator=generator(req.seed),
        output_type="np",
    ).images[0]
    return to_uint8(out)


# --- every mode against diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("kw", TXT2IMG_CASES)
def test_txt2img_equals_diffusers_in_bf16(bf16, ref, kw):
    req = request(**kw)
    ours = bf16.generate(req).pixels
    assert ours.shape == (1, req.height, req.width, 3) and ours.dtype == np.uint8
    within("txt2img", ours[0], run_lcm(ref, req))


@pytest.mark.parametrize("strength, steps", [(0.8, 4), (0.5, 2)])
def test_img2img_equals_diffusers_img2img_in_bf16(bf16, ref, inputs, strength, steps):
    req = request(image=inputs["gradient"], prompt_strength=strength, num_inference_steps=steps, seed=3)
    pipe = LatentConsistencyModelImg2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPT,
        image=req.image,
        strength=strength,
        num_inference_steps=steps,
        original_inference_steps=50,
        guidance_scale=8.0,
        generator=generator(3),
        output_type="np",
    ).images[0]
    within("img2img", bf16.generate(req).pixels[0], to_uint8(theirs))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"prompt_strength": 1.0}, {"steps": 2, "strength": 1.0}),
        ({"prompt_strength": 0.5}, {"steps": 4, "strength": 0.5}),
    ],
)
def test_inpaint_equals_diffusers_inpainting_pipeline_in_bf16(bf16, ref, inputs, ours, theirs):
    """As test_inpaint: where the schedules agree, diffusers' inpainting pipeline with the LCM scheduler."""
    req = request(image=inputs["photo"], mask=inputs["mask"], seed=7, **ours)
    names = ("vae", "text_encoder", "tokenizer", "unet", "feature_extractor")
    pipe = StableDiffusionInpaintPipeline(
        **{name: ref.components[name] for name in names},
        scheduler=LCMScheduler.from_config(ref.scheduler.config),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    within("inpaint", bf16.generate(req).pixels[0], run_pipeline(pipe, req, **theirs))


@pytest.mark.parametrize("kw", CASES)
def test_canny_controlnet_equals_diffusers_controlnet_pipeline_in_bf16(
    bf16, ref, tiny_checkpoint, inputs, kw
):
    req = request(control_image=inputs["blocks"], **kw)
    controlnet = ControlNetModel.from_pretrained(
        tiny_checkpoint, subfolder=CONTROLNET_DIR, local_files_only=True, use_safetensors=True, dtype=BF16
    )
    parts = {name: ref.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet")}
    pipe = StableDiffusionControlNetPipeline(
        **parts,
        controlnet=controlnet,
        scheduler=LCMScheduler.from_config(
            ref.scheduler.config, original_inference_steps=req.lcm_origin_steps
        ),
        safety_checker=None,
        feature_extractor=ref.feature_extractor,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        image=edge_map(req.control_image, req.canny_low_threshold, req.canny_high_threshold),
        height=SIZE,
        width=SIZE,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        controlnet_conditioning_scale=req.controlnet_conditioning_scale,
        control_guidance_start=req.control_guidance_start,
        control_guidance_end=req.control_guidance_end,
        generator=generator(req.seed),
        output_type="np",
    ).images[0]
    within("controlnet", bf16.generate(req).pixels[0], to_uint8(out))


def test_freeu_equals_diffusers_with_enable_freeu_in_bf16(bf16, ref):
    req = request(freeu=True)
    ref.enable_freeu(**FREEU)
    try:
        theirs = run_lcm(ref, req)
    finally:
        ref.disable_freeu()
    ours = bf16.generate(req).pixels[0]
    within("freeu", ours, theirs)
    assert max_diff(ours, bf16.generate(request()).pixels[0]) > BOUND  # FreeU was on, beyond rounding


@pytest.mark.parametrize("prompt", [f"{PROMPT}++", f'("{PROMPT}", "a red fox").blend(0.7, 0.3)'])
def test_a_weighted_prompt_equals_diffusers_fed_compels_embeddings_in_bf16(bf16, ref, prompt):
    req = request(prompt=prompt)
    embeds = CompelForSD(ref)(prompts.compel_text(prompt)).embeds
    generation = bf16.generate(req)
    assert generation.weighted
    within("weighted", generation.pixels[0], run_lcm(ref, req, prompt_embeds=embeds))


@pytest.fixture(scope="module")
def lora_file(lora_weights, tmp_path_factory) -> Path:
    return lora.fetch(str(lora_weights), tmp_path_factory.mktemp("lora-file"))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_lora_equals_diffusers_load_lora_weights_in_bf16(tiny_checkpoint, lora_file, scale):
    engine = Engine.load(tiny_checkpoint, device="cpu", lora_path=lora_file, dtype="bfloat16")
    try:
        assert {p.dtype for p in engine.model.pipe.unet.parameters()} == {BF16}  # the LoRA's layers too
        req = request(prompt="a photo", lora_scale=scale)
        ours = engine.generate(req).pixels[0]
        plain = engine.generate(request(prompt="a photo", lora_scale=0.0)).pixels[0]
    finally:
        engine.close()
    pipe = pretrained(tiny_checkpoint, BF16, engine.model.accel.channels_last)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[scale])
    within("lora", ours, run_lcm(pipe, req))
    assert not np.array_equal(ours, plain)  # the LoRA is applied (the tiny one moves pixels by ~10)


def test_a_batch_equals_its_requests_alone_in_bf16(bf16):
    asked = [
        {},
        {"prompt": "a red fox on a hill at dawn", "seed": 7, "guidance_scale": 3.0, "clip_skip": 1},
        {"prompt": f"{PROMPT}++", "seed": 9},
    ]
    requests = [request(**kw, num_images=2 if i == 1 else 1) for i, kw in enumerate(asked)]
    together = bf16.call(bf16.generate_batch, requests, [CancelFlag() for _ in requests])
    assert [g.batch for g in together] == [(3, 4)] * 3
    for kw, req, generation in zip(asked, requests, together, strict=True):
        for i, seed in enumerate(req.seeds):
            alone = bf16.generate(request(**{**kw, "seed": seed})).pixels[0]
            within("batch", generation.pixels[i], alone)


# --- bf16 is what runs ---------------------------------------------------------------------------------


def test_every_model_a_request_runs_is_bf16(bf16):
    pipe = bf16.model.pipe
    parts = {name: pipe.components[name] for name in ("unet", "vae", "text_encoder", "safety_checker")}
    parts |= {"controlnet": bf16.model.controlnet, "taesd": bf16.model.taesd}
    assert all(module is not None for module in parts.values())  # the tiny checkpoint has them all
    assert bf16.model.dtype == BF16
    for name, module in parts.items():
        assert {p.dtype for p in module.parameters()} == {BF16}, name


@pytest.mark.parametrize("kw", [{}, {"num_inference_steps": 4, "guidance_scale": 3.0}])
def test_bf16_differs_from_fp32_within_a_bound(bf16, engine, kw):
    """Not the fp32 image, so bf16 really ran; near it, so it is the same model and method."""
    req = request(**kw)
    assert engine.model.dtype == torch.float32
    ours, fp32 = bf16.generate(req).pixels[0], engine.generate(req).pixels[0]
    diff = max_diff(ours, fp32)
    print(f"bf16 against fp32: max pixel difference {diff}")
    assert 0 < diff <= BOUND
