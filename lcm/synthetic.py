"""Synthetic LCM Dreamshaper v7 checkpoints: the real layout and configs, random weights.

Tests, benchmarks and CI need a checkpoint that loads through exactly the code path of the real
download (``LatentConsistencyModelPipeline.from_pretrained(..., use_safetensors=True)``) without
fetching it. ``full`` has the real architecture and tokenizer, so it costs what the real model
costs; ``tiny`` keeps the layout, classes and scheduler but shrinks every network so it builds
and runs in about a second, and scales up its UNet's conditioning layers so that the prompt,
guidance and clip skip change its images by tens of levels. Images from either are noise.

    python -m lcm.synthetic OUT_DIR --size tiny|full [--seed N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

VENDORED_DIR = Path(__file__).resolve().parent / "configs" / "lcm-dreamshaper-v7"
TAESD_CONFIG = Path(__file__).resolve().parent / "configs" / "taesd" / "config.json"
CONTROLNET_CONFIG = Path(__file__).resolve().parent / "configs" / "controlnet-canny" / "config.json"
SIZES = ("tiny", "full")
MARKER_NAME = "synthetic.json"

# The weight-bearing components and the file each one's weights are saved to: fp16 for full
# (the size of the real download), fp32 for tiny.
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "safety_checker": "safety_checker/model.safetensors",
    "taesd": "taesd/diffusion_pytorch_model.safetensors",  # fast_decode's tiny decoder (madebyollin/taesd)
    # control_image's canny ControlNet (lllyasviel/control_v11p_sd15_canny)
    "controlnet-canny": "controlnet-canny/diffusion_pytorch_model.safetensors",
}
# Configs written beside the weights that are not part of the LCM checkpoint's own files.
_OWN_CONFIGS = {"taesd": TAESD_CONFIG, "controlnet-canny": CONTROLNET_CONFIG}

# Weight-name prefixes that the hub's files have and these components' modules no longer do: the hub's
# text_encoder and safety_checker files were written by transformers 4, which nested CLIPTextModel's
# layers under .text_model and CLIPVisionModel's under .vision_model; transformers 5.6 flattened both
# and its from_pretrained maps the old names. Written in the hub's names, a synthetic checkpoint loads
# through that mapping as the real one does, and transformers 4 reads it too. diffusers' UNet and VAE
# names have not changed since the hub's files were saved (diffusers 0.22, after 0.17 renamed the VAE's
# attention weights to to_q/to_k/to_v/to_out.0), so they are written as diffusers saves them.
_HUB_PREFIXES: dict[str, dict[str, str]] = {
    "text_encoder": {"": "text_model."},
    "safety_checker": {"vision_model.": "vision_model.vision_model."},
}

# Tiny = the real config with these keys replaced, so everything not named here (activations,
# time embedding, VAE scaling factor, legacy token ids, ...) stays as in the real model.
_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "unet": {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "sample_size": 32,
    },
    "vae": {
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
    "safety_checker": {
        "projection_dim": 32,
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "patch_size": 32,
        },
    },
    "controlnet-canny": {  # the tiny UNet's encoder half, as ControlNetModel.from_unet would make it
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "conditioning_embedding_out_channels": [8, 8, 16, 16],
    },
    "taesd": {
        "encoder_block_out_channels": [16, 16, 16, 16],
        "decoder_block_out_channels": [16, 16, 16, 16],
        "num_encoder_blocks": [1, 1, 1, 1],
        "num_decoder_blocks": [1, 1, 1, 1],
    },
}
# Tiny UNet layers whose default init is scaled by these gains (weight and bias, so their output
# scales). At default init the UNet's output is a third of its input's size, so the clean latents it
# predicts at t=999 are mostly the initial noise divided by sqrt(alpha_bar) = 0.068, and its
# cross-attention, a near-uniform average over the 77 tokens, adds little that varies across the
# image: prompt, guidance and clip skip moved a 256x256 image by under 12 levels in 255, a thin
# margin for the tests that compare with diffusers within 1 to catch an input lost on the way.
# tests/test_tiny_sensitivity.py holds the gained checkpoint to tens.
_TINY_UNET_GAINS = {
    "conv_out": 3.0,  # the predicted noise as large as the noise: the UNet, not the seed, decides
    "attn2.to_q": 2.0,  # sharper cross-attention: each place attends to its own tokens
    "attn2.to_k": 2.0,
    "attn2.to_v": 3.0,  # the text's share of each transformer block's output
    "attn2.to_out.0": 3.0,
    "time_embedding.cond_proj": 8.0,  # the guidance embedding's share of the time embedding
}
# A ControlNet's output layers start at zero (diffusers' zero_module: a new ControlNet changes nothing
# until trained), so the synthetic ones re-initialise them as ordinary convolutions. The tiny one then
# scales up its conditioning embedding and outputs (weights and biases, by module-name prefix): at
# default init its output hardly depended on the edge map, so the Canny thresholds moved a 256x256
# image by 1 level; with these gains they move it by tens (tests/test_controlnet.py holds them to it).
_CONTROLNET_ZERO_LAYERS = (
    "controlnet_cond_embedding.conv_out",
    "controlnet_down_blocks",
    "controlnet_mid_block",
)
_TINY_CONTROLNET_GAINS = {
    "controlnet_cond_embedding.conv_in": 3.0,  # the edge map's share of the ControlNet's input
    "controlnet_cond_embedding.blocks": 3.0,
    "controlnet_cond_embedding.conv_out": 4.0,
    "controlnet_down_blocks": 4.0,  # the residuals' share of the UNet's skip connections
    "controlnet_mid_block": 4.0,
}
# Words the tiny tokenizer merges into single tokens; everything else falls back to byte tokens.
_TINY_WORDS = ("a", "photo", "of", "cat", "dog", "the", "astronaut", "riding", "horse", "painting")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_TINY_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def vendored_files() -> list[str]:
    """Every config and tokenizer file of the real checkpoint, as paths relative to its root."""
    return sorted(
        p.relative_to(VENDORED_DIR).as_posix()
        for p in VENDORED_DIR.rglob("*")
        if p.is_file() and p.name != "PROVENANCE.md"
    )


def checkpoint_files() -> list[str]:
    """The exact file set of a synthetic checkpoint: the real download's files plus the marker."""
    own = [f"{name}/config.json" for name in _OWN_CONFIGS]
    return sorted([*vendored_files(), *own, *WEIGHT_FILES.values(), MARKER_NAME])


