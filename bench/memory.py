"""Memory per method while both share one process: what each holds, and each span's peak above its start.

The host's peak comes from VmHWM, which /proc/self/clear_refs resets to the current RSS (Linux >= 4.0);
the GPU's from the caching allocator's peak statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lcm import allocator

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
GIB = 2**30


def _status_bytes(key: str) -> Optional[int]:
    """One VmRSS/VmHWM line of /proc/self/status in bytes, or None where there is no procfs."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_host_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release(device: torch.device) -> None:
    """Give freed memory back, so the next load starts from a tidy process.

    glibc keeps freed heap pages unless asked (malloc_trim), all the more when ours holds them
    (LCM_HOLD_MEMORY).
    """
    allocator.give_back()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Usage:
    """Bytes over one span: the change in what is held, and the peak above the span's start.

    None where this machine cannot tell (no procfs, no GPU).
    """

    host_held: Optional[int] = None
    host_peak: Optional[int] = None
    gpu_held: Optional[int] = None
    gpu_peak: Optional[int] = None


class MemoryWatch:
    """One span: start(), the work, stop() -> Usage. Nothing here frees memory, so runs stay as served."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        self._peak_known = _reset_host_peak()
        self._host = _status_bytes("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._gpu = torch.cuda.memory_allocated(self.device)

    def stop(self) -> Usage:
        host, peak = _status_bytes("VmRSS"), _status_bytes("VmHWM") if self._peak_known else None
        gpu = gpu_peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gpu = torch.cuda.memory_allocated(self.device) - self._gpu
            gpu_peak = torch.cuda.max_memory_allocated(self.device) - self._gpu
        return Usage(_minus(host, self._host), _minus(peak, self._host), gpu, gpu_peak)


def _minus(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else a - b
