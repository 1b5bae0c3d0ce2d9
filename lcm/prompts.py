"""Prompt -> text embeddings, in CLIP's 77-token windows so long prompts are not cut."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from lcm.errors import InputError

MAX_WINDOWS = 8  # 8 x 75 = 600 prompt tokens; every window lengthens each UNet pass's cross-attention


@dataclass(frozen=True)
class PromptEmbedding:
    """Embeddings of one prompt, (1, 77 * windows, hidden)."""

    embeds: torch.Tensor
    num_tokens: int
    windows: int


def token_windows(tokenizer: CLIPTokenizer, prompt: str) -> tuple[list[list[int]], int]:
    """Split the prompt's tokens into windows of 75, each framed by BOS/EOS and padded to 77.

    A prompt of up to 75 tokens gives exactly the ids diffusers' pipeline encodes, so short
    prompts are encoded as the reference encodes them.
    """
    context = tokenizer.model_max_length
    body = context - 2
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    if len(ids) > body * MAX_WINDOWS:
        raise InputError(
            "prompt",
            prompt,
            f"at most {body * MAX_WINDOWS} CLIP tokens ({MAX_WINDOWS} windows of {body}); "
            f"this prompt has {len(ids)}",
        )
    chunks = [ids[i : i + body] for i in range(0, len(ids), body)] or [[]]
    pad = tokenizer.pad_token_id
    windows = [
        [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [pad] * (body - len(chunk))
        for chunk in chunks
    ]
    return windows, len(ids)


@torch.no_grad()
def encode_prompt(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    prompt: str,
    device: torch.device,
    clip_skip: int = 0,
) -> PromptEmbedding:
    """Encode each window and join them along the sequence axis (the A1111 web UI's approach).

    clip_skip=k takes the hidden state k layers before the last, through the final layer norm,
    as diffusers does; 0 is the last layer.
    """
    windows, num_tokens = token_windows(tokenizer, prompt)
    input_ids = torch.tensor(windows, dtype=torch.long, device=device)
    if clip_skip == 0:
        hidden = text_encoder(input_ids)[0]
    else:
        states = text_encoder(input_ids, output_hidden_states=True).hidden_states
        # transformers 5 flattened CLIPTextModel (no .text_model); diffusers 0.42's own clip_skip breaks on it
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        hidden = final_norm(states[-(clip_skip + 1)])
    embeds = hidden.to(text_encoder.dtype).reshape(1, -1, hidden.shape[-1])
    return PromptEmbedding(embeds=embeds, num_tokens=num_tokens, windows=len(windows))
