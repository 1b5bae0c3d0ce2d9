"""What a benchmark asked for and what each method's runs gave: the types harness fills and report reads."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from bench.memory import Usage
from lcm.params import DEFAULT_PROMPT

OTHER = "other"  # the stage row for end to end minus the measured stages
SEED = 1234


@dataclass(frozen=True)
class Settings:
    """What both methods are asked to do."""

    device: torch.device
    size: int
    steps: int
    batch: int
    weights: Path
    runs: int
    warmup: int
    prompt: str = DEFAULT_PROMPT
    seed: int = SEED
    fast_decode: bool = False  # ours decodes with TAESD; the reference keeps its full VAE
    mode: str = "txt2img"  # or "inpaint": an input image and mask (MODES)
    freeu: bool = False  # both methods
    reference_dtype: str = "float32"  # a key of lcm.loading.DTYPES; ours keeps the engine's choice

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i in both methods, each from its own CPU generator."""
        return [self.seed + i for i in range(self.batch)]


@dataclass
class Output:
    """What one run produced; images are arrays or PIL images, converted only after the clock stops."""

    images: Sequence[Any]
    flagged: list[bool]
    stages: dict[str, float]
    steps: list[float]
    controlnet: list[float] = field(default_factory=list)  # each ControlNet forward pass, in step order


@dataclass
class Run:
    seconds: float
    output: Output
    usage: Usage


@dataclass
class Result:
    """One method's numbers: timed runs for end to end, profiled runs for stages and steps."""

    name: str
    safety_checker: str
    dtype: str
    speed: str
    setup_seconds: float
    setup_usage: Usage
    setup_served: Usage  # setup's span before release(): what a server holds once set up
    timed: list[Run]
    profiled: list[Run]

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.timed)

    @property
    def fastest(self) -> float:
        return min(r.seconds for r in self.timed)

    @property
    def slowest(self) -> float:
        return max(r.seconds for r in self.timed)

    @property
    def flagged(self) -> str:
        """Images the safety checker flagged in the last timed run, or a dash when it did not run."""
        output = self.timed[-1].output
        return f"{sum(output.flagged)}/{len(output.images)}" if output.flagged else "–"

    def run_max(self, attr: str) -> Optional[int]:
        """The largest value of a Usage attribute (host_peak, gpu_held, ...) over every run."""
        values = [getattr(r.usage, attr) for r in self.timed + self.profiled]
        return None if None in values else max(values)

    def stage_medians(self) -> dict[str, float]:
        """Median per stage over the profiled runs, plus "other": end to end minus the stages."""
        names = list(dict.fromkeys(name for r in self.profiled for name in r.output.stages))
        medians = {n: statistics.median(r.output.stages.get(n, 0.0) for r in self.profiled) for n in names}
        if names:
            medians[OTHER] = statistics.median(
                r.seconds - sum(r.output.stages.values()) for r in self.profiled
            )
        return medians

    def step_medians(self) -> list[float]:
        """Median per step index, when every profiled run recorded the same number of steps."""
        counts = {len(r.output.steps) for r in self.profiled}
        if len(counts) != 1 or not counts.pop():
            return []
        return [
            statistics.median(steps) for steps in zip(*(r.output.steps for r in self.profiled), strict=True)
        ]

    def controlnet_median(self) -> Optional[float]:
        """Median seconds of one ControlNet forward pass over the profiled runs; None without one."""
        passes = [seconds for r in self.profiled for seconds in r.output.controlnet]
        return statistics.median(passes) if passes else None

    def pixels(self) -> np.ndarray:
        """The last timed run's images as one (N, H, W, 3) uint8 array."""
        return np.stack([np.asarray(image) for image in self.timed[-1].output.images])

    def max_difference(self, other: "Result") -> int:
        """Largest per-channel difference between the two methods' last images, in 1/255 units."""
        return int(np.abs(self.pixels().astype(np.int16) - other.pixels().astype(np.int16)).max())
