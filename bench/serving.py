"""`python -m bench --clients K`: Cog's real server on the chosen weights, driven by K concurrent
clients, against one client at a time on the same server in the same run.

Each client sends its share of the requests one after another (sync POSTs); images/s is every
image returned over the phase's wall time, latencies are the clients' own, and the batches formed
come from each prediction's log line (`batch=<requests>requests/<images>images`).
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench import report
from bench.cogserver import CogServer, max_concurrency
from bench.results import Settings

BATCH = re.compile(r"batch=(\d+)requests/(\d+)images")


@dataclass(frozen=True)
class Phase:
    clients: int
    seconds: float  # wall time of the phase
    latencies: list[float]
    images: int
    batches: dict[int, int]  # requests per batch -> predictions that ran in such a batch

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def drive(server: CogServer, settings: Settings, clients: int, requests: int, first_seed: int) -> Phase:
    """`requests` predictions from `clients` threads, each sending one after another."""
    numbers = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    batches: collections.Counter[int] = collections.Counter()
    failures: list[Any] = []

    def client() -> None:
        while True:
            with lock:
                i = next(numbers, None)
            if i is None:
                return
            inputs = {
                "prompt": f"{settings.prompt}, variation {i}",
                "width": settings.size,
                "height": settings.size,
                "num_inference_steps": settings.steps,
                "num_images": settings.batch,
                "seed": first_seed + i,
                "fast_decode": settings.fast_decode,
            }
            start = time.monotonic()
            status, body = server.predict(**inputs)
            seconds = time.monotonic() - start
            with lock:
                if status != 200 or body.get("status") != "succeeded":
                    failures.append((status, body))
                    continue
                latencies.append(seconds)
                found = BATCH.search(body.get("logs", ""))
                batches[int(found.group(1)) if found else 0] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - start
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} predictions failed; first: {failures[0]}")
    return Phase(clients, seconds, latencies, requests * settings.batch, dict(sorted(batches.items())))


def table(phases: list[Phase]) -> str:
    alone = phases[0]
    lines = [
        "| clients | images/s | vs 1 client | latency p50 s | latency p95 s "
        "| batches formed (requests: predictions) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for p in phases:
        formed = ", ".join(f"{size}: {count}" for size, count in p.batches.items())
        lines.append(
            f"| {p.clients} | {p.images_per_s:.3f} | {p.images_per_s / alone.images_per_s:.2f} | "
            f"{p.percentile(0.5):.3f} | {p.percentile(0.95):.3f} | {formed} |"
        )
    return "\n".join(lines)


def run(settings: Settings, clients: int, requests: int) -> tuple[str, str]:
    """Both phases on one server; the report and the last line (images/s with K clients over 1).

    The server gets cog.yaml's slots, or COG_MAX_CONCURRENCY from the environment, or at least
    `clients`; LCM_BATCH_PIXELS and the other settings come from the environment, as served.
    """
    slots = max(clients, int(os.environ.get("COG_MAX_CONCURRENCY", max_concurrency())))
    env = {"LCM_DEVICE": str(settings.device), "COG_MAX_CONCURRENCY": str(slots)}
    server = CogServer(settings.weights, None, env=env)
    try:
        server.wait_until({"READY"}, timeout=1800)
        drive(server, settings, 1, 1, first_seed=10**6)  # warm-up: the first request's one-time costs
        phases = [drive(server, settings, k, requests, first_seed=0) for k in (1, clients)]
    finally:
        server.stop()
    speedup = phases[1].images_per_s / phases[0].images_per_s
    s = settings
    lines = [
        f"device: {s.device} — {report.device_name(s.device)}",
        f"versions: {report.versions()}; commit {report.commit()}",
        f"request: {s.size}x{s.size}, {s.steps} steps, {s.batch} image(s), predict()'s other defaults "
        f"(safety checker on{', fast_decode' if s.fast_decode else ''}); weights {s.weights}",
        f"server: Cog's, {slots} slots, LCM_BATCH_PIXELS="
        f"{os.environ.get('LCM_BATCH_PIXELS', 'the device default')}; {requests} requests per phase, "
        "each client sending its next request when its answer arrives",
        "load average at the end (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "",
        table(phases),
        "",
        f"latency with {clients} clients over 1 client: p50 "
        f"{phases[1].percentile(0.5) / phases[0].percentile(0.5):.2f}x, p95 "
        f"{phases[1].percentile(0.95) / phases[0].percentile(0.95):.2f}x",
    ]
    return "\n".join(lines), f"serving_speedup_vs_one_client={speedup:.3f}"
