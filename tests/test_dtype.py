"""The dtype the models run in: chosen at load from the CPU's bf16 hardware, overridden by LCM_DTYPE or a
request (a file's recorded dtype), refused where the device cannot run it, and stated in the setup line."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcm import images
from lcm.cli import main as cli_main
from lcm.engine import Engine
from lcm.errors import LCMError
from lcm.loading import DTYPE_ENV, choose_dtype, native_bf16
from lcm.metadata import read_metadata
from lcm.outputs import DTYPE_KEY
from lcm.params import Request

CPU = torch.device("cpu")
SETUP_LINE = re.compile(r"^loaded .* on cpu \((\w+): ([^;]+);")


def request(**kw) -> Request:
    base = dict(prompt="a photo of a cat", width=256, height=256, seed=11, num_inference_steps=2)
    return Request.build(**{**base, **kw})


def setup_line(caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """The dtype and the reason the last setup line gave."""
    lines = [
        r.getMessage() for r in caplog.records if r.name == "lcm" and r.getMessage().startswith("loaded ")
    ]
    assert lines, "no setup line was logged"
    found = SETUP_LINE.match(lines[-1])
    assert found, lines[-1]
    return found.group(1), found.group(2)


def hardware(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize(
    "amx, avx512_bf16, found, dtype",
    [
        (True, True, "AMX", torch.bfloat16),
        (True, False, "AMX", torch.bfloat16),
        (False, True, "AVX512-BF16", torch.bfloat16),
        (False, False, None, torch.float32),
    ],
)
def test_without_lcm_dtype_a_cpu_runs_bf16_exactly_where_it_has_bf16_hardware(
    monkeypatch, amx, avx512_bf16, found, dtype
):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    hardware(monkeypatch, amx, avx512_bf16)
    assert native_bf16() == found
    chosen, why = choose_dtype(CPU)
    assert chosen == dtype
    assert (found in why) if found else ("no AMX or AVX512-BF16" in why)


def test_cuda_defaults_to_float16_and_may_ask_for_it(monkeypatch):
    """Only the choice: no CUDA device is needed to make it."""
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    assert choose_dtype(torch.device("cuda")) == (torch.float16, "the CUDA default")
    assert choose_dtype(torch.device("cuda"), "float32")[0] == torch.float32
    assert choose_dtype(torch.device("cuda"), "float16")[0] == torch.float16


@pytest.mark.parametrize("value, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
@pytest.mark.parametrize("native", [True, False])
def test_lcm_dtype_overrides_the_hardware_choice(monkeypatch, value, dtype, native):
    hardware(monkeypatch, False, native)
    monkeypatch.setenv(DTYPE_ENV, value)
    chosen, why = choose_dtype(CPU)
    assert chosen == dtype and f"{DTYPE_ENV}={value}" in why
    assert ("emulated" in why) == (dtype == torch.bfloat16 and not native)


def test_a_request_overrides_lcm_dtype(monkeypatch):
    monkeypatch.setenv(DTYPE_ENV, "float32")
    chosen, why = choose_dtype(CPU, "bfloat16")
    assert chosen == torch.bfloat16 and why.startswith("requested")


@pytest.mark.parametrize("value", ["float16", "fp32", "float64"])
def test_dtypes_a_cpu_cannot_run_are_refused_naming_lcm_dtype_the_value_and_the_allowed(monkeypatch, value):
    monkeypatch.setenv(DTYPE_ENV, value)
    with pytest.raises(LCMError) as info:
        choose_dtype(CPU)
    message = str(info.value)
    assert f"{DTYPE_ENV}={value!r}" in message
    assert "float32" in message and "bfloat16" in message


def test_an_engine_refuses_lcm_dtype_float16_on_cpu(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(DTYPE_ENV, "float16")
    with pytest.raises(LCMError, match=f"{DTYPE_ENV}='float16'"):
        Engine.load(tiny_checkpoint, device="cpu")


def test_generate_refuses_dtype_float16_on_cpu_naming_dtype(tiny_checkpoint, tmp_path, capsys):
    args = ["generate", "a cat", "--out", str(tmp_path), "--weights", str(tiny_checkpoint), "--device", "cpu"]
    assert cli_main([*args, "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "dtype='float16'" in err and DTYPE_ENV not in err
    assert "float32" in err and "bfloat16" in err
    assert list(tmp_path.iterdir()) == []


def test_an_engine_loaded_without_lcm_dtype_runs_the_hardware_choice_and_says_why(
    tiny_checkpoint, monkeypatch, caplog
):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="lcm"):
        engine = Engine.load(tiny_checkpoint, device="cpu")
    try:
        found = native_bf16()
        assert engine.model.dtype == (torch.bfloat16 if found else torch.float32)
        assert engine.model.pipe.unet.dtype == engine.model.dtype
        name, why = setup_line(caplog)
        assert name == ("bfloat16" if found else "float32")
        assert why == (
            f"this CPU computes bf16 in {found}" if found else "this CPU has no AMX or AVX512-BF16"
        )
    finally:
        engine.close()


@pytest.mark.parametrize("value", ["bfloat16", "float32"])
def test_the_setup_line_names_lcm_dtype_when_it_chose(tiny_checkpoint, monkeypatch, caplog, value):
    monkeypatch.setenv(DTYPE_ENV, value)
    with caplog.at_level(logging.INFO, logger="lcm"):
        engine = Engine.load(tiny_checkpoint, device="cpu")
    try:
        assert engine.model.dtype == getattr(torch, value)
        name, why = setup_line(caplog)
        assert name == value and why.startswith(f"{DTYPE_ENV}={value}")
    finally:
        engine.close()


@pytest.fixture(scope="module")
def bf16_engine(tiny_checkpoint):
    engine = Engine.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    yield engine
    engine.close()


def reproduce(file: Path, checkpoint: Path, out: Path) -> Path:
    args = ["reproduce", str(file), "--out", str(out), "--weights", str(checkpoint), "--device", "cpu"]
    assert cli_main(args) == 0
    return out / file.name


def test_a_bf16_file_reproduces_in_bf16_byte_for_byte_whatever_lcm_dtype_says(
    bf16_engine, engine, tiny_checkpoint, tmp_path, monkeypatch, caplog
):
    req = request()
    first = bf16_engine.generate_files(req, tmp_path / "first")[0]
    assert read_metadata(first)[DTYPE_KEY] == "bfloat16"
    fp32 = engine.generate(req).pixels[0]
    assert not np.array_equal(np.asarray(Image.open(first)), fp32)  # so bytes alone tell the dtype
    monkeypatch.setenv(DTYPE_ENV, "float32")
    with caplog.at_level(logging.INFO, logger="lcm"):
        again = reproduce(first, tiny_checkpoint, tmp_path / "again")
    assert setup_line(caplog) == ("bfloat16", "requested")
    assert read_metadata(again)[DTYPE_KEY] == "bfloat16"
    assert again.read_bytes() == first.read_bytes()


def test_a_file_without_a_dtype_reproduces_in_float32_byte_for_byte(
    engine, tiny_checkpoint, tmp_path, monkeypatch, caplog
):
    """Files made before the dtype was recorded ran in float32 on a CPU: LCM_DTYPE does not change that."""
    assert engine.model.dtype == torch.float32
    first = engine.generate_files(request(), tmp_path / "first")[0]
    meta = read_metadata(first)
    assert meta.pop(DTYPE_KEY) == "float32"
    old = tmp_path / "old"
    old.mkdir()
    pixels = np.asarray(Image.open(first))
    legacy = images.save_image(pixels, old / first.stem, "png", meta["output_quality"], meta)
    assert DTYPE_KEY not in read_metadata(legacy)
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    with caplog.at_level(logging.INFO, logger="lcm"):
        again = reproduce(legacy, tiny_checkpoint, tmp_path / "again")
    assert setup_line(caplog) == ("float32", "requested")
    assert np.array_equal(np.asarray(Image.open(again)), pixels)
    assert again.read_bytes() == first.read_bytes()  # the dtype it ran in, recorded again
