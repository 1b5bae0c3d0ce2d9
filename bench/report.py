"""The benchmark's table, the machine it ran on, and the section appended to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import diffusers
import numpy
import PIL
import torch
import transformers

from bench.memory import GIB
from bench.results import OTHER, Result, Settings
from lcm.generation import FREEU
from lcm.loading import native_bf16

ROOT = Path(__file__).resolve().parent.parent
# Instruction-set extensions that decide which CPU optimisations can pay off (bf16 and AMX above all).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpu() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + " ".join(CPU_FLAGS)
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, ISA: {isa}"


def device_name(device: torch.device) -> str:
    """The GPU's name and memory, or the CPU's model, cores, the extensions that matter here and
    whether it computes bf16 in hardware, which decides ours' CPU dtype (lcm.loading.default_dtype)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GIB:.0f} GiB, CUDA {torch.version.cuda}); host: {_cpu()}"
    return f"{_cpu()}; bf16: {native_bf16() or 'none (no AMX or AVX512-BF16)'}"


def versions() -> str:
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, numpy {numpy.__version__}, Pillow {PIL.__version__}"
    )


def commit() -> str:
    """The checkout the numbers belong to; -dirty when it has uncommitted changes."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def describe(settings: Settings) -> list[str]:
    """What was run, where, on which versions."""
    s = settings
    return [
        f"device: {s.device} — {device_name(s.device)}",
        f"versions: {versions()}; commit {commit()}",
        f"request: {s.mode}, {s.size}x{s.size}, {s.steps} steps, batch {s.batch}, guidance 8.0, "
        f"seed {s.seed}, prompt {s.prompt!r}",
        f"runs: {s.warmup} warm-up + {s.runs} timed rounds (one run of each method per round); "
        f"weights {s.weights}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        load_average(),
    ]


def load_average() -> str:
    """The machine's load as a run ends: on a shared CPU, what its seconds should be read against."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores "
        "(other processes make CPU timings noisy)"
    )


