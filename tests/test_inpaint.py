"""Inpainting (`mask` with `image`) against diffusers' own inpainting method, on the tiny checkpoint.

Where prompt_strength's meaning here (the LCM scheduler's `set_timesteps(strength=...)`, as
image to image) and StableDiffusionInpaintPipeline's (slicing its timestep list) give the same
timesteps, the pipeline itself is the reference; elsewhere, and for grey masks (which the
pipeline rounds to black or white), the same blending built from diffusers' own scheduler calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import LCMScheduler, StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lcm import batching, images, prompts, sampler, starts
from lcm.cli import main as cli_main
from lcm.errors import InputError
from lcm.metadata import read_metadata
from lcm.params import Request
from lcm.worker import CancelFlag

SIZE = 256
INNER = slice(64, 192)  # the redrawn square of MASK, on the 8-pixel latent grid


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The input photo (a colour gradient with noise), a black mask with a white square, a grey one."""
    folder = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    photo = np.stack([x, y, (x + y) // 2], axis=-1) + rng.integers(0, 40, (SIZE, SIZE, 3))
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(folder / "photo.png")
    square = np.zeros((SIZE, SIZE), dtype=np.uint8)
    square[INNER, INNER] = 255
    Image.fromarray(square).save(folder / "mask.png")
    grey = square.copy()
    grey[:, :32] = 128  # a grey band at the left edge, besides the white square
    grey[:, 32:48] = 64
    Image.fromarray(grey).save(folder / "grey.png")
    return {"photo": folder / "photo.png", "mask": folder / "mask.png", "grey": folder / "grey.png"}


def inpaint(files, **kw) -> Request:
    base = dict(prompt="a photo of a cat", image=files["photo"], mask=files["mask"], seed=7)
    base |= dict(num_inference_steps=2, disable_safety_checker=True)
    return Request.build(**{**base, **kw})


@pytest.fixture(scope="module")
def pipeline(engine) -> StableDiffusionInpaintPipeline:
    """diffusers' inpainting pipeline over the engine's own components, with the LCM scheduler."""
    names = ("vae", "text_encoder", "tokenizer", "unet", "feature_extractor")
    parts = {name: engine.model.pipe.components[name] for name in names}
    parts |= {
        "scheduler": LCMScheduler.from_config(engine.model.pipe.scheduler.config),
        "safety_checker": None,
    }
    pipe = StableDiffusionInpaintPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, req: Request, steps: int, strength: float) -> np.ndarray:
    out = pipe(
        req.prompt,
        image=req.image,
        mask_image=req.mask,
        height=req.height,
        width=req.width,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        output_type="np",
    ).images[0]
    return to_uint8(out)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"prompt_strength": 1.0}, {"steps": 2, "strength": 1.0}),
        # LCM's schedule at strength 0.5 with 2 steps is [499, 259]; the pipeline's 4 steps
        # [999, 759, 499, 259] sliced at strength 0.5 give the same two.
        ({"prompt_strength": 0.5}, {"steps": 4, "strength": 0.5}),
    ],
)
def test_equals_diffusers_inpainting_pipeline_where_the_schedules_agree(
    engine, pipeline, files, ours, theirs
):
    req = inpaint(files, **ours)
    pipe_scheduler = LCMScheduler.from_config(engine.model.pipe.scheduler.config)
    pipe_scheduler.set_timesteps(theirs["steps"])
    sliced = pipe_scheduler.timesteps[theirs["steps"] - int(theirs["steps"] * theirs["strength"]) :]
    assert engine.model.scheduler(req).timesteps.tolist() == sliced.tolist()
    pipeline.scheduler = LCMScheduler.from_config(engine.model.pipe.scheduler.config)
    mine = engine.generate(req).pixels[0]
    assert max_diff(mine, run_pipeline(pipeline, req, **theirs)) <= 1


def blended_by_hand(engine, req: Request) -> np.ndarray:
    """The same method from diffusers' own calls: LCMScheduler.set_timesteps(strength=...), the VAE's
    posterior, add_noise, the UNet with the w-embedding, scheduler.step, and the pipeline's blend."""
    pipe = engine.model.pipe
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(
        req.num_inference_steps, original_inference_steps=req.lcm_origin_steps, strength=req.prompt_strength
    )
    generator = torch.Generator("cpu").manual_seed(req.seed)
    posterior = pipe.vae.encode(pipe.image_processor.preprocess(req.image)).latent_dist
    image_latents = posterior.sample(generator=generator) * pipe.vae.config.scaling_factor
    noise = randn_tensor(image_latents.shape, generator=generator)
    posterior.sample(generator=generator)  # the pipeline's masked-image encoding draws here
    latents = scheduler.add_noise(image_latents, noise, scheduler.timesteps[:1])
    processor = VaeImageProcessor(do_normalize=False, do_binarize=False, do_convert_grayscale=True)
    mask = F.interpolate(processor.preprocess(req.mask), size=image_latents.shape[-2:])
    embeds = pipe.encode_prompt(req.prompt, "cpu", 1, False)[0]
    w = pipe.get_guidance_scale_embedding(
        torch.tensor([req.guidance_scale - 1.0]), embedding_dim=pipe.unet.config.time_cond_proj_dim
    )
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        pred = pipe.unet(latents, t, timestep_cond=w, encoder_hidden_states=embeds).sample
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
        proper = image_latents
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
        latents = (1 - mask) * proper + mask * latents
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return to_uint8(pipe.image_processor.postprocess(image, output_type="np")[0])


