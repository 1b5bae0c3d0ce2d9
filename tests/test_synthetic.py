"""The synthetic checkpoint loads and runs like the real one; the vendored configs are the real ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from lcm import loading, synthetic
from lcm.synthetic import VENDORED_DIR, WEIGHT_FILES, build_checkpoint, build_model, checkpoint_files, main

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared" / "lcm-dreamshaper-v7"

# The provenance record: sha256 of each file as copied from SimianLuo/LCM_Dreamshaper_v7.
GOLDEN_SHA256 = {
    "feature_extractor/preprocessor_config.json": (
        "4db495644e3e5bd8fcac52f70e7fc0b413c911086021acf73ac30e5911166e95"
    ),
    "model_index.json": "2aeb4bb750106785be3484592f1572ff40b0b5229b4db58bfff0a3bed5ae9bc8",
    "safety_checker/config.json": "7a6c4890cfa31b748bc6b38e25f812099070cf9baf47926ed6eb887b0dd355e5",
    "scheduler/scheduler_config.json": "afea3befb5ce5213e5a4ea267e4cc87af41f034da3b7588c1293a2058dee70d9",
    "text_encoder/config.json": "52ecba4b372628a36c2f81ebb44168c4684c916e8379ecf7165d61746c326794",
    "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
    "tokenizer/special_tokens_map.json": "92e1e31d71a7f63cd75b4dfa1469377bd2cd6b8292cf70b3ff5b7082b0edc1c9",
    "tokenizer/tokenizer_config.json": "47c69084af647bc277b858faaa9871175a95eb4d36cd98a6d04039305613ceff",
    "tokenizer/vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
    "unet/config.json": "49af23f70a2c86813bf1840421207a5269f27b0cd00f26585957e18595cfb816",
    "vae/config.json": "227351a7b39cccf60b28d965af26cc0204a80a84a59f367df57b9ad5bdd27c59",
}

# Parameter counts of the real model, in millions, from the shared README.
FULL_PARAMS_M = {
    "unet": 859.6,
    "text_encoder": 123.1,
    "vae": 83.7,
    "safety_checker": 304.0,
    "controlnet-canny": 361.3,
}

# Files the tiny checkpoint takes verbatim from the real one.
TINY_VERBATIM = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "feature_extractor/preprocessor_config.json",
    "tokenizer/special_tokens_map.json",
)

# Weight names as the hub's files hold them. transformers 4 wrote the text encoder and safety checker,
# with CLIPTextModel's layers under text_model. and CLIPVisionModel's under vision_model. (transformers
# 5 flattened both); diffusers 0.22 wrote the UNet and VAE, the VAE's attention as to_q/to_k/to_v/to_out.0
# (the names of diffusers 0.17 on; earlier files had query/key/value/proj_attn).
HUB_NAMES = {
    "text_encoder": (
        "text_model.embeddings.token_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.final_layer_norm.weight",
    ),
    "safety_checker": (
        "vision_model.vision_model.embeddings.patch_embedding.weight",
        "vision_model.vision_model.post_layernorm.weight",
        "visual_projection.weight",
        "concept_embeds",
        "special_care_embeds_weights",
    ),
    "unet": (
        "time_embedding.cond_proj.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    ),
    "vae": (
        "decoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.to_out.0.weight",
    ),
}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint: Path) -> LatentConsistencyModelPipeline:
    return LatentConsistencyModelPipeline.from_pretrained(
        tiny_checkpoint, local_files_only=True, use_safetensors=True
    )


def test_vendored_files_match_golden_hashes() -> None:
    vendored = {name: _sha256(VENDORED_DIR / name) for name in synthetic.vendored_files()}
    assert vendored == GOLDEN_SHA256


@pytest.mark.skipif(not SHARED_DIR.is_dir(), reason="no shared copy here; the golden hashes still checked")
def test_vendored_files_match_shared_copy() -> None:
    shared = [name for name in _files(SHARED_DIR) if name != "README.md"]
    assert shared == synthetic.vendored_files()
    for name in shared:
        assert (VENDORED_DIR / name).read_bytes() == (SHARED_DIR / name).read_bytes(), name


@pytest.mark.parametrize("component", sorted(FULL_PARAMS_M))
def test_full_components_have_the_real_parameter_counts(component: str) -> None:
    with torch.device("meta"):
        model = build_model(component, "full")
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == FULL_PARAMS_M[component]


def test_tiny_builds_with_the_real_layout(tmp_path: Path) -> None:
    root = build_checkpoint(tmp_path / "ckpt", "tiny", seed=0)
    assert root == tmp_path / "ckpt"
    assert _files(root) == checkpoint_files()
    assert not [p for p in root.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    for name in TINY_VERBATIM:
        assert (root / name).read_bytes() == (VENDORED_DIR / name).read_bytes(), name
    assert json.loads((root / "synthetic.json").read_text()) == {"size": "tiny", "seed": 0, "synthetic": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tiny_loads_with_the_real_classes_and_scheduler(tiny_pipe: LatentConsistencyModelPipeline) -> None:
    pipe = tiny_pipe
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    assert pipe.config.requires_safety_checker is True
    real_scheduler = LCMScheduler.from_pretrained(VENDORED_DIR / "scheduler")
    assert dict(pipe.scheduler.config) == dict(real_scheduler.config)
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.unet.config.time_cond_proj_dim is not None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.num_hidden_layers >= 4
    assert pipe.tokenizer.model_max_length == 77


def test_weights_have_the_hub_names(tiny_checkpoint: Path) -> None:
    names = {}
    for component, name in WEIGHT_FILES.items():
        with safe_open(tiny_checkpoint / name, framework="pt") as handle:
            names[component] = set(handle.keys())
    for component, expected in HUB_NAMES.items():
        assert set(expected) <= names[component], component
    assert all(name.startswith("text_model.") for name in names["text_encoder"])
    vision = [name for name in names["safety_checker"] if name.startswith("vision_model.")]
    assert vision and all(name.startswith("vision_model.vision_model.") for name in vision)


def test_hub_names_load_with_nothing_missing_or_unexpected(tiny_checkpoint: Path, monkeypatch) -> None:
    """Through lcm.loading, which refuses missing weights but not unused ones: every load report is empty."""
    reports = {}
    check = loading._load_problems

    def recording(model: torch.nn.Module, info: dict) -> list[str]:
        reports[type(model).__name__] = info
        return check(model, info)

    monkeypatch.setattr(loading, "_load_problems", recording)
    cpu = torch.device("cpu")
    pipe = loading.load_pipeline(tiny_checkpoint, cpu, torch.float32)
    loading.load_taesd(tiny_checkpoint, cpu, torch.float32)
    assert sorted(reports) == [
        "AutoencoderKL",
        "AutoencoderTiny",
        "CLIPTextModel",
        "StableDiffusionSafetyChecker",
        "UNet2DConditionModel",
    ]
    for name, info in reports.items():
        problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        assert not any(problems.values()), (name, problems)
    # transformers put the hub's names where its flattened modules hold them
    text = load_file(tiny_checkpoint / WEIGHT_FILES["text_encoder"])
    token_embedding = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(token_embedding, text["text_model.embeddings.token_embedding.weight"])
    checker = load_file(tiny_checkpoint / WEIGHT_FILES["safety_checker"])
    post_norm = pipe.safety_checker.state_dict()["vision_model.post_layernorm.weight"]
    assert torch.equal(post_norm, checker["vision_model.vision_model.post_layernorm.weight"])


def test_tiny_tokenizer_is_clip_shaped(tiny_checkpoint: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    vocab_size = json.loads((tiny_checkpoint / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert len(tokenizer) == vocab_size
    # <|endoftext|> is the highest id, as CLIPTextModel's legacy pooling expects; it also pads.
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == vocab_size - 1
    ids = tokenizer("A photo of a Cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    words = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens(ids[:7]) == words
    assert set(ids[7:]) == {tokenizer.pad_token_id}
    # A word without merges falls back to byte-level tokens instead of <|endoftext|> as unknown.
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra").input_ids[1:-1]) == [
        "z",
        "e",
        "b",
        "r",
        "a</w>",
    ]


def test_tiny_pipeline_gives_finite_images(tiny_pipe: LatentConsistencyModelPipeline) -> None:
    def generate(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        out = tiny_pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=generator,
            output_type="np",
        )
        return out.images

    first, again, other = generate(0), generate(0), generate(1)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert first.min() >= 0 and first.max() <= 1 and first.std() > 0
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    same = build_checkpoint(tmp_path / "same", "tiny", seed=0)
    other = build_checkpoint(tmp_path / "other", "tiny", seed=1)
    for name in checkpoint_files():
        assert (same / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    for name in WEIGHT_FILES.values():
        assert (other / name).read_bytes() != (tiny_checkpoint / name).read_bytes(), name


def test_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_checkpoint(out, "tiny")
    assert _files(out) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_builds_into_an_empty_dir_and_rejects_a_full_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    out.mkdir()
    main([str(out), "--size", "tiny", "--seed", "7"])
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 7
    assert str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), "--size", "tiny"])
    assert exit_info.value.code == 1
    assert "not an empty folder" in capsys.readouterr().err
