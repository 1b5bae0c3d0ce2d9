"""Prompt -> text embeddings, in CLIP's 77-token windows so long prompts are not cut.

A prompt that weights anything in Compel's syntax (`word+`, `(a phrase)1.3`, a `.blend()`, an
`.and()` of several prompts) is encoded by the compel library; any other prompt, parentheses and
all, is encoded exactly as written, as it was before weighting existed.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import pyparsing
import torch
from compel import Compel
from compel.embeddings_provider import SplitLongTextMode
from compel.prompt_parser import Blend, Conjunction, FlattenedPrompt, Fragment, PromptParser
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.modeling_outputs import BaseModelOutput

from lcm.errors import InputError

MAX_WINDOWS = 8  # 8 x 75 = 600 prompt tokens; every window lengthens each UNet pass's cross-attention
# The A1111 web UI's `(text:1.2)`: a group without parentheses or colons inside, a plain decimal weight.
A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*\)")
# Compel's syntax needs one of these: `word+`, `word-`, `(...)`, `"..."1.2`, `.blend(`, `.and(`, `withLora(`.
SYNTAX = re.compile(r'[-+("]')
# compel's grammar recurses per parenthesis (Python's stack ends near 60 levels) and backtracks
# (without pyparsing's packrat cache, 8 nested levels took 100 s to parse). Deeper prompts are text.
MAX_NESTING = 16
pyparsing.ParserElement.enable_packrat()  # process-wide: compel's is the only pyparsing grammar here


@dataclass(frozen=True)
class PromptEmbedding:
    """Embeddings of one prompt, (1, 77 * windows, hidden)."""

    embeds: torch.Tensor
    num_tokens: int
    windows: int
    weighted: bool = False  # encoded by compel


def compel_text(prompt: str) -> str:
    """The prompt with A1111's `(text:1.2)` written as Compel's `(text)1.2`; nothing else changes."""
    return A1111_WEIGHT.sub(r"(\1)\2", prompt)


@functools.lru_cache(maxsize=64)  # a request's prompt is read when built, batched and encoded
def weighting(prompt: str) -> Optional[Conjunction]:
    """Compel's reading of the prompt when it weights, blends or joins anything; None for a plain prompt.

    Plain means what compel reads as one prompt whose every part has weight 1: such a prompt is
    encoded as written (compel would drop its parentheses and quotes). A prompt without any of
    the characters every weight, blend, conjunction and LoRA term needs is plain without parsing,
    and so is one nested too deeply for compel's parser (`too_deep`): it is served as it was
    before weighting existed rather than refused. Raises InputError naming `prompt` for syntax
    compel cannot read, and for the parts of it this service cannot honour.
    """
    text = compel_text(prompt)
    if not SYNTAX.search(text) or too_deep(prompt):
        return None
    try:
        conjunction = PromptParser().parse_conjunction(text)
    except (PromptParser.ParsingException, pyparsing.ParseException) as exc:
        syntax = "Compel's weighting syntax, where a .blend() or .and() is the whole prompt (docs/inputs.md)"
        allowed = f"{syntax}: {exc}"
        raise InputError("prompt", prompt, allowed) from None
    if conjunction.lora_weights:
        raise InputError(
            "prompt",
            prompt,
            "no withLora()/useLora(): no LoRA is loaded by name "
            "(the trained one comes with the weights; lora_scale scales it)",
        )
    parts = conjunction.prompts
    if not parts:
        raise InputError("prompt", prompt, "some text to draw besides Compel's syntax")
    for part in parts:
        for flat in part.prompts if isinstance(part, Blend) else [part]:
            if any(not isinstance(child, Fragment) for child in flat.children):
                raise InputError("prompt", prompt, "no .swap(): it needs cross-attention control")
        if isinstance(part, Blend) and part.normalize_weights and not sum(part.weights):
            raise InputError("prompt", prompt, f".blend() weights with a non-zero sum, not {part.weights}")
    if len(parts) == 1 and isinstance(parts[0], FlattenedPrompt) and conjunction.weights == [1.0]:
        if all(child.weight == 1 for child in parts[0].children):
            return None
    return conjunction


def too_deep(prompt: str) -> bool:
    """Parentheses nested past MAX_NESTING (an unmatched `(` opens, an unmatched `)` is ignored)."""
    depth = deepest = 0
    for char in prompt:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth = max(0, depth - 1)
    return deepest > MAX_NESTING


def token_windows(tokenizer: CLIPTokenizer, prompt: str) -> tuple[list[list[int]], int]:
    """Split the prompt's tokens into windows of 75, each framed by BOS/EOS and padded to 77.

    A prompt of up to 75 tokens gives exactly the ids diffusers' pipeline encodes, so short
    prompts are encoded as the reference encodes them.
    """
    body = tokenizer.model_max_length - 2
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    _check_length(prompt, len(ids), body)
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
    pad = tokenizer.pad_token_id
    windows = [
        [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [pad] * (body - len(chunk))
        for chunk in chunks
    ]
    return windows, len(ids)


def _check_length(prompt: str, tokens: int, body: int) -> None:
    if tokens > body * MAX_WINDOWS:
        raise InputError(
            "prompt",
            prompt,
            f"at most {body * MAX_WINDOWS} CLIP tokens ({MAX_WINDOWS} windows of {body}); "
            f"this prompt has {tokens}",
        )


def count_windows(tokenizer: CLIPTokenizer, prompt: str, compel: bool = True) -> tuple[int, int]:
    """The prompt's embedding length in 77-token windows, and its CLIP token count, without encoding it.

    A weighted prompt counts the tokens of its text without the syntax: each prompt of an
    `.and()` adds its windows, a `.blend()` takes its longest prompt's. `compel=False` reads
    the prompt as plain text.
    """
    conjunction = weighting(prompt) if compel else None
    if conjunction is None:
        windows, tokens = token_windows(tokenizer, prompt)
        return len(windows), tokens
    body = tokenizer.model_max_length - 2
    windows = tokens = 0
    for part in conjunction.prompts:
        counts = [
            len(sum(tokenizer([f.text for f in flat.children], add_special_tokens=False).input_ids, []))
            for flat in (part.prompts if isinstance(part, Blend) else [part])
        ]
        windows += max(1, math.ceil(max(counts) / body))
        tokens += max(counts)
    if windows > MAX_WINDOWS:
        raise InputError(
            "prompt",
            prompt,
            f"at most {MAX_WINDOWS} windows of {body} CLIP tokens; this weighted prompt needs {windows} "
            f"({tokens} tokens: each prompt of an .and() starts a window of its own)",
        )
    return windows, tokens


def _hidden(
    text_encoder: CLIPTextModel,
    input_ids: torch.Tensor,
    clip_skip: int,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The hidden state clip_skip layers before the last, through the final layer norm, as diffusers
    takes it; 0 is the last layer's output."""
    if clip_skip == 0:
        return text_encoder(input_ids, attention_mask)[0]
    states = text_encoder(input_ids, attention_mask, output_hidden_states=True).hidden_states
    # transformers 5 flattened CLIPTextModel (no .text_model); diffusers 0.42's own clip_skip breaks on it
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_norm(states[-(clip_skip + 1)])