@pytest.mark.parametrize(
    "kw",
    [
        {"prompt_strength": 0.8, "mask": "grey"},  # no step count and strength slice give LCM's [799, 399]
        {"prompt_strength": 0.6, "num_inference_steps": 3, "guidance_scale": 3.0},
    ],
)
def test_equals_the_same_blending_from_diffusers_scheduler_calls(engine, files, kw):
    req = inpaint(files, **{**kw, "mask": files[kw.get("mask", "mask")]})
    with torch.inference_mode():
        theirs = blended_by_hand(engine, req)
    assert max_diff(engine.generate(req).pixels[0], theirs) <= 1


def test_planned_step_equals_scheduler_step(engine, files, monkeypatch):
    """LCM_PLANNED_STEP on and off give the same inpainting, latents and pixels."""
    req = inpaint(files, mask=files["grey"], num_inference_steps=3, prompt_strength=0.9)
    runs = []
    with torch.inference_mode():
        for planned in (False, True):
            scheduler = engine.model.scheduler(req)
            generators = sampler.generators_for(req.seeds)
            start, keep = starts.inpaint_start(engine.model, req, scheduler, generators)
            embeds = prompts.encode_prompt(
                engine.model.pipe.tokenizer, engine.model.pipe.text_encoder, req.prompt, engine.model.device
            ).embeds
            runs.append(
                sampler.sample(
                    engine.model.pipe.unet,
                    scheduler,
                    embeds,
                    start,
                    8.0,
                    generators,
                    planned=planned,
                    inpaint=keep,
                )
            )
    # The two paths round differently in fp32 (host doubles against device tensors), no more.
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)
    steps = []
    monkeypatch.setattr(
        LCMScheduler, "step", lambda *a, _step=LCMScheduler.step, **k: steps.append(1) or _step(*a, **k)
    )
    planned = engine.generate(req).pixels
    assert not steps and engine.model.accel.planned_step
    monkeypatch.setattr(engine.model, "accel", dataclasses.replace(engine.model.accel, planned_step=False))
    stepped = engine.generate(req).pixels
    assert len(steps) == 3
    assert max_diff(planned, stepped) <= 1


def test_the_kept_region_stays_the_input_and_the_masked_one_is_redrawn(engine, files):
    """Outside the mask the final latents are the input image's own, exactly; inside they are new.
    In pixels the decoder (whose attention sees the whole image) mixes a little of the redrawn part
    into the kept one, which still stays far closer to the VAE's own round trip of the input."""
    req = inpaint(files, prompt_strength=1.0, num_inference_steps=4)
    with torch.inference_mode():
        scheduler = engine.model.scheduler(req)
        generators = sampler.generators_for(req.seeds)
        start, keep = starts.inpaint_start(engine.model, req, scheduler, generators)
        embeds = prompts.encode_prompt(
            engine.model.pipe.tokenizer, engine.model.pipe.text_encoder, req.prompt, engine.model.device
        )
        final = sampler.sample(
            engine.model.pipe.unet, scheduler, embeds.embeds, start, 8.0, generators, inpaint=keep
        )
        image_latents = keep.kept[-1]
        kept = (keep.mask == 0).expand_as(final)
        assert torch.equal(final[kept], image_latents[kept])
        assert (final[~kept] - image_latents[~kept]).abs().mean() > 0.5
        vae = engine.model.pipe.vae
        posterior = vae.encode(engine.model.pipe.image_processor.preprocess(req.image)).latent_dist
        again = posterior.sample(generator=torch.Generator("cpu").manual_seed(req.seed))
        round_trip = images.decode(vae, again * vae.config.scaling_factor, 1)[0]
    out = engine.generate(req).pixels[0]
    diff = np.abs(out.astype(np.int16) - round_trip.astype(np.int16)).mean(axis=-1)
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[80:176, 80:176] = True  # the square less a 16-pixel margin
    outside = np.ones((SIZE, SIZE), dtype=bool)
    outside[48:208, 48:208] = False
    assert diff[outside].mean() * 2 < diff[inside].mean(), (diff[outside].mean(), diff[inside].mean())


