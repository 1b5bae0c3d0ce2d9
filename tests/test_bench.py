"""The benchmark harness runs end to end (tiny checkpoint) and ends with its speedup line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from cogserver import ROOT


def _bench(weights, *extra: str) -> str:
    """`python -m bench` on the CPU at 256 px, 2 steps, one run and no warm-up: its standard output."""
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--size", "256", "--steps", "2"]
    command += ["--runs", "1", "--warmup", "0", "--weights", str(weights), *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout


def test_bench_runs_and_ends_with_the_speedup_line(tiny_checkpoint, tmp_path):
    results = tmp_path / "RESULTS.md"
    out = _bench(tiny_checkpoint, "--record", str(results))
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_reference=\d+\.\d+", last), last
    assert "| decoder | VAE | VAE |" in out
    # Same weights, seeds and decoder in both methods, fp32 on CPU: the images agree within 1/255.
    difference = re.search(r"max pixel difference, ours vs reference\W+(\d+)/255", out)
    assert difference is not None and int(difference.group(1)) <= 1, out
    # Giving freed memory back can only lower what a load holds: as served is at least that.
    held, served = (
        [float(cell) for cell in re.search(rf"\| {re.escape(row)} \| ([\d.]+) \| ([\d.]+) \|", out).groups()]
        for row in (
            "host RSS GiB held after setup",
            "host RSS GiB held after setup as served (before that trim)",
        )
    )
    assert all(s >= h - 0.01 for h, s in zip(held, served, strict=True)), (held, served)
    recorded = results.read_text()
    assert "python -m bench" in recorded and last in recorded


def test_bench_loads_the_reference_in_the_reference_dtype(tiny_checkpoint, tmp_path):
    """Ours keeps the suite's float32 (LCM_DTYPE); the reference runs in the dtype asked for."""
    results = tmp_path / "RESULTS.md"
    out = _bench(tiny_checkpoint, "--reference-dtype", "bfloat16", "--record", str(results))
    assert "| dtype | float32 | bfloat16 |" in out, out
    assert re.search(r"max pixel difference, ours vs reference \| \d+/255", out), out
    assert re.search(r"^device: cpu — .*; bf16: (AMX|AVX512-BF16|none \(no AMX or AVX512-BF16\))$", out, re.M)
    assert "--reference-dtype bfloat16" in results.read_text()


