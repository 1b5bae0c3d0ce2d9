"""Concurrent requests batched on the engine: each request's images as if served alone, its own
cancellation and failure, and Cog's slots (cog.yaml's concurrency) over its real server."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cogserver import CogServer, WebhookReceiver, max_concurrency
from lcm import safety
from lcm.params import Request
from lcm.worker import Cancelled

BUDGET = 16 * 256 * 256  # the tests' batch budget: 16 images at 256x256
BATCH = re.compile(r"batch=(\d+)requests/(\d+)images")


def request(prompt: str, **kw: Any) -> Request:
    return Request.build(prompt, **{"width": 256, "height": 256, "num_inference_steps": 3, "seed": 5, **kw})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture
def batching(engine, monkeypatch):
    """The session engine with a batch budget, its thread held until `release()`, UNet rows recorded."""
    monkeypatch.setattr(engine.model, "accel", dataclasses.replace(engine.model.accel, batch_pixels=BUDGET))
    rows: list[int] = []
    handle = engine.model.pipe.unet.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    gate = threading.Event()
    blocker = engine.thread.submit(lambda _flag: gate.wait(60))

    def release() -> None:
        gate.set()
        blocker.result()

    try:
        yield engine, rows, release
    finally:
        gate.set()
        handle.remove()


REQUESTS = [
    request("a photo of a cat"),
    request("a red fox on a hill at dawn", seed=7, num_images=2, guidance_scale=3.0, clip_skip=1),
    request("a lighthouse", seed=9, disable_safety_checker=True),
]


def test_queued_requests_that_fit_share_passes_and_equal_themselves_alone(batching, tmp_path):
    engine, rows, release = batching
    lossy = request("a boat", seed=11, output_format="webp", output_quality=60)
    other_size = request("a photo of a cat", width=320)  # another shape: the next batch
    jobs = [engine.submit(r, tmp_path / f"batch-{i}") for i, r in enumerate([*REQUESTS, lossy, other_size])]
    release()
    served = [job.result() for job in jobs]
    assert rows == [5, 5, 5, 1, 1, 1]  # four requests' five images in one set of passes, then the other
    assert [BATCH.search(s.summary).groups() for s in served] == [("4", "5")] * 4 + [("1", "1")]
    assert [Image.open(p).format for s in served for p in s.paths] == ["PNG"] * 4 + ["WEBP", "PNG"]
    for i, (r, batched) in enumerate(zip(REQUESTS, served, strict=False)):
        alone = engine.generate_files(r, tmp_path / f"alone-{i}")
        assert [p.name for p in alone] == [p.name for p in batched.paths]
        for a, b in zip(alone, batched.paths, strict=True):  # PNG: the pixels as generated
            assert int(np.abs(pixels(a) - pixels(b)).max()) <= 1, (i, a.name)  # batched rounding only


def test_the_budget_bounds_what_joins_the_oldest_request(batching, tmp_path, monkeypatch):
    engine, rows, release = batching
    budget = dataclasses.replace(engine.model.accel, batch_pixels=3 * 256 * 256)
    monkeypatch.setattr(engine.model, "accel", budget)
    jobs = [engine.submit(r, tmp_path / f"{i}") for i, r in enumerate(REQUESTS)]  # 1 + 2 + 1 images
    release()
    served = [job.result() for job in jobs]
    assert [BATCH.search(s.summary).groups() for s in served] == [("2", "3"), ("2", "3"), ("1", "1")]
    assert rows == [3, 3, 3, 1, 1, 1]


def test_a_request_cancelled_in_a_batch_leaves_it_at_the_next_step(batching, tmp_path):
    engine, rows, release = batching
    slow = [
        request("a photo of a cat", num_inference_steps=6),
        request("a dog", num_inference_steps=6, seed=8),
    ]
    jobs = [engine.submit(r, tmp_path / f"batch-{i}") for i, r in enumerate(slow)]
    handle = engine.model.pipe.unet.register_forward_pre_hook(
        lambda *_: jobs[0].cancel() if len(rows) == 2 else None
    )
    try:
        release()
        with pytest.raises(Cancelled):
            jobs[0].result()
        kept = jobs[1].result()
    finally:
        handle.remove()
    assert rows == [2, 2, 1, 1, 1, 1]  # flagged during the second pass: gone from the third
    assert not (tmp_path / "batch-0").exists()  # never written
    (alone,) = engine.generate_files(slow[1], tmp_path / "alone")
    assert int(np.abs(pixels(alone) - pixels(kept.paths[0])).max()) <= 1


def test_a_request_that_fails_in_a_batch_fails_alone(batching, tmp_path, monkeypatch):
    """Every image the checker sees is flagged: the request that runs it fails, the other does not."""
    engine, _, release = batching
    monkeypatch.setattr(safety, "flag_nsfw", lambda _fe, _sc, images, *_: [True] * len(images))
    checked, unchecked = request("a photo of a cat"), request("a dog", disable_safety_checker=True)
    jobs = [engine.submit(r, tmp_path / f"{i}") for i, r in enumerate([checked, unchecked])]
    release()
    with pytest.raises(Exception, match="flagged all 1 image"):
        jobs[0].result()
    served = jobs[1].result()
    assert BATCH.search(served.summary).groups() == ("2", "2") and len(served.paths) == 1


# --- over Cog's server ---------------------------------------------------------------------------

SMALL = {"width": 256, "height": 256, "num_inference_steps": 3, "disable_safety_checker": True}
BLOCKER = {**SMALL, "prompt": "a blocker", "width": 320, "num_inference_steps": 30}  # another shape


@pytest.fixture(scope="module")
def batch_server(tiny_checkpoint, openapi_schema):
    server = CogServer(tiny_checkpoint, openapi_schema, env={"LCM_BATCH_PIXELS": str(BUDGET)})
    try:
        server.wait_until({"READY"})
        yield server
    finally:
        server.stop()


def decoded(body: dict) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB")).astype(
            np.int16
        )
        for url in body["output"]
    ]


def timed(server: CogServer, inputs: dict) -> tuple[float, int, Any]:
    start = time.monotonic()
    status, body = server.predict(**inputs)
    return time.monotonic() - start, status, body


def test_concurrent_requests_are_batched_and_each_equals_itself_alone(batch_server):
    inputs = [
        {**SMALL, "prompt": "a photo of a cat", "seed": 1},
        {**SMALL, "prompt": "a red fox", "seed": 2, "num_images": 2, "guidance_scale": 3.0},
        {**SMALL, "prompt": "a lighthouse", "seed": 3, "clip_skip": 1},
    ]
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(batch_server.predict, **BLOCKER)
        time.sleep(0.5)  # the blocker holds the engine; the others queue behind it
        answers = list(pool.map(lambda i: timed(batch_server, i), inputs))
        assert blocker.result()[1]["status"] == "succeeded"
    for (seconds, status, body), sent in zip(answers, inputs, strict=True):
        assert status == 200 and body["status"] == "succeeded", body
        assert BATCH.search(body["logs"]).groups() == ("3", "4"), body["logs"]
        assert 0 < body["metrics"]["predict_time"] <= seconds  # this request's own time, not the batch's
        alone = batch_server.predict(**sent)[1]
        assert "batch=1requests" in alone["logs"]
        for a, b in zip(decoded(alone), decoded(body), strict=True):
            assert int(np.abs(a - b).max()) <= 1


def test_a_request_cancelled_while_batched_stops_and_the_other_finishes(batch_server):
    webhooks = WebhookReceiver()
    try:
        slow = {**SMALL, "num_inference_steps": 20}
        with ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(batch_server.predict, **BLOCKER)
            time.sleep(0.5)
            started = batch_server.start("cancel-in-batch", webhooks.url, **slow, prompt="a cat", seed=4)
            assert started[0] == 202
            kept = pool.submit(batch_server.predict, **slow, prompt="a dog", seed=5)
            blocker.result()  # the batch of the two starts as the blocker's answer goes out
            time.sleep(0.3)
            assert batch_server.cancel("cancel-in-batch") == 200
            assert webhooks.completed("cancel-in-batch")["status"] == "canceled"
            status, body = kept.result()
    finally:
        webhooks.close()
    assert status == 200 and body["status"] == "succeeded", body
    assert BATCH.search(body["logs"]).groups() == ("2", "2"), body["logs"]
    alone = batch_server.predict(**slow, prompt="a dog", seed=5)[1]
    assert int(np.abs(decoded(alone)[0] - decoded(body)[0]).max()) <= 1


def test_a_client_sending_one_request_after_another_never_gets_409(batch_server):
    cheap = {**SMALL, "prompt": "x", "num_inference_steps": 1}
    answers = [
        batch_server.request("POST", "/predictions", {"input": {**cheap, "seed": i}}) for i in range(12)
    ]
    assert [status for status, _ in answers] == [200] * 12


def test_every_slot_serves_and_the_request_beyond_them_gets_cogs_answer(batch_server):
    slots = max_concurrency()
    webhooks = WebhookReceiver()
    try:
        ids = [f"slot-{i}" for i in range(slots)]
        for i, prediction in enumerate(ids):
            slow = {**SMALL, "prompt": "a cat", "seed": i, "num_inference_steps": 10}
            assert batch_server.start(prediction, webhooks.url, **slow)[0] == 202
        status, body = batch_server.request("POST", "/predictions", {"input": {**SMALL, "prompt": "x"}})
        events = [webhooks.completed(prediction) for prediction in ids]
    finally:
        webhooks.close()
    assert status == 409 and "capacity" in str(body).lower(), (status, body)
    assert [e["status"] for e in events] == ["succeeded"] * slots


def test_a_put_never_waits_for_the_keys_being_computed():
    """The engine computes keys (tokenizing each prompt) while callers keep queueing."""
    from lcm import batching
    from lcm.worker import Job

    queue, keying, queued = batching.Queue(), threading.Event(), threading.Event()

    def slow_key(item: batching.Pending) -> Any:
        keying.set()
        assert queued.wait(30), "put() waited for take()'s keys"
        return batching.shape_key(item.request, 1)

    first, second = (batching.Pending(request(p), Path("out"), Job()) for p in ("a cat", "a dog"))
    queue.put(first)
    with ThreadPoolExecutor(1) as pool:
        taken = pool.submit(queue.take, slow_key, BUDGET)
        assert keying.wait(30)
        queue.put(second)  # while the key is being computed
        queued.set()
        assert taken.result() == [first]  # what was queued when it looked
    assert queue.take(lambda item: batching.shape_key(item.request, 1), BUDGET) == [second]