def test_grey_is_in_between_and_the_mask_is_fitted_like_the_image(engine, files, tmp_path):
    """A grey band is neither kept as black keeps nor redrawn as white redraws; a mask of another size
    and aspect is scaled and centre-cropped exactly as the image is."""
    with torch.inference_mode():
        req = inpaint(files, mask=files["grey"])
        scheduler = engine.model.scheduler(req)
        _, keep = starts.inpaint_start(engine.model, req, scheduler, sampler.generators_for(req.seeds))
    band = keep.mask[0, 0, :, :4]  # latent columns 0-3: grey 128
    assert torch.allclose(band, torch.full_like(band, 128 / 255))
    wide = np.zeros((200, 400), dtype=np.uint8)  # 2:1, cropped to 1:1 at the centre, scaled to 256
    wide[50:150, 150:250] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    fitted = inpaint(files, mask=tmp_path / "wide.png").mask
    expected = images.fit_image(Image.fromarray(wide).convert("RGB"), SIZE, SIZE).convert("L")
    assert fitted.size == (SIZE, SIZE) and np.array_equal(np.asarray(fitted), np.asarray(expected))
    assert np.asarray(fitted)[128, 128] == 255 and np.asarray(fitted)[10, 128] == 0


def test_a_mask_alone_and_bad_mask_files_are_refused_naming_mask(files, tmp_path):
    with pytest.raises(InputError) as alone:
        Request.build("a cat", mask=files["mask"])
    assert alone.value.field == "mask" and "image" in alone.value.allowed
    (tmp_path / "words.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, words in (
        ("words.png", "not an image"),
        ("empty.png", "empty"),
        ("absent.png", "cannot be read"),
    ):
        with pytest.raises(InputError) as bad:
            inpaint(files, mask=tmp_path / name)
        assert bad.value.field == "mask" and words in bad.value.allowed, bad.value
    with pytest.raises(InputError) as strength:
        inpaint(files, prompt_strength=0.01)  # the image-to-image rule: 50 x 0.01 timesteps for 2 steps
    assert strength.value.field == "prompt_strength"


def test_cli_generates_with_a_mask_and_reproduces_only_with_the_same_mask(files, tiny_checkpoint, tmp_path):
    common = ["--weights", str(tiny_checkpoint), "--device", "cpu"]
    made = tmp_path / "made"
    args = ["generate", "a cat", "--out", str(made), *common, "--image", str(files["photo"])]
    args += ["--mask", str(files["grey"]), "--width", "256", "--height", "256", "--num-inference-steps", "2"]
    assert cli_main([*args, "--seed", "3", "--disable-safety-checker"]) == 0
    (file,) = made.iterdir()
    meta = read_metadata(file)
    assert meta["mask_sha256"] == hashlib.sha256(files["grey"].read_bytes()).hexdigest()
    again = tmp_path / "again"
    base = ["reproduce", str(file), "--out", str(again), *common, "--image", str(files["photo"])]
    assert cli_main(base) == 2  # without its mask
    assert cli_main([*base, "--mask", str(files["mask"])]) == 2  # with another mask
    assert cli_main([*base, "--mask", str(files["grey"])]) == 0
    assert (again / file.name).read_bytes() == file.read_bytes()


def test_inpainting_batches_only_with_inpainting_and_rows_keep_their_masks(engine, files):
    square, grey = inpaint(files), inpaint(files, mask=files["grey"], seed=8)
    img2img = Request.build("a photo of a cat", image=files["photo"], seed=7, num_inference_steps=2)
    key = lambda r: batching.shape_key(r, 1)  # noqa: E731
    assert key(square) == key(grey) != key(img2img)
    assert key(square) != key(inpaint(files, prompt_strength=0.5))
    together = engine.thread.call(engine.generate_batch, [square, grey], [CancelFlag(), CancelFlag()])
    for request, generation in zip([square, grey], together, strict=True):
        assert max_diff(generation.pixels[0], engine.generate(request).pixels[0]) <= 1


def test_a_row_leaving_the_batch_takes_its_mask_and_image_latents_with_it(engine, files):
    """The sampler's prune drops a cancelled row's mask and kept latents with it: the row that stays
    blends with its own, and ends as it would alone."""
    square, grey = inpaint(files), inpaint(files, mask=files["grey"], seed=8)
    embeds = prompts.encode_prompt(
        engine.model.pipe.tokenizer, engine.model.pipe.text_encoder, square.prompt, engine.model.device
    )

    def run(requests: list[Request], prune=None) -> torch.Tensor:
        scheduler = engine.model.scheduler(requests[0])
        generators = [sampler.generators_for(r.seeds) for r in requests]
        made = [
            starts.inpaint_start(engine.model, r, scheduler, g)
            for r, g in zip(requests, generators, strict=True)
        ]
        keep = sampler.Inpaint(
            torch.cat([k.mask for _, k in made]), torch.cat([k.kept for _, k in made], dim=1)
        )
        start = torch.cat([s for s, _ in made])
        gens = [g for per in generators for g in per]
        return sampler.sample(
            engine.model.pipe.unet, scheduler, embeds.embeds, start, 8.0, gens, prune=prune, inpaint=keep
        )

    asked = []
    with torch.inference_mode():
        left = run([square, grey], prune=lambda: asked.append(1) or ([1] if len(asked) == 2 else None))
        alone = run([grey])
    assert left.shape[0] == 1
    # Rows of a batched convolution round differently from a lone one: compared as the project
    # compares batch items with lone ones, in decoded pixels within 1/255.
    with torch.inference_mode():
        pixels = [images.decode(engine.model.pipe.vae, x, 1)[0] for x in (left, alone)]
    assert max_diff(*pixels) <= 1
