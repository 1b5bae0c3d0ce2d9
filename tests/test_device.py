"""LCM_DEVICE, or a device argument: cpu, cuda or cuda:N for a GPU this machine has; else refused."""

from __future__ import annotations

import pytest
import torch

from lcm.errors import LCMError
from lcm.loading import pick_device


def gpus(monkeypatch, count: int) -> None:
    """Make torch's device queries answer as on a machine with `count` CUDA GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    "value", ["gpu", "CPU", "mps", "meta", "cpu:1", "cuda:x", "cuda:-1", " cpu", "cuda", "cuda:0"]
)
def test_without_cuda_only_cpu_is_allowed(monkeypatch, value):
    gpus(monkeypatch, 0)
    monkeypatch.setenv("LCM_DEVICE", value)
    with pytest.raises(LCMError) as refused:
        pick_device()
    assert str(refused.value) == f"LCM_DEVICE={value!r} is not allowed: use cpu (CUDA is not available here)"


@pytest.mark.parametrize(
    "count,value,allowed",
    [
        (1, "cuda:7", "cpu, cuda or cuda:0"),
        (1, "cuda:1", "cpu, cuda or cuda:0"),
        (2, "cuda:2", "cpu, cuda or cuda:0 to cuda:1"),
        (2, "gpu", "cpu, cuda or cuda:0 to cuda:1"),
        (2, "mps", "cpu, cuda or cuda:0 to cuda:1"),
    ],
)
def test_a_gpu_this_machine_lacks_is_refused_naming_those_it_has(monkeypatch, count, value, allowed):
    gpus(monkeypatch, count)
    monkeypatch.setenv("LCM_DEVICE", value)
    with pytest.raises(LCMError) as refused:
        pick_device()
    assert str(refused.value) == f"LCM_DEVICE={value!r} is not allowed: use {allowed}"


def test_an_argument_is_named_as_the_argument_and_wins_over_the_variable(monkeypatch):
    gpus(monkeypatch, 0)
    monkeypatch.setenv("LCM_DEVICE", "cpu")
    with pytest.raises(LCMError, match=r"^device='cuda:7' is not allowed: use cpu \(CUDA is not available"):
        pick_device("cuda:7")
    monkeypatch.setenv("LCM_DEVICE", "gpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "count,value,expected",
    [
        (0, None, "cpu"),
        (0, "cpu", "cpu"),
        (1, None, "cuda"),
        (1, "cuda:0", "cuda:0"),
        (2, "cuda:1", "cuda:1"),
    ],
)
def test_allowed_values_and_the_default(monkeypatch, count, value, expected):
    gpus(monkeypatch, count)
    if value is None:
        monkeypatch.delenv("LCM_DEVICE", raising=False)
    else:
        monkeypatch.setenv("LCM_DEVICE", value)
    assert pick_device() == torch.device(expected)
