"""`python -m bench`: the project's predict() path against diffusers' reference pipeline.

Both run in one process on the same weights and inputs, so the ratio between them means
something even on a noisy machine; absolute seconds are only a note. See bench/README.md.
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = BENCH_DIR / "checkpoints" / "full"  # git-ignored; built on first use
RESULTS = BENCH_DIR / "RESULTS.md"
