"""The GPU check: one command on a lent GPU machine that answers what only a GPU can.

    python3 -m bench.gpu_check --out "$OUT"            # everything, within --deadline seconds

Each step runs in a process of its own (a crash or hang costs that step only) and prints its
findings as it goes; the whole log goes to OUT/gpu_check.log and the benchmark sections to
OUT/RESULTS.md, to be copied into bench/RESULTS.md. Steps, in order of what they decide:

  versions           torch, CUDA, cuDNN, Triton, the GPU, native bf16, the libraries
  graph-threads      does a function compiled with mode="reduce-overhead" (CUDA graph trees), called
                     from a second thread with a new shape, raise on this torch (pytorch#123177)?
  precision          fp16 against fp32 images on the full-size synthetic checkpoint: max difference,
                     NaN in the UNet or VAE outputs, black images
  predictor-threads  predict.Predictor set up on one thread and driven from three others (768x768,
                     512x512, num_images=4, image to image, a 300-token prompt) with LCM_COMPILE=1 and
                     LCM_CUDA_GRAPHS=1, dynamo's counters before and after each request
  bench              python -m bench at 768 and at 512 batch 8, default settings
  train              LCF training speed (python -m bench.train_speed): 20 images at 512 px, rank 16,
                     attention LoRA, bf16 autocast, 50 steps after 5 untimed ones
  shipped-cache      setup cold (scripts/compile-cache, which also writes the cache) and with the
                     shipped cache in an empty local cache, LCM_COMPILE=1 LCM_CUDA_GRAPHS=1
  bench-compiled     python -m bench at 768 and at 512 batch 8 with LCM_COMPILE=1 LCM_CUDA_GRAPHS=1
  bench-decoder      python -m bench at 768 with the VAE's CPU speedups switched on: folded
                     upsamplers (LCM_FOLD_UPSAMPLE=1), then also the classic VAE attention
                     (LCM_VAE_CLASSIC_ATTENTION=1), against the bench step's default run

A step that would start with less than its expected time left is skipped, and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bench import BENCH_DIR, DEFAULT_WEIGHTS

ROOT = BENCH_DIR.parent
COMPILED = {"LCM_COMPILE": "1", "LCM_CUDA_GRAPHS": "1"}
PHRASE = "a lighthouse on a cliff at dawn, oil painting, golden light"
LONG_TOKENS = 300
# Seconds each step needs on an H200, roughly (compiles dominate); a step starts only with this left.
NEEDS = {
    "versions": 15,
    "graph-threads": 30,
    "precision": 60,
    "predictor-threads": 150,
    "bench": 90,
    "train": 90,
    "shipped-cache": 150,
    "bench-compiled": 150,
    "bench-decoder": 60,
}


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _compiled_env(device: str) -> dict[str, str]:
    return COMPILED if device.startswith("cuda") else {"LCM_COMPILE": "1"}


def step_versions(args: argparse.Namespace) -> None:
    import torch

    _say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    try:
        import triton

        _say(f"triton {triton.__version__}")
    except ImportError:
        _say("triton: not installed")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        _say(
            f"GPU {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB; "
            f"bf16 native {torch.cuda.is_bf16_supported(including_emulation=False)}, "
            f"with emulation {torch.cuda.is_bf16_supported()}"
        )
    else:
        _say("no CUDA device")
    import cog
    import diffusers
    import transformers

    _say(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, cog {cog.__version__}")


def step_graph_threads(args: argparse.Namespace) -> None:
    import torch

    device = torch.device(args.device)
    compiled = torch.compile(lambda x: x * 2 + 1, mode="reduce-overhead")
    for _ in range(3):
        compiled(torch.ones(8, device=device))
    for label, size in (("the same shape", 8), ("a new shape", 16)):
        outcome: dict[str, str] = {}

        def other(size: int = size, outcome: dict[str, str] = outcome) -> None:
            try:
                for _ in range(3):
                    compiled(torch.ones(size, device=device))
                outcome["result"] = "runs"
            except BaseException as exc:  # what torch raises here is the finding
                outcome["result"] = f"RAISES {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        _say(f'mode="reduce-overhead", second thread, {label}: {outcome["result"]}')


def step_precision(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from lcm.engine import Engine
    from lcm.params import Request

    device = torch.device(args.device)
    request = Request.build(
        "a lighthouse on a cliff at dawn", width=768, height=768, seed=1, disable_safety_checker=True
    )
    images = {}
    for dtype in (torch.float16, torch.float32):
        # fp16 as served: Engine.load's settings (a bf16 or fp32 VAE, see accel); fp32 the same in fp32.
        engine = Engine.load(args.weights, device=args.device, dtype=str(dtype).removeprefix("torch."))
        nan: dict[str, bool] = {"unet": False, "vae": False}

        def watch(name: str, nan: dict[str, bool] = nan) -> Callable[..., None]:
            def hook(module: Any, inputs: Any, output: Any) -> None:
                tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                nan[name] = nan[name] or bool(torch.isnan(tensor).any())

            return hook

        engine.model.pipe.unet.register_forward_hook(watch("unet"))
        engine.model.pipe.vae.decoder.register_forward_hook(watch("vae"))
        start = time.perf_counter()
        pixels = engine.generate(request).pixels
        images[dtype] = pixels
        unet, vae = (
            str(m.dtype).removeprefix("torch.") for m in (engine.model.pipe.unet, engine.model.pipe.vae)
        )
        _say(
            f"UNet {unet}, VAE {vae}: {time.perf_counter() - start:.2f}s, "
            f"NaN in UNet {nan['unet']}, in VAE decoder {nan['vae']}, "
            f"black {bool(pixels.max() == 0)}, pixel std {pixels.std():.1f}"
        )
        engine.close()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    diff = np.abs(images[torch.float16].astype(np.int16) - images[torch.float32].astype(np.int16))
    _say(f"fp16 vs fp32: max difference {diff.max()}/255, mean {diff.mean():.2f}/255")


def step_predictor_threads(args: argparse.Namespace) -> None:
    from PIL import Image
    from torch._dynamo.utils import counters

    for name, value in _compiled_env(args.device).items():
        os.environ.setdefault(name, value)
    os.environ["LCM_WEIGHTS_DIR"], os.environ["LCM_DEVICE"] = str(args.weights), args.device
    import cog.types

    import predict

    predictor = predict.Predictor()
    start = time.perf_counter()
    setup = threading.Thread(target=predictor.setup, name="setup")
    setup.start()
    setup.join()
    _say(f"setup on thread 'setup' ({os.environ.get('LCM_COMPILE')=}): {time.perf_counter() - start:.1f}s")
    buffer = io.BytesIO()
    Image.new("RGB", (768, 768), (120, 90, 60)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def downloaded() -> Any:  # as the worker hands it over: downloaded by URLPath.convert for this request
        return cog.types.Path.validate(url).convert()

    cases = [
        ("768x768", {}),
        ("768x768 again", {}),
        ("512x512", {"width": 512, "height": 512}),
        ("num_images=4", {"num_images": 4}),
        ("image to image", {"image": downloaded}),
        (f"{LONG_TOKENS}-token prompt", {"prompt": _long_prompt(predictor.engine.model.pipe.tokenizer)}),
    ]
    defaults = {k: getattr(v.default, "default", v.default) for k, v in _predict_parameters(predict).items()}
    for i, (label, inputs) in enumerate(cases):
        outcome: dict[str, str] = {}

        def run(inputs: dict[str, Any] = inputs, outcome: dict[str, str] = outcome) -> None:
            try:
                given = {key: value() if callable(value) else value for key, value in inputs.items()}
                sent = {**defaults, "seed": 1, "disable_safety_checker": True, **given}
                paths = asyncio.run(predictor.predict(**sent))  # a coroutine, each thread its own loop
                outcome["result"] = f"ok, {len(paths)} file(s)"
            except BaseException as exc:  # the finding
                outcome["result"] = f"FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

        before = dict(counters["frames"]), counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        thread = threading.Thread(target=run, name=f"predict-{i % 3}")
        thread.start()
        thread.join()
        after = dict(counters["frames"]), counters["stats"]["unique_graphs"]
        seconds = time.perf_counter() - start
        _say(
            f"{label} from thread predict-{i % 3}: {outcome['result']} in {seconds:.2f}s; "
            f"dynamo frames {before[0]} -> {after[0]}, unique graphs {before[1]} -> {after[1]}"
        )


def _long_prompt(tokenizer: Any) -> str:
    """PHRASE repeated until it is at least LONG_TOKENS tokens long (five 75-token windows)."""
    prompt = PHRASE
    while len(tokenizer(prompt, add_special_tokens=False).input_ids) < LONG_TOKENS:
        prompt += ", " + PHRASE
    return prompt


def _predict_parameters(predict: Any) -> dict[str, Any]:
    import inspect

    return dict(list(inspect.signature(predict.Predictor.predict).parameters.items())[1:])


def _bench(args: argparse.Namespace, env: dict[str, str], extra: list[str], sizes: str) -> None:
    command = [sys.executable, "-m", "bench", "--device", args.device, "--weights", str(args.weights)]
    command += ["--record", str(args.out / "RESULTS.md"), *extra]
    full_env = {**os.environ, **env}
    if sizes:
        full_env["LCM_COMPILE_SIZES"] = sizes
    shown = " ".join(
        f"{k}={v}" for k, v in {**env, **({"LCM_COMPILE_SIZES": sizes} if sizes else {})}.items()
    )
    _say(f"$ {shown} {' '.join(command[1:])}".strip())
    done = subprocess.run(command, env=full_env, cwd=ROOT, capture_output=True, text=True)
    table = [line for line in done.stdout.splitlines() if line.startswith("|") or "speedup" in line]
    _say("\n".join(table) or done.stderr[-2000:])


def step_bench(args: argparse.Namespace) -> None:
    _bench(args, {}, ["--size", "768"], "")
    _bench(args, {}, ["--size", "512", "--batch", "8"], "")


def step_train(args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "bench.train_speed", str(args.weights), "--device", args.device]
    command += ["--resolution", "512", "--images", "20", "--steps", "50", "--warmup", "5"]
    _say(f"$ {' '.join(command[1:])}")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    _say(
        "\n".join(line for line in done.stdout.splitlines() if "steps_per_s=" in line) or done.stderr[-2000:]
    )


def step_bench_compiled(args: argparse.Namespace) -> None:
    env = _compiled_env(args.device)
    _bench(args, env, ["--size", "768"], "768x768")
    _bench(args, env, ["--size", "512", "--batch", "8"], "512x512x8")


def step_bench_decoder(args: argparse.Namespace) -> None:
    _bench(args, {"LCM_FOLD_UPSAMPLE": "1"}, ["--size", "768"], "")
    _bench(args, {"LCM_FOLD_UPSAMPLE": "1", "LCM_VAE_CLASSIC_ATTENTION": "1"}, ["--size", "768"], "")


def step_shipped_cache(args: argparse.Namespace) -> None:
    env = {**os.environ, **_compiled_env(args.device), "LCM_COMPILE_SIZES": "768x768"}
    start = time.perf_counter()
    cold = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "compile-cache"),
            "--dir",
            str(args.weights),
            "--device",
            args.device,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = (cold.stdout + cold.stderr).splitlines()
    _say(f"cold (scripts/compile-cache): {time.perf_counter() - start:.1f}s in all")
    _say("\n".join(line for line in lines if line.startswith(("loaded", "wrote", "compile cache", "error"))))
    code = (
        "import json, time, sys; t = time.perf_counter(); from lcm.engine import Engine; "
        "e = Engine.load(sys.argv[1], device=sys.argv[2]); print(f'setup {time.perf_counter() - t:.1f}s')"
    )
    with tempfile.TemporaryDirectory() as empty:
        shipped = subprocess.run(
            [sys.executable, "-c", code, str(args.weights), args.device],
            env={**env, "LCM_COMPILE_CACHE": empty, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
        )
    lines = (shipped.stdout + shipped.stderr).splitlines()
    _say("with the shipped cache, empty local cache:")
    _say(
        "\n".join(
            line for line in lines if line.startswith(("loaded", "setup", "compile cache", "Traceback"))
        )
    )
    for name in ("torch-compile-cache.bin", "torch-compile-cache.json"):
        (Path(args.weights) / name).unlink(missing_ok=True)  # the benchmark's setup compiles as configured


STEPS: dict[str, Callable[[argparse.Namespace], None]] = {
    "versions": step_versions,
    "graph-threads": step_graph_threads,
    "precision": step_precision,
    "predictor-threads": step_predictor_threads,
    "bench": step_bench,
    "train": step_train,
    "shipped-cache": step_shipped_cache,
    "bench-compiled": step_bench_compiled,
    "bench-decoder": step_bench_decoder,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.log and RESULTS.md")
    p.add_argument(
        "--device", default="cuda", help="the device (default cuda; cpu runs the same code slowly)"
    )
    p.add_argument(
        "--weights", type=Path, default=DEFAULT_WEIGHTS, help="default: the full synthetic checkpoint"
    )
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of: {', '.join(STEPS)}")
    p.add_argument("--deadline", type=float, default=450, help="seconds for all steps (default 450)")
    p.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # one step, in this process
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:
        STEPS[args.step](args)
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: --steps {','.join(unknown)} is not allowed: use {', '.join(STEPS)}", file=sys.stderr)
        return 2
    end = time.monotonic() + args.deadline
    log = (args.out / "gpu_check.log").open("a")
    if not Path(args.weights).exists():
        from lcm.synthetic import build_checkpoint

        build_checkpoint(args.weights, size="full")
    status = 0
    for name in steps:
        left = end - time.monotonic()
        header = f"== {name} ({left:.0f}s left)"
        if left < NEEDS[name]:
            header += f": SKIPPED, needs about {NEEDS[name]}s"
        _say(header)
        log.write(header + "\n")
        if left < NEEDS[name]:
            continue
        start = time.perf_counter()
        command = [sys.executable, "-m", "bench.gpu_check", "--step", name, "--out", str(args.out)]
        command += ["--device", args.device, "--weights", str(args.weights)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            output, code = done.stdout + (done.stderr[-1500:] if done.returncode else ""), done.returncode
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or ""
            partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
            output, code = partial + "\nTIMED OUT", 124
        footer = f"-- {name}: exit {code}, {time.perf_counter() - start:.1f}s"
        _say(output.rstrip() + "\n" + footer)
        log.write(output.rstrip() + "\n" + footer + "\n")
        log.flush()
        status = status or code
    _say(json.dumps({"results": str(args.out / "RESULTS.md"), "log": str(args.out / "gpu_check.log")}))
    return status


if __name__ == "__main__":
    sys.exit(main())
