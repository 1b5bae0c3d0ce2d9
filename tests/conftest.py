"""Session fixtures: a tiny synthetic checkpoint, an engine on it, and the real Cog server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cogserver import ROOT, CogServer

os.environ["HF_HUB_OFFLINE"] = "1"


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
    srv = CogServer(tiny_checkpoint, openapi_schema)
    try:
        srv.wait_until({"READY"})
        yield srv
    finally:
        srv.stop()
