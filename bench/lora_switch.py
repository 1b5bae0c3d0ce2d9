"""What switching between two loaded request LoRAs (lora_weights) costs, against the request it serves.

    python -m bench.lora_switch [--weights DIR] [--size N] [--steps S] [--rank R] [--runs R] [--record [FILE]]

Two synthetic SD 1.5 LoRAs for the checkpoint (lcm.synthetic_loras; kohya format, every layer kohya's
sd-scripts adapts, UNet and text encoder) are served by a local HTTP server and fetched as a request
fetches them. After one request with each (the first load of each: download, read, adapter
creation), the timed requests alternate between them, so each one switches; then as many repeat the
last one, so none switches. Per request the engine's own "lora" stage is the switch (set_adapters on
the UNet and the text encoder, nothing read), and "total" is the request end to end through
Engine.generate (text encoder to decoded pixels; the safety checker off). The issue's goal: a switch
at most 5% of a 4-step 512x512 request.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench import RESULTS, passive_openmp, positive

passive_openmp()  # before torch starts OpenMP

import torch  # noqa: E402

from bench import report  # noqa: E402
from lcm.engine import Engine  # noqa: E402
from lcm.params import Request  # noqa: E402
from lcm.synthetic_loras import kohya_lora  # noqa: E402

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "checkpoints" / "full"
PROMPT = "a lighthouse on a cliff at dawn"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _serve(folder: Path) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def run(args: argparse.Namespace) -> list[str]:
    scratch = Path(tempfile.mkdtemp(prefix="lcm-lora-switch-"))
    os.environ["LCM_ALLOW_PRIVATE_URLS"] = "1"  # the LoRAs are served from 127.0.0.1
    os.environ["LCM_LORA_CACHE"] = str(scratch / "cache")
    names = [
        kohya_lora(args.weights, scratch / f"style-{i}.safetensors", seed=i, rank=args.rank).name
        for i in (1, 2)
    ]
    sizes = [(scratch / n).stat().st_size / 1e6 for n in names]
    httpd = _serve(scratch)
    urls = [f"http://127.0.0.1:{httpd.server_address[1]}/{n}" for n in names]
    engine = Engine.load(args.weights, device="cpu")
    common = {"width": args.size, "height": args.size, "num_inference_steps": args.steps, "seed": 1}
    common["disable_safety_checker"] = True

    def one(url: str) -> tuple[float, float, str]:
        request = Request.build(PROMPT, lora_weights=url, lora_scale=0.8, **common)
        start = time.perf_counter()
        generation = engine.generate(request)
        return time.perf_counter() - start, generation.timings["lora"], request.lora.fetched

    try:
        first = [one(url) for url in urls]  # each LoRA's first load
        switching = [one(urls[i % 2]) for i in range(args.runs)]
        staying = [one(urls[(args.runs - 1) % 2]) for _ in range(args.runs)]
        base_start = time.perf_counter()
        engine.generate(Request.build(PROMPT, **common))
        base = time.perf_counter() - base_start
        described = engine.model.accel.describe()
        dtype = str(engine.model.dtype).removeprefix("torch.")
    finally:
        engine.close()
        httpd.shutdown()

    def median(rows: list[tuple[float, float, str]], k: int) -> float:
        return statistics.median(r[k] for r in rows)

    switch, total = median(switching, 1), median(switching, 0)
    lines = [
        f"- device: cpu — {report.device_name(torch.device('cpu'))}",
        f"- versions: {report.versions()}; commit {report.commit()}",
        f"- request: {args.size}x{args.size}, {args.steps} steps, 1 image, safety checker off, "
        f"dtype {dtype}; {described}; weights {args.weights}",
        f"- LoRAs: two kohya-format, rank {args.rank}, UNet and text encoder, "
        f"{sizes[0]:.1f} and {sizes[1]:.1f} MB",
        f"- command: `python -m bench.lora_switch {shlex.join(sys.argv[1:])}`",
        f"- {report.load_average()}",
        "",
        "| requests | lora stage s, median | end to end s, median | lora stage / end to end |",
        "|---|---:|---:|---:|",
    ]
    for label, rows in (
        ("first load of each (fetched, read, adapters made)", first),
        (f"{args.runs} alternating: each switches", switching),
        (f"{args.runs} repeating the last: none switches", staying),
    ):
        lora, total_ = median(rows, 1), median(rows, 0)
        lines.append(f"| {label} | {lora:.4f} | {total_:.3f} | {lora / total_:.2%} |")
    lines += [
        f"| the base model, no lora_weights (after them) | – | {base:.3f} | – |",
        "",
        f"fetches: {first[0][2]}; {first[1][2]}; then {switching[0][2]}",
        "",
        f"`lora_switch_share_of_request={switch / total:.4f}`",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lora_switch", description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint (default: %(default)s)")
    p.add_argument("--size", type=positive, default=512, help="width and height in pixels (default 512)")
    p.add_argument("--steps", type=positive, default=4, help="inference steps (default 4)")
    p.add_argument("--rank", type=positive, default=32, help="the LoRAs' rank (default 32)")
    p.add_argument("--runs", type=positive, default=4, help="timed requests per phase (default 4)")
    p.add_argument("--record", nargs="?", type=Path, const=RESULTS, default=None, metavar="FILE")
    args = p.parse_args(argv)
    lines = run(args)
    print("\n".join(lines))
    if args.record is not None:
        report.append_section(args.record, f"cpu, request LoRA switch, {args.size}x{args.size}", lines)


if __name__ == "__main__":
    main()
