"""`python -m bench`: the project's predict() path against diffusers' reference pipeline.

Both run in one process on the same weights and inputs, so the ratio between them means
something even on a noisy machine; absolute seconds are only a note. See bench/README.md.
"""

import argparse
import os
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = BENCH_DIR / "checkpoints" / "full"  # git-ignored; built on first use
RESULTS = BENCH_DIR / "RESULTS.md"


def passive_openmp() -> None:
    """Call before torch starts OpenMP: idle threads then sleep instead of spinning. Free on an idle
    machine; on a shared one, spinning threads starve each other and a UNet step took 3x longer
    (bench/RESULTS.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1, for the benchmarks' counts."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: at least 1")
    return value