def _seconds(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def _gib(value: Optional[int]) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def _ratio(reference: Optional[float], ours: Optional[float]) -> str:
    return f"{reference / ours:.2f}" if reference and ours else ""


def _stage_order(ours: list[str], reference: list[str]) -> list[str]:
    """Ours' stages in order; each stage only the reference has goes right after its predecessor there.

    "other" (end to end minus the stages) comes last.
    """
    order = [name for name in ours if name != OTHER]
    for i, name in enumerate(reference):
        if name not in order and name != OTHER:
            before = reference[i - 1] if i else None
            order.insert(order.index(before) + 1 if before in order else len(order), name)
    return [*order, OTHER] if OTHER in ours or OTHER in reference else order


def table(settings: Settings, ours: Result, reference: Result) -> str:
    """One Markdown table, methods as columns, then the notes that qualify it."""
    pairs = [r.seconds / o.seconds for o, r in zip(ours.timed, reference.timed, strict=True)]
    freeu = f"on ({', '.join(f'{k} {v}' for k, v in FREEU.items())})" if settings.freeu else "off"
    rows: list[tuple[str, str, str, str]] = [
        ("safety checker", ours.safety_checker, reference.safety_checker, ""),
        ("decoder", "TAESD (fast_decode)" if settings.fast_decode else "VAE", "VAE", ""),
        ("FreeU", freeu, freeu, ""),
        ("dtype", ours.dtype, reference.dtype, ""),
        ("speed settings", ours.speed, reference.speed, ""),
        (
            "setup s (load; weights in page cache)",
            _seconds(ours.setup_seconds),
            _seconds(reference.setup_seconds),
            _ratio(reference.setup_seconds, ours.setup_seconds),
        ),
        (
            "**end to end s, median**",
            f"**{ours.median:.3f}**",
            f"**{reference.median:.3f}**",
            f"**{reference.median / ours.median:.2f}**",
        ),
        (
            "end to end s, min – max",
            f"{ours.fastest:.3f} – {ours.slowest:.3f}",
            f"{reference.fastest:.3f} – {reference.slowest:.3f}",
            f"{min(pairs):.2f} – {max(pairs):.2f} per round",
        ),
        (
            "images per s",
            f"{settings.batch / ours.median:.3f}",
            f"{settings.batch / reference.median:.3f}",
            "",
        ),
    ]
    ours_stages, reference_stages = ours.stage_medians(), reference.stage_medians()
    ours_steps, reference_steps = ours.step_medians(), reference.step_medians()
    for name in _stage_order(list(ours_stages), list(reference_stages)):
        o, r = ours_stages.get(name), reference_stages.get(name)
        rows.append((f"stage {name} s, median", _seconds(o), _seconds(r), _ratio(r, o)))
        if name == "unet":
            for i in range(max(len(ours_steps), len(reference_steps))):
                o = ours_steps[i] if i < len(ours_steps) else None
                r = reference_steps[i] if i < len(reference_steps) else None
                rows.append((f"  step {i + 1} s, median", _seconds(o), _seconds(r), _ratio(r, o)))
            if settings.mode == "controlnet":
                o, r = ours.controlnet_median(), reference.controlnet_median()
                rows.append(
                    ("  of a step: ControlNet forward s, median", _seconds(o), _seconds(r), _ratio(r, o))
                )
    places = [("host", "host RSS")] + ([("gpu", "GPU allocated")] if settings.device.type == "cuda" else [])
    for key, label in places:
        o_held, r_held = (
            getattr(ours.setup_usage, f"{key}_held"),
            getattr(reference.setup_usage, f"{key}_held"),
        )
        o_load, r_load = (
            getattr(ours.setup_usage, f"{key}_peak"),
            getattr(reference.setup_usage, f"{key}_peak"),
        )
        o_run, r_run = ours.run_max(f"{key}_peak"), reference.run_max(f"{key}_peak")
        o_kept, r_kept = ours.run_max(f"{key}_held"), reference.run_max(f"{key}_held")
        rows.append((f"{label} GiB held after setup", _gib(o_held), _gib(r_held), ""))
        if key == "host":  # release() leaves the GPU's allocated bytes as they are: the same row twice
            o_served, r_served = ours.setup_served.host_held, reference.setup_served.host_held
            rows.append(
                (
                    f"{label} GiB held after setup as served (before that trim)",
                    _gib(o_served),
                    _gib(r_served),
                    "",
                )
            )
        rows += [
            (f"{label} GiB peak during setup, above its start", _gib(o_load), _gib(r_load), ""),
            (f"{label} GiB peak during a run, above its start", _gib(o_run), _gib(r_run), ""),
            (f"{label} GiB still held after a run, above its start", _gib(o_kept), _gib(r_kept), ""),
        ]
    difference = f"{ours.max_difference(reference)}/255"
    if settings.fast_decode:  # TAESD against the reference's full VAE
        difference = "not compared: the decoders differ"
    rows += [
        ("images flagged by the checker (last run)", ours.flagged, reference.flagged, ""),
        ("max pixel difference, ours vs reference", difference, "", ""),
    ]
    header = ["", ours.name, reference.name, "reference / ours"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + [""] + notes(settings, ours, reference))


def notes(settings: Settings, ours: Result, reference: Result) -> list[str]:
    """What a reader needs to read the table right: where stages come from, and any unlike comparison."""
    if settings.device.type == "cuda":
        source = (
            f"a separate pass of {settings.runs} runs per method that synchronises the device at every "
            "stage and step boundary (slightly slower than the timed runs)"
        )
    else:
        source = "the timed runs themselves (on the CPU, recording a boundary is a clock read)"
    lines = [
        f"Stages and steps are medians over {source}; 'other' is end to end minus the stages. "
        "Ours' unet stage and steps include the scheduler step; so do the reference's (UNet forward "
        "+ scheduler.step per step). The reference's safety stage includes its own PIL conversion for "
        "the feature extractor; its postprocess stage is the final tensor to PIL conversion.",
    ]
    if ours.dtype != reference.dtype:
        lines.append(
            f"Ours ran in {ours.dtype} and the reference in {reference.dtype}: the max pixel difference "
            "includes the two dtypes' rounding, and the speedup their difference in speed."
        )
    if settings.mode == "controlnet":
        lines.append(
            "In the controlnet mode, both unet stages and steps include the ControlNet's forward pass; the "
            "reference is diffusers' StableDiffusionControlNetPipeline on the same components with the "
            "LCM scheduler, given the same edge map."
        )
    if reference.safety_checker.startswith("on") and not ours.safety_checker.startswith("on"):
        checker = reference.stage_medians().get("safety")
        lines.append(
            f"**NOTE: ours ran NO safety checker; the reference ran diffusers' default checker"
            f"{f' ({checker:.3f} s median)' if checker is not None else ''}. "
            "The speedup below compares ours against the reference default, checker included.**"
        )
    return lines


def append(
    path: Path, settings: Settings, command: str, table_text: str, speedup: str, described: bool = True
) -> None:
    """Add one dated section to the results log, newest last (`described`: with describe()'s lines,
    which the serving benchmark's text holds itself)."""
    s = settings
    bullets = [f"- {line}" for line in describe(settings)] if described else []
    bullets.append(f"- command: `{command}`")
    title = f"{s.device.type}, {s.size}x{s.size}, {s.steps} steps, batch {s.batch}"
    append_section(path, title, [*bullets, "", table_text, "", f"`{speedup}`", ""])


def append_section(path: Path, title: str, lines: list[str]) -> None:
    """Add `## <UTC date and time> — title` and its lines to the results log, newest last."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([f"## {now} — {title}", "", *lines])
    existing = path.read_text().rstrip("\n") + "\n\n" if path.exists() else ""
    path.write_text(existing + section)
