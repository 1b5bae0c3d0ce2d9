"""Session fixtures: a tiny synthetic checkpoint, an engine on it, and the real Cog server."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cogserver import ROOT, CogServer

os.environ["HF_HUB_OFFLINE"] = "1"
# The suite's engines and servers run in float32 on every CPU, so that their fp32 comparisons with
# diffusers hold whether or not this CPU computes bf16 in hardware; the bf16 tests ask for it
# , and the dtype choice is tested with the variable unset (test_dtype.py).
os.environ.setdefault("LCM_DTYPE", "float32")
# Likewise torch runs the UNet and VAE unless a test asks for OpenVINO (test_openvino.py), whose
# default on a CPU running bf16 is tested there with the variable unset.
os.environ.setdefault("LCM_RUNTIME", "torch")
# Requests' LoRAs (lora_weights) are cached in a scratch directory, not the checkout's .cache, and the
# tests serve them from 127.0.0.1, which only LCM_ALLOW_PRIVATE_URLS=1 lets a request name.
os.environ.setdefault("LCM_LORA_CACHE", tempfile.mkdtemp(prefix="lcm-test-loras-"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcm.synthetic import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("weights") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: Path):
    from lcm.engine import Engine

    return Engine.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def openapi_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schema `cog build` would write, generated from predict.py."""
    out = tmp_path_factory.mktemp("schema") / "openapi_schema.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "openapi-schema"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, openapi_schema: Path):
    # lora_weights' tests serve their LoRAs from 127.0.0.1, which only this lets a request name.
    srv = CogServer(tiny_checkpoint, openapi_schema, env={"LCM_ALLOW_PRIVATE_URLS": "1"})
    try:
        srv.wait_until({"READY"})
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def lora_weights(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training's output archive: two steps on two flat images at 64 px, enough to move pixels."""
    import io
    import zipfile

    from PIL import Image

    from lcm.training import TrainingConfig, train_lora

    folder = tmp_path_factory.mktemp("lora")
    with zipfile.ZipFile(folder / "set.zip", "w") as zf:
        for i, colour in enumerate([(230, 30, 30), (30, 30, 230)]):
            out = io.BytesIO()
            Image.new("RGB", (64, 64), colour).save(out, format="PNG")
            zf.writestr(f"{i}.png", out.getvalue())
    config = TrainingConfig.build(
        any_resolution=True, caption="a photo", resolution=64, max_train_steps=2, learning_rate=1e-2, seed=0
    )
    return train_lora(folder / "set.zip", folder / "out", config, tiny_checkpoint, "cpu").archive


@pytest.fixture(scope="session")
def lora_server(tiny_checkpoint: Path, openapi_schema: Path, lora_weights: Path):
    """Cog's server set up with trained weights (COG_WEIGHTS), as a fine-tuned version runs."""
    srv = CogServer(tiny_checkpoint, openapi_schema, env={"COG_WEIGHTS": str(lora_weights)})
    try:
        srv.wait_until({"READY"})
        yield srv
    finally:
        srv.stop()