def model_config(component: str, size: str) -> dict[str, Any]:
    """The config a component is built from: the vendored one, shrunk for ``tiny``."""
    source = _OWN_CONFIGS.get(component, VENDORED_DIR / component / "config.json")
    config = json.loads(source.read_text())
    if size == "tiny":
        for key, value in _TINY_OVERRIDES[component].items():
            if isinstance(value, dict):
                config[key] = {**config.get(key, {}), **value}
            else:
                config[key] = copy.deepcopy(value)
        if component == "text_encoder":
            config["vocab_size"] = len(_tiny_vocab()[0])
    return config


def build_model(component: str, size: str) -> torch.nn.Module:
    """One weight-bearing component with its library's default init, on torch's current device.

    The tiny UNet's conditioning layers then get ``_TINY_UNET_GAINS``. Callers seed and place it;
    tests build the full-size ones on the ``meta`` device.
    """
    config = model_config(component, size)
    if component == "unet":
        unet = UNet2DConditionModel.from_config(config)
        if size == "tiny":
            _apply_gains(unet, _TINY_UNET_GAINS)
        return unet
    if component == "vae":
        return AutoencoderKL.from_config(config)
    if component == "text_encoder":
        return CLIPTextModel(CLIPTextConfig.from_dict(config))
    if component == "safety_checker":
        return StableDiffusionSafetyChecker(CLIPConfig.from_dict(config))
    if component == "taesd":
        return AutoencoderTiny.from_config(config)
    if component == "controlnet-canny":
        controlnet = ControlNetModel.from_config(config)
        _reset_zero_layers(controlnet, _TINY_CONTROLNET_GAINS if size == "tiny" else {})
        return controlnet
    raise ValueError(f"component={component!r} is not one of {sorted(WEIGHT_FILES)}")


def _apply_gains(model: torch.nn.Module, gains: dict[str, float]) -> None:
    """Multiply the parameters of every module whose name ends with a key of ``gains`` by its value."""
    with torch.no_grad():
        for name, module in model.named_modules():
            suffix = next((key for key in gains if name == key or name.endswith("." + key)), None)
            if suffix is not None:
                for parameter in module.parameters(recurse=False):
                    parameter.mul_(gains[suffix])


def _reset_zero_layers(controlnet: torch.nn.Module, gains: dict[str, float]) -> None:
    """Torch's default init for a ControlNet's zero-initialised convolutions; then each convolution
    under a prefix of `gains` scaled by its gain."""

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    with torch.no_grad():
        for name, module in controlnet.named_modules():
            if not isinstance(module, torch.nn.Conv2d):
                continue
            if any(under(name, layer) for layer in _CONTROLNET_ZERO_LAYERS):
                module.reset_parameters()
            gain = next((g for prefix, g in gains.items() if under(name, prefix)), 1.0)
            for parameter in module.parameters():
                parameter.mul_(gain)


