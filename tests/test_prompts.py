"""The prompt limits at their edges, counted by the real checkpoint's CLIP tokenizer (lcm/configs)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from lcm import prompts
from lcm.errors import InputError
from lcm.params import MAX_PROMPT_CHARS, Request
from lcm.synthetic import VENDORED_DIR

WORDS = ("a", "photo", "of", "the", "red", "cat", "painting", "astronaut")  # one CLIP token each


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(VENDORED_DIR / "tokenizer")


@pytest.fixture(scope="module")
def text_encoder(tiny_checkpoint, tokenizer) -> CLIPTextModel:
    """The tiny text encoder with the real vocabulary's rows, so that real token ids encode."""
    encoder = CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder", local_files_only=True)
    encoder.resize_token_embeddings(len(tokenizer))
    return encoder.eval()


def prompt_of(tokenizer: CLIPTokenizer, tokens: int) -> str:
    """A prompt of exactly `tokens` CLIP tokens, as the tokenizer itself counts them."""
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    assert len(tokenizer(prompt, add_special_tokens=False).input_ids) == tokens
    return prompt


def window_limit(tokenizer: CLIPTokenizer) -> int:
    return tokenizer.model_max_length - 2  # each window's BOS and EOS


def test_75_tokens_are_one_window_as_diffusers_encodes_them(tokenizer, text_encoder):
    prompt = prompt_of(tokenizer, 75)
    windows, count = prompts.token_windows(tokenizer, prompt)
    assert count == 75 == window_limit(tokenizer)
    assert windows == [tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids]
    embedding = prompts.encode_prompt(tokenizer, text_encoder, prompt, torch.device("cpu"))
    assert (embedding.windows, embedding.num_tokens) == (1, 75)
    assert embedding.embeds.shape == (1, 77, text_encoder.config.hidden_size)


def test_76_tokens_open_a_second_window_holding_the_76th(tokenizer, text_encoder):
    prompt = prompt_of(tokenizer, 76)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    windows, count = prompts.token_windows(tokenizer, prompt)
    assert count == 76
    assert windows == [[bos, *ids[:75], eos], [bos, ids[75], eos, *[pad] * 74]]
    embedding = prompts.encode_prompt(tokenizer, text_encoder, prompt, torch.device("cpu"))
    assert (embedding.windows, embedding.num_tokens) == (2, 76)
    assert embedding.embeds.shape == (1, 154, text_encoder.config.hidden_size)
    # the first window encodes alone, as the 75-token prompt it holds
    first = prompts.encode_prompt(tokenizer, text_encoder, prompt_of(tokenizer, 75), torch.device("cpu"))
    torch.testing.assert_close(embedding.embeds[:, :77], first.embeds)


def test_600_tokens_are_encoded_and_601_refused_with_counts(tokenizer, text_encoder):
    limit = prompts.MAX_WINDOWS * window_limit(tokenizer)
    assert limit == 600
    embedding = prompts.encode_prompt(tokenizer, text_encoder, prompt_of(tokenizer, 600), torch.device("cpu"))
    assert (embedding.windows, embedding.num_tokens) == (8, 600)
    assert embedding.embeds.shape == (1, 8 * 77, text_encoder.config.hidden_size)
    with pytest.raises(InputError) as refused:
        prompts.encode_prompt(tokenizer, text_encoder, prompt_of(tokenizer, 601), torch.device("cpu"))
    assert refused.value.field == "prompt"
    assert str(refused.value).endswith(": at most 600 CLIP tokens (8 windows of 75); this prompt has 601")


def test_5000_characters_are_accepted_and_5001_refused_naming_the_field(tokenizer):
    """Long words keep a prompt at the character limit within the token limit: it is served whole."""
    prompt = ("photograph " * MAX_PROMPT_CHARS)[: MAX_PROMPT_CHARS - 1] + "s"
    assert len(prompt) == MAX_PROMPT_CHARS == 5000
    assert Request.build(prompt, seed=0).prompt == prompt
    assert prompts.token_windows(tokenizer, prompt)[1] <= 600
    with pytest.raises(InputError) as refused:
        Request.build(prompt + "s", seed=0)
    assert refused.value.field == "prompt"
    assert str(refused.value).endswith(" is not allowed: a string of at most 5000 characters")
