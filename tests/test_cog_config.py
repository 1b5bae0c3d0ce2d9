"""cog.yaml and requirements.txt are what `cog build` (0.23.1) accepts, checked without Docker.

The schema in tests/data is cog's own cog.yaml schema (draft-07); the extra rules are the ones
cog's Go code adds on top (replicate/cog pkg/config/validate.go and env.go).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cogserver import cog_schema_module

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# Names cog build refuses in `environment:` (pkg/config/env.go); a trailing * is a prefix.
RESERVED_ENV = (
    "PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV PYTHONUNBUFFERED R8_* REPLICATE_* LIBRARY_PATH CUDA_* "
    "NVIDIA_* NV_* PGET_* HF_ENDPOINT HF_HUB_ENABLE_HF_TRANSFER KUBERNETES_*"
).split()
# Installed by cog build itself; pinning them here would fight its own install.
COG_INSTALLED = {"cog", "coglet"}
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)")


def _config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def _requirement_lines(name: str = "requirements.txt") -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pins(name: str = "requirements.txt") -> dict[str, str]:
    return {
        match["name"].lower().replace("_", "-"): match["version"]
        for match in map(PIN.fullmatch, _requirement_lines(name))
    }


def _problems(config: dict[str, Any], root: Path) -> list[str]:
    """Every reason cog build would refuse this cog.yaml, as messages."""
    schema = json.loads((DATA / "cog_config_schema_v1.0.json").read_text())
    problems = [error.message for error in jsonschema.Draft7Validator(schema).iter_errors(config)]
    build = config.get("build") or {}
    has_packages = bool(build.get("python_packages"))
    requirements = build.get("python_requirements")
    if has_packages == bool(requirements):
        problems.append("exactly one of build.python_packages and build.python_requirements must be set")
    if requirements and not (root / requirements).is_file():
        problems.append(f"build.python_requirements {requirements} does not exist")
    major, _, minor = str(build.get("python_version", "")).partition(".")
    minor = minor.split(".")[0]
    if not (major.isdigit() and minor.isdigit()) or (int(major), int(minor)) < (3, 10):
        problems.append(f"build.python_version {build.get('python_version')!r} is not 3.10 or newer")
    for key in ("run", "predict"):
        if key in config and len(str(config[key]).split(".py:")) != 2:
            problems.append(f"{key} {config[key]!r} is not of the form file.py:Class")
    if "run" not in config and "predict" not in config:
        problems.append("neither run nor predict is set")
    for entry in config.get("environment") or []:
        name = str(entry).split("=", 1)[0]
        if any(
            name == pattern or pattern.endswith("*") and name.startswith(pattern[:-1])
            for pattern in RESERVED_ENV
        ):
            problems.append(f"environment variable {name} is reserved by cog")
    return problems


def test_cog_yaml_is_accepted_by_cog_build() -> None:
    assert _problems(_config(), ROOT) == []


def test_cog_yaml_builds_a_gpu_image_from_requirements() -> None:
    config = _config()
    assert config["build"]["gpu"] is True
    assert config["build"]["python_version"] == "3.11"
    assert config["build"]["python_requirements"] == "requirements.txt"
    assert "image" not in config


def test_schema_generator_defaults_to_the_predictor_cog_yaml_names() -> None:
    assert _config()["predict"] == cog_schema_module().DEFAULT_PREDICTOR


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"build": {"python_version": "3.9", "python_requirements": "requirements.txt"}}, "3.10 or newer"),
        ({"build": {"python_version": "3.11"}}, "exactly one of"),
        ({"build": {"python_version": "3.11", "python_requirements": "missing.txt"}}, "does not exist"),
        ({"predict": "predict:Predictor"}, "file.py:Class"),
        ({"environment": ["CUDA_HOME=/x"]}, "reserved"),
        ({"environment": ["LIBRARY_PATH=/x"]}, "reserved"),
        ({"unknown_key": 1}, "Additional properties"),
        ({"run": "run.py:Runner"}, "should not be valid"),
    ],
)
def test_rule_checks_catch_what_cog_build_rejects(change: dict[str, Any], expected: str) -> None:
    config = {**_config(), **change}
    assert any(expected in problem for problem in _problems(config, ROOT)), _problems(config, ROOT)


def test_every_requirement_is_pinned_exactly() -> None:
    unpinned = [line for line in _requirement_lines() if not PIN.fullmatch(line)]
    assert unpinned == [], "pin every requirement with ==, as cog builds are otherwise not reproducible"


def test_cog_installs_its_own_sdk() -> None:
    assert COG_INSTALLED.isdisjoint(_pins())


def test_image_sdk_is_the_cog_the_tests_run() -> None:
    """Without build.sdk_version cog build installs the latest SDK; requirements-dev.txt pins the tests'."""
    sdk = _config()["build"].get("sdk_version")
    assert isinstance(sdk, str), "quote build.sdk_version in cog.yaml: a bare 0.23 would be a float"
    assert sdk == _pins("requirements-dev.txt")["cog"]


def test_torch_pin_is_one_cog_knows_cuda_wheels_for() -> None:
    """cog picks CUDA from the torch pin; an unknown version fails the GPU build."""
    known = json.loads((DATA / "cog_torch_versions.json").read_text())["gpu_torch_pythons"]
    assert "torch==" + _pins()["torch"] in _requirement_lines(), "keep torch on its own `torch==X` line"
    assert _pins()["torch"] in known
    assert str(_config()["build"]["python_version"]) in known[_pins()["torch"]]


def test_cuda_pin_has_wheels_for_the_torch_pin() -> None:
    cudas = json.loads((DATA / "cog_torch_versions.json").read_text())["gpu_torch_cudas"]
    assert str(_config()["build"]["cuda"]) in cudas[_pins()["torch"]]


def test_tests_run_against_the_pinned_libraries() -> None:
    """Everything but torch (CPU build here) is the version the image installs."""
    mismatched = {
        name: (version, importlib.metadata.version(name))
        for name, version in _pins().items()
        if name != "torch" and importlib.metadata.version(name) != version
    }
    assert mismatched == {}, "pinned vs installed; reinstall from requirements.txt"
