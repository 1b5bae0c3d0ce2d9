"""Faults: out of memory mid-request and broken weights at setup, each with a message saying what to do."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import accelerate
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from safetensors.torch import load_file, save_file

from cogserver import ROOT, CogServer
from fault_predictor import OOM_MARKER
from lcm.errors import LCMError, WeightsError
from lcm.loading import load_pipeline, load_taesd
from lcm.params import Request
from lcm.weights import write_manifest

UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT_ENCODER = "text_encoder/model.safetensors"
SMALL = {"width": 256, "height": 256, "num_inference_steps": 1, "disable_safety_checker": True}
CPU = torch.device("cpu")


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("where", ["unet", "vae"])
def test_out_of_memory_fails_that_request_frees_memory_and_the_next_works(engine, monkeypatch, where):
    small = dict(
        prompt="a cat", width=256, height=256, num_inference_steps=1, seed=3, disable_safety_checker=True
    )
    request, alone = Request.build(**small, num_images=2), Request.build(**small)
    before = engine.generate(alone).pixels
    freed: list[bool] = []
    free_memory = engine.model.free_memory
    monkeypatch.setattr(engine.model, "free_memory", lambda: freed.append(True) or free_memory())
    module = engine.model.pipe.unet if where == "unet" else engine.model.pipe.vae
    monkeypatch.setattr(module, "forward" if where == "unet" else "decode", oom)
    with pytest.raises(LCMError) as caught:
        engine.generate(request)
    assert str(caught.value) == (
        "out of CPU memory generating 2 image(s) at 256x256: try a smaller size or fewer images"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert freed == [True]
    monkeypatch.undo()
    assert np.array_equal(engine.generate(alone).pixels, before)  # nothing left in a bad state


@pytest.fixture(scope="module")
def fault_server(tiny_checkpoint, openapi_schema):
    srv = CogServer(
        tiny_checkpoint, openapi_schema, predictor=f"{ROOT / 'tests' / 'fault_predictor.py'}:Predictor"
    )
    try:
        srv.wait_until({"READY"})
        yield srv
    finally:
        srv.stop()


def test_out_of_memory_over_http_fails_clearly_and_the_server_keeps_serving(fault_server):
    workers = fault_server.worker_pids()
    status, body = fault_server.predict(prompt=f"a cat {OOM_MARKER}", num_images=2, **SMALL)
    assert status == 200 and body["status"] == "failed", body
    assert "out of CPU memory generating 2 image(s) at 256x256" in body["error"], body["error"]
    assert "try a smaller size or fewer images" in body["error"]
    status, body = fault_server.predict(prompt="a cat", **SMALL)
    assert status == 200 and body["status"] == "succeeded", body
    assert fault_server.worker_pids() == workers  # the same worker, not a restarted one


# --- broken weights -------------------------------------------------------------------------------


def truncate(root: Path, name: str = UNET) -> None:
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])


def edit_config(name: str, **changes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        config = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps({**config, **changes}))

    return edit


def remove(name: str) -> Callable[[Path], None]:
    def remove_it(root: Path) -> None:
        target = root / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return remove_it


def edit_weights(name: str, key: str, keep: int | None = None) -> Callable[[Path], None]:
    """Drop one tensor from a safetensors file, or keep only its first `keep` rows."""

    def edit(root: Path) -> None:
        tensors = load_file(root / name)
        if keep is None:
            del tensors[key]
        else:
            tensors[key] = tensors[key][:keep].clone()
        save_file(tensors, root / name)

    return edit


def truncate_after_manifest(root: Path) -> None:
    write_manifest(root, "test")
    truncate(root)


# Each breakage and the words its error must contain: the file, and what is wrong with it.
BREAKAGES = {
    "truncated-unet": (truncate, [UNET, "truncated or corrupt"]),
    "truncated-with-manifest": (truncate_after_manifest, [UNET, "size differs from manifest.json"]),
    "unet-config-mismatch": (
        edit_config("unet/config.json", block_out_channels=[32, 32]),
        ["unet/config.json does not match " + UNET, "another shape in the file"],
    ),
    "text-encoder-config-wants-more-layers": (
        edit_config("text_encoder/config.json", num_hidden_layers=6),
        ["text_encoder/config.json does not match text_encoder/model.safetensors", "not in the file"],
    ),
    # The weights file itself short of a tensor or with one mis-shaped, in a diffusers model (built on
    # the meta device under low_cpu_mem_usage) and in a transformers one.
    "unet-weight-not-in-file": (
        edit_weights(UNET, "conv_in.bias"),
        [
            "unet/config.json does not match " + UNET,
            "1 weight(s) the config needs are not in the file",
            "conv_in.bias",
        ],
    ),
    "unet-weight-misshaped": (
        edit_weights(UNET, "conv_in.weight", keep=31),
        [
            "unet/config.json does not match " + UNET,
            "conv_in.weight is (31, 4, 3, 3) in the file, (32, 4, 3, 3)",
        ],
    ),
    "text-encoder-weight-not-in-file": (
        edit_weights(TEXT_ENCODER, "text_model.embeddings.position_embedding.weight"),
        [
            "text_encoder/config.json does not match " + TEXT_ENCODER,
            "1 weight(s) the config needs are not in the file",
            "embeddings.position_embedding.weight",
        ],
    ),
    "text-encoder-weight-misshaped": (
        edit_weights(TEXT_ENCODER, "text_model.embeddings.token_embedding.weight", keep=548),
        [
            "text_encoder/config.json does not match " + TEXT_ENCODER,
            "embeddings.token_embedding.weight is (548, 32) in the file, (549, 32) by the config",
        ],
    ),
    "missing-vae": (remove("vae"), ["missing 2 of the", "vae/config.json", "vae/diffusion_pytorch_model"]),
    "unet-config-not-json": (
        lambda root: (root / "unet/config.json").write_text('{"in_channels": '),
        ["unet does not load from unet/config.json", "not a valid JSON"],
    ),
    "tokenizer-vocab-corrupt": (
        lambda root: (root / "tokenizer/vocab.json").write_text("not json"),
        ["tokenizer does not load from tokenizer/vocab.json"],
    ),
    "foreign-class-in-model-index": (
        edit_config("model_index.json", unet=["os", "system"]),
        ["model_index.json", "unet: ['os', 'system'], expected ['diffusers', 'UNet2DConditionModel']"],
    ),
    "foreign-feature-extractor-in-model-index": (
        edit_config("model_index.json", feature_extractor=["transformers", "AutoImageProcessor"]),
        [
            "feature_extractor: ['transformers', 'AutoImageProcessor'], expected "
            "['transformers', 'CLIPImageProcessor'] or ['transformers', 'CLIPImageProcessorPil']"
        ],
    ),
}


def broken_copy(tiny_checkpoint: Path, where: Path, breakage: str) -> Path:
    root = where / breakage
    shutil.copytree(tiny_checkpoint, root)
    BREAKAGES[breakage][0](root)
    return root


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_weights_name_the_file(tiny_checkpoint, tmp_path, breakage):
    root = broken_copy(tiny_checkpoint, tmp_path, breakage)
    with pytest.raises(WeightsError) as caught:
        load_pipeline(root, CPU, torch.float32)
    for words in BREAKAGES[breakage][1]:
        assert words in str(caught.value)
    assert "download-weights" in str(caught.value)  # and how to fix it


def test_a_weight_left_on_the_meta_device_is_refused_by_name(tiny_checkpoint, monkeypatch):
    """What low_cpu_mem_usage did not load stays on `meta`: refused even when diffusers reports nothing."""
    from_pretrained = UNet2DConditionModel.from_pretrained.__func__

    def unloaded_conv_in(cls, *args, **kwargs):
        model, info = from_pretrained(cls, *args, **kwargs)
        model.conv_in.bias = torch.nn.Parameter(torch.empty_like(model.conv_in.bias, device="meta"))
        return model, info

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(unloaded_conv_in))
    with pytest.raises(WeightsError) as caught:
        load_pipeline(tiny_checkpoint, CPU, torch.float32)
    assert f"unet/config.json does not match {UNET}" in str(caught.value)
    assert "1 weight(s) were never loaded, left on the meta device (e.g. conv_in.bias)" in str(caught.value)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def test_loading_builds_each_model_once_from_its_file(tiny_checkpoint, monkeypatch):
    """With accelerate, diffusers builds each model on the meta device and fills it from the file; without
    it, it warns and first builds every module in memory. Nothing at load time may warn."""
    assert is_accelerate_available(), "accelerate is pinned in requirements.txt; reinstall from it"
    built_empty: list[bool] = []
    empty = accelerate.init_empty_weights
    monkeypatch.setattr(accelerate, "init_empty_weights", lambda: built_empty.append(True) or empty())
    records = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        pipe = load_pipeline(tiny_checkpoint, CPU, torch.float32)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    assert records.messages == []
    assert len(built_empty) == 2  # the UNet and the VAE; transformers 5 always loads so
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        module = getattr(pipe, name)
        assert not any(t.is_meta for t in (*module.parameters(), *module.buffers())), name


def test_truncated_tiny_decoder_is_named_and_an_absent_one_is_allowed(tiny_checkpoint, tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, root)
    truncate(root, "taesd/diffusion_pytorch_model.safetensors")
    with pytest.raises(
        WeightsError, match="taesd/diffusion_pytorch_model.safetensors .* truncated or corrupt"
    ):
        load_taesd(root, CPU, torch.float32)
    shutil.rmtree(root / "taesd")
    assert load_taesd(root, CPU, torch.float32) is None


SERVED_BREAKAGES = ["truncated-unet", "unet-config-mismatch", "missing-vae"]


@pytest.fixture(scope="module")
def broken_servers(tiny_checkpoint, openapi_schema, tmp_path_factory):
    """One server per breakage, started together so their setups overlap."""
    where = tmp_path_factory.mktemp("broken")
    servers = {
        name: CogServer(broken_copy(tiny_checkpoint, where, name), openapi_schema)
        for name in SERVED_BREAKAGES
    }
    try:
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()


@pytest.mark.parametrize("breakage", SERVED_BREAKAGES)
def test_broken_weights_fail_setup_naming_the_file(broken_servers, breakage):
    server = broken_servers[breakage]
    health = server.wait_until({"SETUP_FAILED", "READY"})
    assert health["status"] == "SETUP_FAILED"
    for words in BREAKAGES[breakage][1]:
        assert words in health["setup"]["logs"]
    assert server.predict(prompt="x")[0] == 503


# --- scripts/verify-weights -----------------------------------------------------------------------------


def verify(root: Path) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "verify-weights"
    return subprocess.run([sys.executable, str(script), "--dir", str(root)], capture_output=True, text=True)


def test_verify_weights_passes_intact_files_and_names_a_corrupt_one(tiny_checkpoint, tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, root)
    missing = verify(root)
    assert missing.returncode == 1 and "no manifest.json" in missing.stderr

    write_manifest(root, "test")
    intact = verify(root)
    assert intact.returncode == 0, intact.stderr
    assert str(root) in intact.stdout and "match manifest.json" in intact.stdout

    data = bytearray((root / UNET).read_bytes())
    data[-1] ^= 0xFF  # same size, so only the hash can tell
    (root / UNET).write_bytes(bytes(data))
    corrupt = verify(root)
    assert corrupt.returncode == 1
    assert f"{UNET}: sha256 differs from manifest.json" in corrupt.stderr
    assert "download-weights" in corrupt.stderr