class _SkippingEncoder:
    """The text encoder as compel calls it, answering with the layer clip_skip selects.

    Compel's own choice (ReturnedEmbeddingsType) knows only the last and the penultimate layer,
    and reaches the latter through `.text_model`, which transformers 5 removed.
    """

    def __init__(self, text_encoder: CLIPTextModel, clip_skip: int) -> None:
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.device = text_encoder.device
        self.dtype = text_encoder.dtype

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_: Any
    ) -> BaseModelOutput:
        hidden = _hidden(self.text_encoder, input_ids, self.clip_skip, attention_mask)
        return BaseModelOutput(last_hidden_state=hidden)


@torch.no_grad()
def encode_prompt(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompt: str,
    device: torch.device,
    clip_skip: int = 0,
    compel: bool = True,
) -> PromptEmbedding:
    """Encode each window and join them along the sequence axis (the A1111 web UI's approach).

    clip_skip=k takes the hidden state k layers before the last, through the final layer norm,
    as diffusers does; 0 is the last layer. A weighted prompt goes through compel, in the same
    windows: 75 tokens each, split where the 75th token ends (not at compel's default, the last
    sentence end), each framed by BOS/EOS and padded to 77. `compel=False` reads the prompt as
    plain text.
    """
    conjunction = weighting(prompt) if compel else None
    if conjunction is not None:
        windows, num_tokens = count_windows(tokenizer, prompt)
        compel = Compel(
            tokenizer=tokenizer,
            text_encoder=_SkippingEncoder(text_encoder, clip_skip),
            truncate_long_prompts=False,
            split_long_text_mode=SplitLongTextMode.BRUTAL,
            device=device,
        )
        embeds, _ = compel.build_conditioning_tensor_for_conjunction(conjunction)
        return PromptEmbedding(embeds=embeds, num_tokens=num_tokens, windows=windows, weighted=True)
    windows, num_tokens = token_windows(tokenizer, prompt)
    input_ids = torch.tensor(windows, dtype=torch.long, device=device)
    hidden = _hidden(text_encoder, input_ids, clip_skip)
    embeds = hidden.to(text_encoder.dtype).reshape(1, -1, hidden.shape[-1])
    return PromptEmbedding(embeds=embeds, num_tokens=num_tokens, windows=len(windows))
