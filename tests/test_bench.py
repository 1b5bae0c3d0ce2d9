"""The benchmark harness runs end to end (tiny checkpoint) and ends with its speedup line."""

from __future__ import annotations

import re
import subprocess
import sys

from cogserver import ROOT


def test_bench_runs_and_ends_with_the_speedup_line(tiny_checkpoint, tmp_path):
    results = tmp_path / "RESULTS.md"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--device",
            "cpu",
            "--size",
            "256",
            "--steps",
            "2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--weights",
            str(tiny_checkpoint),
            "--record",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_reference=\d+\.\d+", last), last
    assert "| decoder | VAE | VAE |" in out
    # Same weights, seeds and decoder in both methods, fp32 on CPU: the images agree within 1/255.
    difference = re.search(r"max pixel difference, ours vs reference\W+(\d+)/255", out)
    assert difference is not None and int(difference.group(1)) <= 1, out
    recorded = results.read_text()
    assert "python -m bench" in recorded and last in recorded


def test_gpu_check_runs_its_steps_in_processes_and_refuses_unknown_ones(tiny_checkpoint, tmp_path):
    """The prepared GPU command, as far as a CPU takes it cheaply: the driver, a step, its log."""
    command = [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--device", "cpu"]
    command += ["--weights", str(tiny_checkpoint)]
    done = subprocess.run(
        [*command, "--steps", "versions"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== versions" in done.stdout and "torch " in done.stdout and "-- versions: exit 0" in done.stdout
    assert "-- versions: exit 0" in (tmp_path / "gpu_check.log").read_text()
    bad = subprocess.run([*command, "--steps", "versions,warp"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--steps warp is not allowed" in bad.stderr
