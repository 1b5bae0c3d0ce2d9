"""Soak: 500 mixed predictions through Cog's real server lose nothing and leak nothing (make soak).

Sync and async (webhooks to a loopback receiver) alternate over sizes, formats, batch sizes and
input images, and every BURST_EVERY-th prediction comes with BURST - 1 concurrent others (Cog's
slots, batched by the engine where they fit). After a warm-up, the worker's resident memory must
grow less than 10%, the files under the server's TMPDIR stay within what the last second's
predictions returned (LCM_KEEP_OUTPUTS_S=1), and neither process may gain file descriptors.
"""

from __future__ import annotations

import base64
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cogserver import CogServer, WebhookReceiver

pytestmark = pytest.mark.soak

PREDICTIONS = 500
WARMUP = 50  # covers every size x batch x img2img combination once, so shape caches are warm
SAMPLE_EVERY = 50
SIZES = [(256, 256), (320, 256), (256, 384), (384, 320)]
FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
MAX_RSS_GROWTH = 0.10
BURST, BURST_EVERY = 4, 10
KEEP_S = 1.0


def input_image_url() -> str:
    raw = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(raw, format="PNG")
    return "data:image/png;base64," + base64.b64encode(raw.getvalue()).decode()


IMAGE_URL = input_image_url()


def inputs(i: int) -> dict[str, Any]:
    """The i-th request: cycles through sizes, formats, batch sizes, img2img and the safety checker."""
    width, height = SIZES[i % len(SIZES)]
    request: dict[str, Any] = {
        "prompt": f"a photo of a cat, variation {i}",
        "width": width,
        "height": height,
        "num_inference_steps": 1 + i % 2,
        "output_format": list(FORMATS)[i % len(FORMATS)],
        "num_images": 2 if i % 7 == 0 else 1,
        "seed": i,
        "disable_safety_checker": i % 2 == 1,
    }
    if i % 5 == 0:  # img2img, its size left to the image's (64x64 -> 256x256)
        del request["width"], request["height"]
        request["image"] = IMAGE_URL
    return request


def check_output(request: dict[str, Any], result: dict[str, Any]) -> None:
    assert result["status"] == "succeeded", result.get("error")
    assert len(result["output"]) == request["num_images"]
    size = (request.get("width", 256), request.get("height", 256))
    for url in result["output"]:
        with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) as image:
            assert (image.format, image.size) == (FORMATS[request["output_format"]], size)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def files_under(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def snapshot(server: CogServer, tmpdir: Path) -> dict[str, int]:
    workers = server.worker_pids()
    return {
        "worker_rss_kb": sum(rss_kb(pid) for pid in workers),
        "server_fds": fds(server.proc.pid),
        "worker_fds": sum(fds(pid) for pid in workers),
        "tmp_files": files_under(tmpdir),
    }


def run_one(server: CogServer, webhooks: WebhookReceiver, i: int) -> dict[str, Any]:
    """Prediction i: even ones sync, odd ones async with a webhook, each awaited to its end; every
    BURST_EVERY-th with BURST - 1 others at once (numbered past the sequence, so ids stay unique)."""
    if i % BURST_EVERY == 0:
        with ThreadPoolExecutor(BURST) as pool:
            others = [
                pool.submit(run_alone, server, webhooks, 10**6 + i * BURST + k) for k in range(1, BURST)
            ]
            result = run_alone(server, webhooks, i)
            for other in others:
                other.result()
        return result
    return run_alone(server, webhooks, i)


def run_alone(server: CogServer, webhooks: WebhookReceiver, i: int) -> dict[str, Any]:
    request = inputs(i)
    if i % 2 == 0:
        status, result = server.predict(**request)
        assert status == 200, result
    else:
        status, started = server.start(f"soak-{i}", webhooks.url, **request)
        assert status == 202, started
        result = webhooks.completed(f"soak-{i}", timeout=120)
    check_output(request, result)
    return result


def test_soak(tiny_checkpoint, openapi_schema, tmp_path):
    tmpdir = tmp_path / "server-tmp"
    tmpdir.mkdir()
    env = {
        "TMPDIR": str(tmpdir),
        "LCM_KEEP_OUTPUTS_S": str(KEEP_S),
        "LCM_BATCH_PIXELS": str(BURST * 2 * 384 * 320),
    }
    server = CogServer(tiny_checkpoint, openapi_schema, env=env)
    webhooks = WebhookReceiver()
    start = time.monotonic()
    try:
        server.wait_until({"READY"})
        (worker,) = server.worker_pids()
        for i in range(WARMUP):
            run_one(server, webhooks, i)
        time.sleep(0.5)
        baseline = snapshot(server, tmpdir)
        samples = [baseline]
        print(f"\nafter {WARMUP} warm-up predictions: {baseline}", flush=True)
        succeeded = 0
        for i in range(WARMUP, WARMUP + PREDICTIONS):
            run_one(server, webhooks, i)
            succeeded += 1
            if succeeded % SAMPLE_EVERY == 0:
                time.sleep(0.2)  # let in-flight connections close before counting descriptors
                samples.append(snapshot(server, tmpdir))
                elapsed = time.monotonic() - start
                print(f"{succeeded:4d} predictions, {elapsed:6.1f}s: {samples[-1]}", flush=True)
        time.sleep(KEEP_S + 0.5)
        run_alone(server, webhooks, WARMUP + PREDICTIONS)  # removes every earlier prediction's files
        time.sleep(0.2)
        samples.append(snapshot(server, tmpdir))
        assert server.worker_pids() == [worker]  # one worker throughout, never restarted
    finally:
        webhooks.close()
        server.stop()

    final = samples[-1]
    # RSS wanders +-7% between samples as the allocator reuses memory: compare smoothed ends.
    start_rss = statistics.mean(s["worker_rss_kb"] for s in samples[:2])
    end_rss = statistics.mean(s["worker_rss_kb"] for s in samples[-3:])
    growth = end_rss / start_rss - 1
    peak_rss = max(s["worker_rss_kb"] for s in samples)
    peak_files = max(s["tmp_files"] for s in samples)
    duration = time.monotonic() - start
    print(
        f"soak: {succeeded}/{PREDICTIONS} succeeded ({len(webhooks.events)} webhook events) "
        f"in {duration:.0f}s; "
        f"worker RSS {start_rss / 1024:.0f} -> {end_rss / 1024:.0f} MiB ({growth:+.1%}, peak "
        f"{peak_rss / 1024:.0f} MiB); fds server {baseline['server_fds']} -> {final['server_fds']}, "
        f"worker {baseline['worker_fds']} -> {final['worker_fds']}; files under TMPDIR "
        f"{baseline['tmp_files']} -> {final['tmp_files']} (peak {peak_files})",
        flush=True,
    )
    assert growth < MAX_RSS_GROWTH
    assert final["server_fds"] <= baseline["server_fds"] and final["worker_fds"] <= baseline["worker_fds"]
    assert final["tmp_files"] <= baseline["tmp_files"] + 2  # the last prediction's outputs (2 images) at most
    # While serving: what the last KEEP_S seconds returned, a burst of BURST and the few around it.
    assert peak_files <= baseline["tmp_files"] + 2 * (BURST + 4)