def build_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a synthetic checkpoint to ``out_dir`` (which must not exist or be empty) and return it.

    It is built in a temporary folder beside ``out_dir`` and renamed into place at the end, so a
    half-written checkpoint never looks complete. The same size and seed give byte-identical files.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed: choose one of {', '.join(SIZES)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already exists and is not an empty folder; remove it or pick another path"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        work.chmod(0o755)
        _write_checkpoint(work, size, seed)
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _write_checkpoint(root: Path, size: str, seed: int) -> None:
    for component in WEIGHT_FILES:
        with _seeded(seed):
            model = build_model(component, size)
        if size == "full":
            model.half()
        model.save_pretrained(root / component)
        if component in _HUB_PREFIXES:
            _rename_weights(root / WEIGHT_FILES[component], _HUB_PREFIXES[component])
        del model
        gc.collect()

    # full: every config and tokenizer file is the real one, copied over whatever save_pretrained
    # wrote. tiny: the model configs are the shrunk ones just saved and the tokenizer is hand-made;
    # model_index, scheduler, feature extractor and special_tokens_map are the real files.
    own: set[str] = set()
    if size == "tiny":
        _write_tiny_tokenizer(root / "tokenizer")
        own = {f"{c}/config.json" for c in WEIGHT_FILES} | {f"tokenizer/{n}" for n in _TINY_TOKENIZER_FILES}
    for name in vendored_files():
        if name not in own:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(VENDORED_DIR / name, root / name)
    if size == "full":
        for name, config in _OWN_CONFIGS.items():
            shutil.copyfile(config, root / name / "config.json")
    (root / MARKER_NAME).write_text(
        json.dumps({"size": size, "seed": seed, "synthetic": True}, indent=2) + "\n"
    )
    _match_file_set(root)


def _rename_weights(path: Path, prefixes: dict[str, str]) -> None:
    """Rewrite a safetensors file with each name's first matching prefix replaced, keeping its metadata."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {}
        for name in handle.keys():
            ours = next((prefix for prefix in prefixes if name.startswith(prefix)), None)
            hub_name = name if ours is None else prefixes[ours] + name[len(ours) :]
            tensors[hub_name] = handle.get_tensor(name)
    save_file(tensors, path, metadata=metadata)


def _match_file_set(root: Path) -> None:
    """Make the file set and modes those of the real download; fail if a file is missing.

    An extra file is not harmless: a tokenizer.json, for one, makes CLIPTokenizer ignore
    vocab.json and merges.txt.
    """
    expected = set(checkpoint_files())
    for path in sorted(root.rglob("*"), reverse=True):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name not in expected:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    missing = sorted(f for f in expected if not (root / f).is_file())
    if missing:
        raise RuntimeError(f"synthetic checkpoint is missing {', '.join(missing)}")
    # save_pretrained writes weights owner-only through a temporary file; a download is world-readable.
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed module init without disturbing the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary in the real one's order: bytes, bytes + '</w>', merges, specials.

    Keeping <|endoftext|> the highest id matters: the real text config's legacy eos_token_id makes
    CLIPTextModel pool at the argmax token id.
    """
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
                vocab.append("".join(pair))
            parts = ["".join(pair), *parts[2:]]
    return [*vocab, _BOS, _EOS], merges


def _write_tiny_tokenizer(folder: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json in the real files' format, loadable offline."""
    vocab, merges = _tiny_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    ids = {token: i for i, token in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = json.loads((VENDORED_DIR / "tokenizer" / "tokenizer_config.json").read_text())
    special = config["added_tokens_decoder"]
    config["added_tokens_decoder"] = {
        str(ids[entry["content"]]): entry
        for entry in sorted(special.values(), key=lambda e: ids[e["content"]])
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: build one synthetic checkpoint and say where it went."""
    parser = argparse.ArgumentParser(prog="python -m lcm.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create; must not exist or be empty")
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny (about 1 s, 5 MB, fp32) or full (real shapes, fp16, 2.7 GB)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = build_checkpoint(args.out_dir, args.size, args.seed)
    except FileExistsError as error:
        parser.exit(1, f"error: {error}\n")
    size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(
        f"wrote {args.size} synthetic checkpoint (seed {args.seed}) to {out}: "
        f"{size_bytes / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
