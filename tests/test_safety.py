"""The safety checker's verdicts, image by image, are those of diffusers' pipeline on the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm.params import Request

FLAGGED = (1, 3)  # of a batch of 4


def request(**kw) -> Request:
    base = dict(
        prompt="a photo of a cat", width=256, height=256, seed=1234, num_images=4, num_inference_steps=1
    )
    return Request.build(**{**base, **kw})


def image_embeds(engine, pixels: np.ndarray) -> torch.Tensor:
    """The checker's unit image embeddings, from the pixels as diffusers' run_safety_checker prepares them."""
    pipe = engine.model.pipe
    features = pipe.feature_extractor(pipe.image_processor.numpy_to_pil(pixels / 255.0), return_tensors="pt")
    checker = pipe.safety_checker
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(features.pixel_values)[1])
    return torch.nn.functional.normalize(embeds, dim=-1)


@pytest.fixture
def checker_flagging(engine):
    """Set the tiny checker's concepts so that it flags exactly FLAGGED of request()'s images.

    Concept i points from the kept images' mean embedding to flagged image FLAGGED[i], its threshold
    halfway between that image's cosine and the highest kept image's; every other concept, and
    every special-care concept, has a threshold no cosine reaches.
    """
    checker = engine.model.pipe.safety_checker
    saved = [t.detach().clone() for t in checker.parameters()]
    pixels = engine.generate(request(disable_safety_checker=True)).pixels
    embeds = image_embeds(engine, pixels)
    kept = [i for i in range(len(pixels)) if i not in FLAGGED]
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
        for concept, flagged in enumerate(FLAGGED):
            direction = torch.nn.functional.normalize(embeds[flagged] - embeds[kept].mean(0), dim=0)
            cosines = embeds @ direction
            highest_kept = cosines[kept].max()
            assert cosines[flagged] - highest_kept > 0.02  # well clear of the checker's rounding to 0.001
            checker.concept_embeds[concept] = direction
            checker.concept_embeds_weights[concept] = (cosines[flagged] + highest_kept) / 2
    yield pixels
    with torch.no_grad():
        for tensor, value in zip(checker.parameters(), saved, strict=True):
            tensor.copy_(value)


def test_verdicts_equal_diffusers_run_safety_checker_image_by_image(engine, checker_flagging, tmp_path):
    generation = engine.generate(request())
    assert np.array_equal(generation.pixels, checker_flagging)
    _, reference = engine.model.pipe.run_safety_checker(
        generation.pixels / 255.0, engine.model.device, engine.model.dtype
    )
    assert generation.nsfw == reference == [i in FLAGGED for i in range(4)]
    paths = engine.generate_files(request(), tmp_path)
    assert [p.name for p in paths] == ["lcm-1234.png", "lcm-1236.png"]
