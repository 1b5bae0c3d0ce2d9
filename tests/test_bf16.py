"""The engine in bfloat16 against diffusers' own pipelines in bfloat16, mode by mode, on the tiny checkpoint.

Each reference is built as the fp32 test of its mode builds it (test_engine.py, test_features.py,
test_inpaint.py, test_controlnet.py, test_weighting.py), only loaded with dtype=torch.bfloat16; the LoRA's
is diffusers' own load_lora_weights on such a pipeline.

The bound, BOUND levels of 255 for every mode, is wider than fp32's 1 because bf16 keeps 8 bits of
mantissa: each rounding is off by up to 2^-9 relative (0.2%; 2^-8 between neighbours), and a tensor is
rounded after every operation. Our sampler's host-planned step (lcm.sampler.plan_steps) does the
arithmetic of diffusers' scheduler.step in another order and with other constants (host doubles where
diffusers multiplies by fp32 tensors), so its latents round differently at every step, by one bf16 unit
here and there; the VAE decoder spreads those over neighbouring pixels. One unit of a latent near 1
moves a pixel by a few levels through this decoder. Measured on this checkpoint (max over each mode's
cases, in levels of 255): txt2img 3, img2img 3, inpaint 2, canny ControlNet 3, FreeU 3, weighted
prompts 3, LoRA 3, a batch against its requests alone 2. The bound leaves room for another CPU's
kernels (AVX512-BF16, AMX, or bf16 emulated where neither exists) rounding other sums differently, and
stays far below what a wrong input or a missed step does (tens of levels: test_engine, test_controlnet).
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
from PIL import Image

from lcm import lora, prompts
from lcm.engine import FREEU, Engine
from lcm.loading import CONTROLNET_DIR
from lcm.params import Request
from lcm.worker import CancelFlag
from reference import gradient_png

BF16 = torch.bfloat16
SIZE = 256
PROMPT = "a photo of a cat"
BOUND = 6
MEASURED: dict[str, int] = {}


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def within(mode: str, ours: np.ndarray, theirs: np.ndarray) -> int:
    diff = max_diff(ours, theirs)
    MEASURED[mode] = max(MEASURED.get(mode, 0), diff)
    print(f"{mode}: {diff}")
    assert diff <= BOUND, (mode, diff)
    return diff


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


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


def pretrained(checkpoint: Path, cls=LatentConsistencyModelPipeline):
    pipe = cls.from_pretrained(checkpoint, local_files_only=True, use_safetensors=True, dtype=BF16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref(tiny_checkpoint) -> LatentConsistencyModelPipeline:
    """diffusers' LCM pipeline in bf16, without the safety checker (the requests disable it)."""
    pipe = pretrained(tiny_checkpoint)
    pipe.safety_checker = None
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


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_inference_steps": 1},
        {"num_inference_steps": 8, "guidance_scale": 2.5},
        {"num_inference_steps": 3, "lcm_origin_steps": 20, "width": 320, "height": 256},
    ],
)
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
    """Where the schedules agree (test_inpaint explains the pairs), the pipeline itself is the reference."""
    req = request(image=inputs["photo"], mask=inputs["mask"], seed=7, **ours)
    names = ("vae", "text_encoder", "tokenizer", "unet", "feature_extractor")
    pipe = StableDiffusionInpaintPipeline(
        **{name: ref.components[name] for name in names},
        scheduler=LCMScheduler.from_config(ref.scheduler.config),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT,
        image=req.image,
        mask_image=req.mask,
        height=SIZE,
        width=SIZE,
        strength=theirs["strength"],
        num_inference_steps=theirs["steps"],
        guidance_scale=8.0,
        generator=generator(7),
        output_type="np",
    ).images[0]
    within("inpaint", bf16.generate(req).pixels[0], to_uint8(out))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "num_inference_steps": 4,
            "lcm_origin_steps": 20,
            "guidance_scale": 3.0,
            "controlnet_conditioning_scale": 0.7,
            "control_guidance_start": 0.2,
            "control_guidance_end": 0.8,
            "canny_low_threshold": 50,
            "canny_high_threshold": 120,
        },
    ],
)
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
    generation = bf16.generate(req)
    # The engine's edge map is OpenCV's Canny on the fitted image (test_controlnet checks it): the same input.
    out = pipe(
        PROMPT,
        image=generation.edges,
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
    within("controlnet", generation.pixels[0], to_uint8(out))


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
        assert engine.pipe.unet.dtype == BF16
        req = request(prompt="a photo", lora_scale=scale)
        ours = engine.generate(req).pixels[0]
        plain = engine.generate(request(prompt="a photo", lora_scale=0.0)).pixels[0]
    finally:
        engine.close()
    pipe = pretrained(tiny_checkpoint)
    pipe.safety_checker = None
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[scale])
    within("lora", ours, run_lcm(pipe, req))
    assert max_diff(ours, plain) > BOUND  # the LoRA moved the image beyond rounding


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


def test_measured():
    print(MEASURED)