def test_bench_refuses_float16_for_the_reference_on_cpu(tiny_checkpoint):
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--weights", str(tiny_checkpoint)]
    done = subprocess.run(
        [*command, "--reference-dtype", "float16"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--reference-dtype 'float16' is not allowed on cpu: use float32 or bfloat16" in done.stderr


def test_cpu_routes_times_each_route_against_the_eager_ones(tiny_checkpoint, tmp_path):
    """OpenVINO is installed by make: a missing one fails here rather than reading "not installed"."""
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench.cpu_routes", str(tiny_checkpoint), "--size", "64", "--runs", "1"]
    command += ["--routes", "torch-fp32,torch-fp32-folded,torch-bf16,openvino-bf16", "--record", str(results)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    models = ("| UNet step |", "| VAE decode |")
    cells = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith(models)]
    rows = {(model, route): rest for model, route, *rest in cells}  # setup, ms, speedup, differences
    assert sorted(rows) == [
        (model, route)
        for model in ("UNet step", "VAE decode")
        for route in ("openvino-bf16", "torch-bf16", "torch-fp32", "torch-fp32-folded")
    ], out
    for (model, route), (setup, *figures) in rows.items():
        assert [float(f) for f in figures] and float(figures[0]) > 0, (model, route, out)
        assert setup.startswith("convert ") if route.startswith("openvino") else setup == "–", out
    for model in ("UNet step", "VAE decode"):
        assert rows[model, "torch-fp32"][2:4] == ["1.00", "0"] and rows[model, "torch-bf16"][-1] == "0", out
        assert float(rows[model, "torch-fp32-folded"][3]) < 1e-4, out  # folding is exact but for rounding
    assert re.search(r"^device: cpu — .*; bf16: ", out, re.M) and "openvino 20" in out
    assert "python -m bench.cpu_routes" in results.read_text()


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


def test_serving_mode_drives_the_real_server_and_ends_with_its_speedup_line(tiny_checkpoint):
    """K clients against one at a time on one server; with a batch budget, the queue forms batches."""
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--size", "256", "--steps", "2"]
    command += ["--weights", str(tiny_checkpoint), "--clients", "3", "--requests", "6"]
    env = {**os.environ, "LCM_BATCH_PIXELS": str(3 * 256 * 256)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.fullmatch(r"serving_speedup_vs_one_client=\d+\.\d+", out.strip().splitlines()[-1]), out
    rows = dict(re.findall(r"^\| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| (.*) \|$", out, re.M))
    assert rows["1"] == "1: 6", out  # one client: every request alone
    formed = dict(pair.split(": ") for pair in rows["3"].split(", "))
    assert sum(map(int, formed.values())) == 6 and any(int(size) > 1 for size in formed), out


def test_bench_times_inpainting_against_diffusers_inpainting_pipeline(tiny_checkpoint):
    out = _bench(tiny_checkpoint, "--mode", "inpaint")
    assert "request: inpaint, 256x256" in out
    # At strength 1 both take the same timesteps: predict() equals StableDiffusionInpaintPipeline.
    difference = re.search(r"max pixel difference, ours vs reference\W+(\d+)/255", out)
    assert difference is not None and int(difference.group(1)) <= 1, out
    assert re.fullmatch(r"speedup_vs_reference=\d+\.\d+", out.strip().splitlines()[-1])


def test_bench_times_the_controlnet_against_diffusers_controlnet_pipeline(tiny_checkpoint):
    out = _bench(tiny_checkpoint, "--mode", "controlnet")
    assert "request: controlnet, 256x256" in out
    assert re.search(r"of a step: ControlNet forward s, median \| \d+\.\d+ \| \d+\.\d+", out), out
    # The same edge map, seeds and LCM scheduler: predict() equals StableDiffusionControlNetPipeline.
    difference = re.search(r"max pixel difference, ours vs reference\W+(\d+)/255", out)
    assert difference is not None and int(difference.group(1)) <= 1, out
    assert re.fullmatch(r"speedup_vs_reference=\d+\.\d+", out.strip().splitlines()[-1])


def test_train_speed_times_the_steps_after_its_warmup(tiny_checkpoint):
    command = [sys.executable, "-m", "bench.train_speed", str(tiny_checkpoint), "--device", "cpu"]
    command += ["--resolution", "64", "--steps", "6", "--warmup", "2", "--rank", "4", "--images", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"steps=6 warmup=2 .* steps_per_s=\d+\.\d+ lora_bytes=\d+$", done.stdout), done.stdout


def test_lcf_evidence_reports_each_prompt_before_and_after_training(tiny_checkpoint, tmp_path):
    """The script for the real model, run for 3 steps on the tiny one (whose figures mean nothing)."""
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench.lcf_evidence", str(tiny_checkpoint), "--device", "cpu"]
    command += [
        "--resolution",
        "64",
        "--side",
        "256",
        "--steps",
        "3",
        "--other",
        "a dog",
        "--record",
        str(results),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| a ")]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| a photo of a cat", "trained caption"],
        ["| a dog", "other"],
    ]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"trained_ratio=\d+\.\d+ other_ratio=\d+\.\d+", last), last
    assert last in results.read_text() and "python -m bench.lcf_evidence" in results.read_text()


def test_lora_switch_times_switches_against_the_requests_they_serve(tiny_checkpoint, tmp_path):
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench.lora_switch", "--weights", str(tiny_checkpoint), "--size", "256"]
    command += ["--steps", "1", "--rank", "4", "--runs", "2", "--record", str(results)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")
    }
    assert {"2 alternating: each switches", "2 repeating the last: none switches"} <= set(rows), done.stdout
    staying = rows["2 repeating the last: none switches"].split(" | ")
    assert float(staying[1]) < float(
        rows["2 alternating: each switches"].split(" | ")[1]
    )  # no switch: no work
    assert re.search(r"^`lora_switch_share_of_request=0\.\d+`$", done.stdout, re.M)
    assert "then cached" in done.stdout and "python -m bench.lora_switch" in results.read_text()


def test_bench_declares_the_size_it_times_where_setup_converts_for_sizes(tiny_checkpoint):
    """With OpenVINO as the runtime and LCM_COMPILE_SIZES unset, ours is set up for the benchmarked
    size rather than the 768x768 default, whose other sizes would run the torch UNet."""
    env = {k: v for k, v in os.environ.items() if k != "LCM_COMPILE_SIZES"}
    command = [sys.executable, "-m", "bench", "--device", "cpu", "--size", "256", "--steps", "2"]
    command += ["--runs", "1", "--warmup", "0", "--weights", str(tiny_checkpoint)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "LCM_RUNTIME": "openvino"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "runtime=openvino compile_sizes=256x256x1" in done.stdout, done.stdout
    assert "LCM_COMPILE_SIZES unset: ours declares the size benchmarked, 256x256x1" in done.stderr
    assert "graphs=compiled" in done.stderr, done.stderr[-3000:]
