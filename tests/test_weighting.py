"""Prompt weighting with compel and FreeU, each against diffusers' own pipeline on the tiny checkpoint.

Reference for a weighted prompt: compel's own convenience wrapper (CompelForSD) over the same
tokenizer and text encoder, its embeddings fed to LatentConsistencyModelPipeline as prompt_embeds.
Reference for FreeU: the same pipeline after `enable_freeu` with the same four scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compel import Compel, CompelForSD
from PIL import Image

from lcm import batching, prompts
from lcm.cli import main as cli_main
from lcm.errors import InputError
from lcm.generation import FREEU
from lcm.metadata import read_metadata
from lcm.params import Request
from lcm.worker import CancelFlag
from reference import cut_text_encoder

CPU = torch.device("cpu")
CAT = "a photo of a cat"


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def request(**kw) -> Request:
    inputs = {"prompt": CAT, "width": 256, "height": 256, "seed": 5, "num_inference_steps": 2}
    return Request.build(**{**inputs, "disable_safety_checker": True, **kw})


def ours(engine, **kw) -> np.ndarray:
    return engine.generate(request(**kw)).pixels[0]


def reference(engine, **inputs) -> np.ndarray:
    """diffusers' LCM pipeline over the engine's components, as `request()` asks: uint8 pixels."""
    pipe = engine.model.pipe.__class__(**{**engine.model.pipe.components, "safety_checker": None})
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        **inputs,
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=8.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.uint8)


def encode(engine, prompt: str, clip_skip: int = 0) -> prompts.PromptEmbedding:
    return prompts.encode_prompt(
        engine.model.pipe.tokenizer, engine.model.pipe.text_encoder, prompt, CPU, clip_skip
    )


# --- which prompts are weighted -------------------------------------------------------------------------

# Compel reads each as one prompt of weight 1: encoded as written, exactly as before weighting existed.
PLAIN = [
    CAT,
    "a well-known e-mail",  # a hyphen inside a word is text
    "a cat - dog",  # a sign between spaces is text
    "C ++ code",  # how docs/inputs.md says to keep "C++" text
    "5 + cats",
    "a+b",
    "a (photo) of a cat",  # compel would drop these parentheses: they stay
    '"quoted" text',
    "cat.and(dog)",  # .and() after a bare word is text
    "(a cat",  # unbalanced
    "[word]",
    "ratio 16:9, (time: 3:15)",  # colons that are not A1111 weights
    "(a cat)1",  # an explicit weight of 1 changes nothing
    "(" * 16 + "masterpiece" + ")" * 16,  # A1111's emphasis, as deep as compel may read: text here
    "(" * 17 + "cat" + ")" * 17 + "1.5",  # deeper than compel's parser reads: text, as before weighting
    "(" * 60,
]
# Compel's syntax, also where a plain-looking prompt uses it ("well- known", "C++": docs/inputs.md,
# "Prompt weighting").
WEIGHTED = {
    "a cat+": [("a", 1.0), ("cat", 1.1)],
    "a cat--": [("a", 1.0), ("cat", 0.81)],
    "well- known": [("well", 0.9), ("known", 1.0)],
    "C++ code": [("C", 1.21), ("code", 1.0)],
    "5+ cats": [("5", 1.1), ("cats", 1.0)],
    "a (black cat)++": [("a", 1.0), ("black cat", 1.21)],
    "(sofa)0 x": [("sofa", 0.0), ("x", 1.0)],
    "x (a phrase)1.3 y": [("x", 1.0), ("a phrase", 1.3), ("y", 1.0)],
    "x (a phrase:1.3) y": [("x", 1.0), ("a phrase", 1.3), ("y", 1.0)],  # A1111's spelling, translated
    '"a cat"1.5 x': [("a cat", 1.5), ("x", 1.0)],
}


@pytest.mark.parametrize("prompt", PLAIN)
def test_a_prompt_without_weights_is_encoded_as_written(engine, prompt):
    assert prompts.weighting(prompt) is None
    tokenizer, encoder = engine.model.pipe.tokenizer, engine.model.pipe.text_encoder
    ids = tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    embedding = encode(engine, prompt)
    assert not embedding.weighted
    assert torch.equal(embedding.embeds, encoder(ids)[0])  # the ids diffusers' pipeline encodes, unchanged


def test_the_log_line_says_how_the_prompt_was_read(engine):
    said = {
        CAT: "weighting=none",
        f"{CAT}+": "weighting=compel",
        "(" * 17 + "cat" + ")" * 17: "weighting=text(nested>16)",
    }
    for prompt, words in said.items():
        assert words in engine.summary(engine.generate(request(prompt=prompt, num_inference_steps=1))), prompt


@pytest.mark.parametrize("prompt", list(WEIGHTED))
def test_compel_syntax_is_read_as_compel_reads_it(prompt):
    (flat,) = prompts.weighting(prompt).prompts
    assert [(f.text, round(f.weight, 6)) for f in flat.children] == WEIGHTED[prompt]


def test_a1111_weights_are_translated_and_nothing_else(engine):
    assert prompts.compel_text("(a red cat:1.2), (sofa: .5)") == "(a red cat)1.2, (sofa).5"
    for text in [*PLAIN, "(a (red) cat:1.2)", "(cat:high)", "(cat:1.2"]:
        assert prompts.compel_text(text) == text
    assert torch.equal(encode(engine, "x (a cat:1.2)").embeds, encode(engine, "x (a cat)1.2").embeds)


@pytest.mark.parametrize(
    "prompt, words",
    [
        ('("a", "b").blend(1)', "Compel's weighting syntax"),
        ('("a", "b").blend(0.5, 0.5), c', "a .blend() or .and() is the whole prompt"),
        ("a cat.swap(dog)", "no .swap()"),
        ("withLora(foo, 0.5) a cat", "no withLora()"),
        ('("a cat", "a dog").blend(0, 0)', "non-zero sum"),
        # each prompt of an .and() is a window of its own: 9 exceed the 8 windows a prompt may have
        ('("a", "b", "c", "d", "e", "f", "g", "h", "i").and()', "at most 8 windows"),
    ],
)
def test_what_weighting_cannot_do_is_refused_naming_the_prompt(engine, prompt, words):
    with pytest.raises(InputError) as refused:
        request(prompt=prompt)
        engine.generate(request(prompt=prompt))
    assert refused.value.field == "prompt" and words in str(refused.value)


# --- weighted prompts against diffusers -----------------------------------------------------------------

REFERENCED = [
    f"{CAT}++",
    "a (photo)0.5 of a cat",  # a downweight: compel blends with the prompt whose word is masked out
    f'("{CAT}", "a red fox").blend(0.7, 0.3)',
    f'("{CAT}", "a red fox").and()',
    "x (a cat:1.4) y",
]


@pytest.mark.parametrize("prompt", REFERENCED)
def test_a_weighted_prompt_equals_diffusers_fed_compels_embeddings(engine, prompt):
    embeds = CompelForSD(engine.model.pipe)(prompts.compel_text(prompt)).embeds
    assert encode(engine, prompt).windows == embeds.shape[1] // 77
    assert max_diff(ours(engine, prompt=prompt), reference(engine, prompt_embeds=embeds)) <= 1


def test_weighting_a_word_changes_the_image(engine):
    plain = ours(engine)
    assert max_diff(ours(engine, prompt=f"{CAT}++"), plain) > 0
    assert max_diff(ours(engine, prompt=f"{CAT}--"), plain) > 0
    assert max_diff(ours(engine, prompt=f"{CAT}++"), ours(engine, prompt=f"{CAT}--")) > 0


@pytest.mark.parametrize("clip_skip", [1, 3])
def test_clip_skip_applies_to_weighted_prompts(engine, clip_skip):
    """Reference: compel over the encoder cut to L - k layers (compel itself knows only the last two)."""
    prompt = f"a photo of a (cat)1.4, ({CAT}, a red fox).blend(0.6, 0.4)"
    compel = Compel(
        tokenizer=engine.model.pipe.tokenizer,
        text_encoder=cut_text_encoder(engine.model.pipe.text_encoder, clip_skip),
        truncate_long_prompts=False,
    )
    with torch.no_grad():
        embeds = compel(prompt)
    image = ours(engine, prompt=prompt, clip_skip=clip_skip)
    assert max_diff(image, reference(engine, prompt_embeds=embeds)) <= 1
    assert max_diff(image, ours(engine, prompt=prompt)) > 0


LONG = "a cat " * 40  # 80 tokens: 2 windows


@pytest.mark.parametrize("clip_skip", [0, 2])
def test_long_weighted_prompts_use_the_windows_plain_prompts_use(engine, clip_skip):
    """A blend of a prompt with itself is that prompt: equal to the plain encoding, window for window."""
    plain = encode(engine, LONG, clip_skip)
    assert plain.windows == 2
    same = encode(engine, f'("{LONG}", "{LONG}").blend(1, 1)', clip_skip)
    assert same.weighted and same.windows == 2
    assert torch.equal(same.embeds, plain.embeds)


@pytest.mark.parametrize(
    "prompt, windows",
    [
        (f"{LONG} (dog)1.3", 2),
        # 72 + 1 tokens weighted: one window, though the text with its syntax has 78 tokens
        ("a cat " * 36 + "(dog)1.3", 1),
        (f'("{LONG}", "a dog").blend(0.5, 0.5)', 2),  # a blend is as long as its longest prompt
        (f'("{LONG}", "a dog").and()', 3),  # an .and() joins its prompts' windows
    ],
)
def test_the_batch_key_counts_the_windows_the_embedding_has(engine, prompt, windows):
    counted, _ = prompts.count_windows(engine.model.pipe.tokenizer, prompt)
    embedding = encode(engine, prompt)
    assert counted == embedding.windows == windows == embedding.embeds.shape[1] // 77


def test_weighted_and_plain_prompts_batch_together_each_as_alone(engine):
    a, b = request(prompt=f"{CAT}++"), request(prompt="a red fox", seed=9)
    key = engine._shape_key
    assert key(batching.Pending(a, None, None)) == key(batching.Pending(b, None, None))
    together = engine.call(engine.generate_batch, [a, b], [CancelFlag(), CancelFlag()])
    for generation, alone in zip(together, (a, b), strict=True):
        assert max_diff(generation.pixels[0], engine.generate(alone).pixels[0]) <= 1


# --- FreeU ----------------------------------------------------------------------------------------------


def test_freeu_equals_diffusers_with_enable_freeu_and_turning_it_off_restores_the_image(engine):
    before = ours(engine)
    pipe = engine.model.pipe.__class__(**engine.model.pipe.components)
    pipe.enable_freeu(**FREEU)  # the engine's UNet itself: turned off again below
    try:
        expected = reference(engine, prompt=CAT)
    finally:
        pipe.disable_freeu()
    with_freeu = ours(engine, freeu=True)
    assert max_diff(with_freeu, expected) <= 1
    assert max_diff(with_freeu, before) > 0
    assert np.array_equal(ours(engine), before)


def test_freeu_values_are_its_authors_for_sd1():
    assert FREEU == {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}


def test_freeu_and_plain_requests_never_share_unet_passes(engine):
    on, off = batching.Pending(request(freeu=True), None, None), batching.Pending(request(), None, None)
    assert engine._shape_key(on) != engine._shape_key(off)


def test_freeu_is_a_bool():
    with pytest.raises(InputError, match="freeu='yes' is not allowed: true or false"):
        request(freeu="yes")


# --- files ----------------------------------------------------------------------------------------------


def test_a_weighted_freeu_file_records_both_and_reproduces_byte_for_byte(engine, tiny_checkpoint, tmp_path):
    prompt = "a photo of a (cat:1.2) on a sofa--"
    (file,) = engine.generate_files(request(prompt=prompt, freeu=True), tmp_path / "first")
    meta = read_metadata(file)
    assert meta["prompt"] == prompt and meta["freeu"] is True and meta["prompt_weighting"] == "compel"
    (plain,) = engine.generate_files(request(prompt="a (photo) of a cat"), tmp_path / "plain")
    assert {"freeu", "prompt_weighting"}.isdisjoint(read_metadata(plain))  # left out: older files' bytes stay
    out = tmp_path / "again"
    assert cli_main(["reproduce", str(file), "--out", str(out), "--weights", str(tiny_checkpoint)]) == 0
    assert (out / file.name).read_bytes() == file.read_bytes()
    assert np.asarray(Image.open(file)).shape == (256, 256, 3)


@pytest.mark.parametrize("prompt", [f"{CAT}++", '("a cat", "a dog").blend(1)'])
def test_a_file_made_before_weighting_reproduces_its_prompt_as_text(
    engine, tiny_checkpoint, tmp_path, prompt
):
    """Its metadata has no prompt_weighting: the prompt is read as the service then read it, as text,
    even where it holds Compel's syntax (valid or not), and the file comes back byte for byte."""
    inputs = {
        "width": 256,
        "height": 256,
        "seed": 5,
        "num_inference_steps": 2,
        "disable_safety_checker": True,
    }
    old = Request.build(prompt, **inputs, compel=False)
    (file,) = engine.generate_files(old, tmp_path / "old")
    assert "prompt_weighting" not in read_metadata(file)
    made = np.asarray(Image.open(file))
    assert max_diff(made, reference(engine, prompt=prompt)) <= 1  # diffusers reads the text too
    out = tmp_path / "again"
    assert cli_main(["reproduce", str(file), "--out", str(out), "--weights", str(tiny_checkpoint)]) == 0
    assert (out / file.name).read_bytes() == file.read_bytes()
