"""Image to image, long prompts, clip skip, safety policy and reproducible files, on the tiny checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelImg2ImgPipeline
from PIL import Image

from lcm import prompts
from lcm.cli import main as cli_main
from lcm.errors import InputError, LCMError
from lcm.metadata import read_metadata
from lcm.params import MAX_SEED, Request
from reference import cut_text_encoder, gradient_png


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def reference_image(engine, replace: dict | None = None, **inputs) -> np.ndarray:
    """diffusers' pipeline over the engine's components (some replaced): 256x256, 2 steps, seed 5."""
    ref = engine.model.pipe.__class__(**{**engine.model.pipe.components, **(replace or {})})
    ref.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(5)
    return ref(
        **inputs,
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=8.0,
        generator=generator,
        output_type="np",
    ).images[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    """A smooth, photo-like 320x256 RGB image."""
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    path.write_bytes(gradient_png())
    return str(path)


def request(**kw) -> Request:
    return Request.build(**{"prompt": "a photo of a cat", "width": 256, "height": 256, "seed": 5, **kw})


# --- image to image -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength,steps", [(0.8, 4), (0.5, 2), (1.0, 3)])
def test_img2img_equals_diffusers_img2img_pipeline(engine, tiny_checkpoint, photo, strength, steps):
    req = Request.build("a cat", image=photo, prompt_strength=strength, num_inference_steps=steps, seed=3)
    assert (req.width, req.height) == (320, 256)
    ref_pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(
        tiny_checkpoint, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        "a cat",
        image=req.image,
        strength=strength,
        num_inference_steps=steps,
        original_inference_steps=50,
        guidance_scale=8.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images[0]
    ours = engine.generate(
        Request.build(
            "a cat",
            image=photo,
            prompt_strength=strength,
            num_inference_steps=steps,
            seed=3,
            disable_safety_checker=True,
        )
    ).pixels[0]
    assert max_diff(ours, to_uint8(ref)) <= 1


def test_img2img_batch_item_equals_alone_and_uses_the_image(engine, photo):
    batch = engine.generate(Request.build("a cat", image=photo, num_images=2, seed=10)).pixels
    alone = engine.generate(Request.build("a cat", image=photo, seed=11)).pixels[0]
    assert max_diff(batch[1], alone) <= 1
    txt = engine.generate(Request.build("a cat", width=320, height=256, seed=11)).pixels[0]
    low = engine.generate(Request.build("a cat", image=photo, seed=11, prompt_strength=0.2)).pixels[0]
    assert max_diff(low, txt) > 10 and max_diff(low, alone) > 0


def test_prompt_strength_rules(photo):
    with pytest.raises(InputError, match="prompt_strength=0.5 is not allowed: only with an image"):
        Request.build("x", prompt_strength=0.5)
    with pytest.raises(InputError, match=r"prompt_strength=0.05 .* at least 0.08"):
        Request.build("x", image=photo, prompt_strength=0.05)
    assert Request.build("x", image=photo, prompt_strength=0.08).prompt_strength == 0.08


# --- prompts --------------------------------------------------------------------------------------------


def test_short_prompt_ids_are_diffusers_ids(engine):
    tok = engine.model.pipe.tokenizer
    windows, count = prompts.token_windows(tok, "a photo of a cat")
    ref = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert windows == [ref]
    assert count == len(tok("a photo of a cat", add_special_tokens=False).input_ids)


def test_words_past_77_tokens_change_the_image(engine):
    base = "a cat " * 40  # the tiny tokenizer spells most words letter by letter: well past 77 tokens
    assert prompts.token_windows(engine.model.pipe.tokenizer, base)[1] > 77
    a = engine.generate(request(prompt=base + "on a red sofa")).pixels
    b = engine.generate(request(prompt=base + "in deep blue sea")).pixels
    assert not np.array_equal(a, b)


def test_too_long_prompt_is_refused_with_counts(engine):
    with pytest.raises(InputError, match=r"prompt=.* at most 600 CLIP tokens .* this prompt has \d+"):
        engine.generate(request(prompt="word " * 1000))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_uses_the_output_of_layer_L_minus_k(engine, clip_skip):
    """Reference: the same text encoder cut to L - k layers, fed to diffusers' pipeline as prompt_embeds."""
    cut = cut_text_encoder(engine.model.pipe.text_encoder, clip_skip)
    ids = engine.model.pipe.tokenizer(
        "a photo of a cat", padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        embeds = cut(ids.input_ids)[0]
    out = reference_image(engine, prompt_embeds=embeds)
    ours = engine.generate(
        request(num_inference_steps=2, clip_skip=clip_skip, disable_safety_checker=True)
    ).pixels[0]
    assert max_diff(ours, to_uint8(out)) <= 1
    assert not np.array_equal(ours, engine.generate(request(num_inference_steps=2)).pixels[0])


def test_clip_skip_is_bounded_by_the_loaded_text_encoder(engine):
    layers = engine.model.pipe.text_encoder.config.num_hidden_layers
    with pytest.raises(
        InputError, match=f"clip_skip={layers} is not allowed: an integer from 0 to {layers - 1}"
    ):
        engine.generate(request(clip_skip=layers))


# --- safety checker -------------------------------------------------------------------------------------


@pytest.fixture
def flag_everything(engine):
    """Force the tiny checkpoint's checker to flag every image: thresholds below any cosine similarity."""
    weights = engine.model.pipe.safety_checker.concept_embeds_weights
    saved = weights.detach().clone()
    weights.data.fill_(-1.5)
    yield
    weights.data.copy_(saved)


def test_checker_verdicts_follow_its_thresholds(engine, flag_everything):
    assert engine.generate(request(num_images=2)).nsfw == [True, True]


def test_all_flagged_fails_with_advice(engine, flag_everything, tmp_path):
    with pytest.raises(LCMError, match=r"flagged all 2 image\(s\) .* try another seed or prompt"):
        engine.generate_files(request(num_images=2), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_disabling_the_checker_returns_every_image(engine, flag_everything, tmp_path):
    paths = engine.generate_files(request(num_images=2, disable_safety_checker=True), tmp_path)
    assert len(paths) == 2


def test_flagged_images_are_left_out_not_blacked(engine, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("lcm.safety.flag_nsfw", lambda *a: [True, False, False])
    with caplog.at_level(logging.INFO, logger="lcm"):
        paths = engine.generate_files(request(num_images=3), tmp_path)
    assert [p.name for p in paths] == ["lcm-6.png", "lcm-7.png"]
    assert all(np.asarray(Image.open(p)).max() > 0 for p in paths)
    assert "flagged=1" in caplog.text


def test_checker_not_run_when_disabled(engine, monkeypatch):
    monkeypatch.setattr("lcm.safety.flag_nsfw", lambda *a: pytest.fail("checker ran"))
    assert engine.generate(request(disable_safety_checker=True)).nsfw == [False]


# --- files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,pil_format", [("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")])
def test_files_carry_their_parameters_and_reproduce_byte_for_byte(
    engine, tiny_checkpoint, tmp_path, fmt, pil_format
):
    req = request(
        prompt="a lighthouse, 🌊 עברית",
        output_format=fmt,
        output_quality=70,
        num_inference_steps=3,
        guidance_scale=6.5,
    )
    first = engine.generate_files(req, tmp_path / "first")[0]
    assert Image.open(first).format == pil_format
    meta = read_metadata(first)
    assert meta["seed"] == 5 and meta["prompt"] == req.prompt and meta["num_inference_steps"] == 3
    assert meta["guidance_scale"] == 6.5 and meta["lcm_origin_steps"] == 50 and meta["output_quality"] == 70
    assert (
        cli_main(
            [
                "reproduce",
                str(first),
                "--out",
                str(tmp_path / "again"),
                "--weights",
                str(tiny_checkpoint),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "again" / first.name).read_bytes() == first.read_bytes()


def reproduce(file: Path, checkpoint: Path, out: Path) -> np.ndarray:
    assert cli_main(["reproduce", str(file), "--out", str(out), "--weights", str(checkpoint)]) == 0
    return np.asarray(Image.open(out / file.name))


def test_every_file_at_the_top_of_the_seed_range_reproduces(engine, tiny_checkpoint, tmp_path):
    """Seeds wrap: seed=MAX_SEED with two images makes files for MAX_SEED and 0. Batch items come
    back within 1/255 (regenerated alone: docs/inputs.md, "Reproducible files"); a one-image
    request's file byte for byte."""
    files = engine.generate_files(request(seed=MAX_SEED, num_images=2), tmp_path / "batch")
    assert [f.name for f in files] == [f"lcm-{MAX_SEED}.png", "lcm-0.png"]
    assert [read_metadata(f)["seed"] for f in files] == [MAX_SEED, 0]
    for file in files:
        again = reproduce(file, tiny_checkpoint, tmp_path / "again")
        assert max_diff(again, np.asarray(Image.open(file))) <= 1
    alone = engine.generate_files(request(seed=MAX_SEED), tmp_path / "alone")[0]
    reproduce(alone, tiny_checkpoint, tmp_path / "alone-again")
    assert (tmp_path / "alone-again" / alone.name).read_bytes() == alone.read_bytes()
    assert max_diff(np.asarray(Image.open(alone)), np.asarray(Image.open(files[0]))) <= 1


def test_img2img_file_reproduces_only_with_its_input_image(engine, tiny_checkpoint, tmp_path, photo):
    first = engine.generate_files(Request.build("a cat", image=photo, seed=8), tmp_path / "first")[0]
    assert read_metadata(first)["image_sha256"]
    args = ["reproduce", str(first), "--out", str(tmp_path / "again"), "--weights", str(tiny_checkpoint)]
    assert cli_main(args) == 2
    assert cli_main([*args, "--image", photo]) == 0
    assert (tmp_path / "again" / first.name).read_bytes() == first.read_bytes()


# --- fast decode ----------------------------------------------------------------------------------------


def test_fast_decode_equals_diffusers_with_taesd_as_its_vae(engine):
    assert engine.model.taesd is not None
    out = reference_image(engine, {"vae": engine.model.taesd}, prompt="a photo of a cat")
    ours = engine.generate(request(num_inference_steps=2, fast_decode=True)).pixels[0]
    assert max_diff(ours, to_uint8(out)) <= 1
    assert max_diff(ours, engine.generate(request(num_inference_steps=2)).pixels[0]) > 10


def test_fast_decode_without_taesd_says_how_to_get_it(engine, monkeypatch):
    monkeypatch.setattr(engine.model, "taesd", None)
    with pytest.raises(LCMError, match=r"fast_decode needs the TAESD decoder in .*taesd.*download-weights"):
        engine.generate(request(fast_decode=True))
