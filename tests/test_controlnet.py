"""The canny ControlNet on the tiny checkpoint (it holds a tiny random ControlNet): diffusers' own
pipelines as the reference, each input changing the image, and the rules around a control image."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    LatentConsistencyModelImg2ImgPipeline,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from lcm import batching, control
from lcm.cli import main as cli_main
from lcm.errors import InputError, LCMError
from lcm.metadata import read_metadata
from lcm.params import Request
from lcm.synthetic import CONTROLNET_CONFIG, model_config
from lcm.worker import CancelFlag, Job
from reference import gradient_png

PROMPT = "a photo of a cat"


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> str:
    """A 256x256 mosaic of 16x16 grey blocks of random levels: step edges of every contrast, so each
    Canny threshold decides some of them."""
    levels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    pixels = np.repeat(np.repeat(levels, 16, axis=0), 16, axis=1)
    path = tmp_path_factory.mktemp("control") / "blocks.png"
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    """A smooth 320x256 RGB image, the starting image for image to image."""
    path = tmp_path_factory.mktemp("control") / "photo.png"
    path.write_bytes(gradient_png())
    return str(path)


def build(blocks: str, **kw) -> Request:
    base = {"prompt": PROMPT, "seed": 5, "num_inference_steps": 2, "control_image": blocks}
    return Request.build(**{**base, "disable_safety_checker": True, **kw})


def edge_map(fitted: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny on the fitted control image's grey levels, as the 3-channel image diffusers takes."""
    edges = cv2.Canny(cv2.cvtColor(np.asarray(fitted), cv2.COLOR_RGB2GRAY), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def controlnet_pipeline(engine, origin_steps: int) -> StableDiffusionControlNetPipeline:
    """diffusers' ControlNet pipeline over the engine's own components and the LCM scheduler."""
    pipe = engine.model.pipe
    ref = StableDiffusionControlNetPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        controlnet=engine.model.controlnet,
        scheduler=LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=origin_steps),
        safety_checker=None,
        feature_extractor=pipe.feature_extractor,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def test_vendored_config_is_the_sd15_unet_encoder_half():
    """The vendored canny config builds what ControlNetModel.from_unet makes of the vendored UNet."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model_config("unet", "full"))
        derived = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        vendored = ControlNetModel.from_config(json.loads(CONTROLNET_CONFIG.read_text()))
    shapes = {k: tuple(v.shape) for k, v in vendored.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in derived.state_dict().items()}
    assert vendored.config.cross_attention_dim == 768 and vendored.config.conditioning_channels == 3


# The ControlNet settings each mode is compared with diffusers at (test_bf16.py too): the defaults, and
# every setting moved.
CASES = [
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
]


@pytest.mark.parametrize("kw", CASES)
def test_text_to_image_equals_diffusers_controlnet_pipeline(engine, blocks, kw):
    req = build(blocks, **kw)
    ref = controlnet_pipeline(engine, req.lcm_origin_steps)(
        PROMPT,
        image=edge_map(req.control_image, req.canny_low_threshold, req.canny_high_threshold),
        height=req.height,
        width=req.width,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        controlnet_conditioning_scale=req.controlnet_conditioning_scale,
        control_guidance_start=req.control_guidance_start,
        control_guidance_end=req.control_guidance_end,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    assert max_diff(engine.generate(req).pixels[0], to_uint8(ref)) <= 1


def test_image_to_image_equals_diffusers_pieces(engine, blocks, photo):
    """diffusers 0.42.1's StableDiffusionControlNetImg2ImgPipeline runs classifier-free guidance and
    passes no timestep_cond, and it applies strength by slicing the step list where the LCM img2img
    pipeline asks LCMScheduler.set_timesteps(strength=...): as is, it is not LCM image to image. So the
    reference is built from diffusers' own pieces: LatentConsistencyModelImg2ImgPipeline's timesteps
    and start latents (its set_timesteps call and prepare_latents), then StableDiffusionControlNetPipeline
    denoising from those latents over those timesteps (its `latents=` and `timesteps=` arguments), with
    the same generator throughout, so the step noise follows the start latents as in one pipeline run.
    """
    req = build(
        blocks, image=photo, prompt_strength=0.6, num_inference_steps=3, controlnet_conditioning_scale=1.5
    )
    assert (req.width, req.height) == (320, 256) and req.control_image.size == (320, 256)
    pipe = engine.model.pipe
    lcm_img2img = LatentConsistencyModelImg2ImgPipeline(**pipe.components)
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3, original_inference_steps=50, strength=0.6)
    generator = torch.Generator("cpu").manual_seed(5)
    start = lcm_img2img.prepare_latents(
        lcm_img2img.image_processor.preprocess(req.image),
        scheduler.timesteps[:1],
        1,
        1,
        torch.float32,
        torch.device("cpu"),
        generator,
    )
    ref = controlnet_pipeline(engine, 50)(
        PROMPT,
        image=edge_map(req.control_image, 100, 200),
        height=256,
        width=320,
        timesteps=[int(t) for t in scheduler.timesteps],
        guidance_scale=8.0,
        controlnet_conditioning_scale=1.5,
        latents=start,
        generator=generator,
        output_type="np",
    ).images[0]
    ours = engine.generate(req).pixels[0]
    assert max_diff(ours, to_uint8(ref)) <= 1
    plain = engine.generate(
        build(blocks, image=photo, prompt_strength=0.6, num_inference_steps=3, control_image=None)
    )
    assert max_diff(ours, plain.pixels[0]) > 20  # the edges guide image to image too


def test_each_setting_changes_the_image_and_scale_zero_is_no_control(engine, blocks):
    base = engine.generate(build(blocks)).pixels[0]
    plain = engine.generate(build(blocks, control_image=None, width=256, height=256)).pixels[0]
    assert max_diff(base, plain) > 50
    assert max_diff(engine.generate(build(blocks, controlnet_conditioning_scale=0.0)).pixels[0], plain) == 0
    changed = {
        "controlnet_conditioning_scale": 0.5,
        "control_guidance_start": 0.5,  # of 2 steps: the first runs without the ControlNet
        "control_guidance_end": 0.5,  # the second runs without it
        "canny_low_threshold": 20,
        "canny_high_threshold": 150,
    }
    for name, value in changed.items():
        assert max_diff(engine.generate(build(blocks, **{name: value})).pixels[0], base) > 20, name


def test_step_scales_are_diffusers_controlnet_keep():
    assert control.step_scales(4, 2.0, 0.0, 1.0) == [2.0] * 4
    assert control.step_scales(4, 1.0, 0.25, 0.75) == [0.0, 1.0, 1.0, 0.0]
    assert control.step_scales(3, 1.0, 0.5, 1.0) == [0.0, 0.0, 1.0]  # a step must lie wholly inside


@pytest.mark.parametrize(
    "kw,field,other",
    [
        (
            {"control_guidance_start": 0.6, "control_guidance_end": 0.6},
            "control_guidance_start",
            "control_guidance_end",
        ),
        (
            {"control_guidance_start": 0.8, "control_guidance_end": 0.2},
            "control_guidance_start",
            "control_guidance_end",
        ),
        (
            {"canny_low_threshold": 200, "canny_high_threshold": 200},
            "canny_low_threshold",
            "canny_high_threshold",
        ),
        (
            {"canny_low_threshold": 250, "canny_high_threshold": 100},
            "canny_low_threshold",
            "canny_high_threshold",
        ),
    ],
)
def test_crossed_bounds_are_refused_naming_both_fields(blocks, kw, field, other):
    with pytest.raises(InputError) as info:
        build(blocks, **kw)
    assert info.value.field == field and other in str(info.value)


def test_settings_without_a_control_image_are_refused():
    with pytest.raises(InputError) as info:
        Request.build(PROMPT, controlnet_conditioning_scale=2.0)
    assert info.value.field == "controlnet_conditioning_scale" and "control_image" in str(info.value)


def test_output_size_follows_the_control_image_then_the_image(blocks, photo, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (640, 384), "white").save(wide)
    assert Request.build(PROMPT, control_image=str(wide)).control_image.size == (640, 384)
    assert (Request.build(PROMPT, control_image=str(wide), width=320).width, 320) == (320, 320)
    both = Request.build(PROMPT, control_image=str(wide), image=photo)
    assert (both.width, both.height) == (320, 256) and both.control_image.size == (320, 256)


def test_missing_controlnet_weights_say_what_to_run(engine, blocks, monkeypatch):
    monkeypatch.setattr(engine.model, "controlnet", None)
    with pytest.raises(LCMError, match="controlnet-canny.*scripts/download-weights.*control_v11p_sd15_canny"):
        engine.generate(build(blocks))


def test_a_control_request_batches_only_with_the_same_residual_schedule(blocks, photo):
    key = batching.shape_key(build(blocks), 1)
    assert batching.shape_key(build(blocks, control_image=None, width=256, height=256), 1) != key
    assert batching.shape_key(build(blocks, controlnet_conditioning_scale=0.5), 1) != key
    assert batching.shape_key(build(blocks, control_guidance_end=0.5), 1) != key
    assert batching.shape_key(build(blocks, canny_low_threshold=10, seed=9), 1) == key
    queue = batching.Queue()
    plain = build(blocks, control_image=None, width=256, height=256)
    for request in (build(blocks), plain, build(photo, width=256, height=256)):
        queue.put(batching.Pending(request, Path("unused"), Job()))
    first = queue.take(lambda item: batching.shape_key(item.request, 1), budget=10**9)
    assert [item.request.control_image_sha256 is not None for item in first] == [True, True]
    assert [item.request for item in queue.take(lambda item: 0, budget=0)] == [plain]


def test_batched_rows_with_other_edges_equal_themselves_alone(engine, blocks, photo):
    a, b = build(blocks), build(photo, width=256, height=256, seed=7)
    together = engine.call(engine.generate_batch, [a, b], [CancelFlag(), CancelFlag()])
    for request, generation in zip((a, b), together, strict=True):
        assert max_diff(generation.pixels[0], engine.generate(request).pixels[0]) <= 1


def test_cli_files_record_the_control_image_and_reproduce_with_it(
    engine, tiny_checkpoint, blocks, tmp_path, capsys
):
    common = ["--weights", str(tiny_checkpoint), "--device", "cpu"]
    flags = ["--control-image", blocks, "--canny-low-threshold", "60", "--return-control-image"]
    flags += ["--seed", "5", "--num-inference-steps", "2", "--disable-safety-checker"]
    assert cli_main(["generate", PROMPT, "--out", str(tmp_path / "out"), *common, *flags]) == 0
    paths = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.name for p in paths] == ["lcm-5.png", "lcm-5-control.png"]
    req = build(blocks, canny_low_threshold=60)
    assert np.array_equal(np.asarray(Image.open(paths[0])), engine.generate(req).pixels[0])
    assert np.array_equal(np.asarray(Image.open(paths[1])), np.asarray(edge_map(req.control_image, 60, 200)))
    meta = read_metadata(paths[0])
    assert meta["control_image_sha256"] == req.control_image_sha256 and meta["canny_low_threshold"] == 60
    assert not {"canny_high_threshold", "controlnet_conditioning_scale", "return_control_image"} & set(meta)
    plain = engine.generate_files(
        build(blocks, control_image=None, width=256, height=256), tmp_path / "plain"
    )
    assert not any("control" in key for key in read_metadata(plain[0]))

    with pytest.raises(InputError, match="control image this file was made from"):
        Request.from_metadata(meta)
    common += ["--out", str(tmp_path / "again")]
    assert cli_main(["reproduce", str(paths[0]), *common, "--control-image", blocks]) == 0
    again = Path(capsys.readouterr().out.split()[-1])
    assert again.read_bytes() == paths[0].read_bytes()
    assert cli_main(["reproduce", str(paths[0]), *common, "--control-image", str(paths[1])]) == 2
    assert "control_image" in capsys.readouterr().err
