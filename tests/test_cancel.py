"""Cancellation: a cancel stops the sampler within a step, leaves no files and no busy slot behind."""

from __future__ import annotations

import re
import time
import urllib.error
from pathlib import Path

import pytest

from cogserver import CogServer, WebhookReceiver

# 50 UNet passes on the tiny checkpoint: long enough to cancel early, whatever else loads the machine.
SLOW = {
    "prompt": "a photo of a cat",
    "width": 256,
    "height": 256,
    "num_inference_steps": 50,
    "disable_safety_checker": True,
}
PROBE_STEPS = 3
CHEAP = {**SLOW, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def tmpdir_server(tiny_checkpoint, openapi_schema, tmp_path_factory):
    """A server of its own whose TMPDIR the test owns, so the predictor's output dirs can be counted."""
    tmpdir = tmp_path_factory.mktemp("server-tmp")
    srv = CogServer(tiny_checkpoint, openapi_schema, env={"TMPDIR": str(tmpdir)})
    try:
        srv.wait_until({"READY"})
        yield srv, tmpdir
    finally:
        srv.stop()


@pytest.fixture
def uncancelled(tmpdir_server) -> tuple[float, float]:
    """(seconds, seconds per step) the SLOW prediction takes to run to its end on this server, now.

    Measured per step on a short run just before use, since other jobs can change this machine's
    speed several-fold within a minute: a full run measured earlier would not predict a later one.
    """
    server, _ = tmpdir_server
    server.predict(**CHEAP)  # a fresh worker's first UNet pass is several times slower than the rest
    start = time.monotonic()
    status, body = server.predict(**{**SLOW, "num_inference_steps": PROBE_STEPS})
    elapsed = time.monotonic() - start
    assert status == 200 and body["status"] == "succeeded", body
    step = float(re.search(r"unet=([\d.]+)s", body["logs"]).group(1)) / PROBE_STEPS
    return elapsed + (SLOW["num_inference_steps"] - PROBE_STEPS) * step, step


@pytest.fixture
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def output_dirs(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("lcm-*"))


def test_cancel_stops_within_steps_removes_files_and_frees_the_slot(tmpdir_server, uncancelled, webhooks):
    server, tmpdir = tmpdir_server
    full, step = uncancelled
    before = output_dirs(tmpdir)  # earlier predictions' files, kept while Cog may still send them

    assert server.start("cancel-me", webhooks.url, **SLOW)[0] == 202
    deadline = time.monotonic() + full
    while output_dirs(tmpdir) == before and time.monotonic() < deadline:
        time.sleep(0.01)  # until predict() has begun: its own dir appears
    (partial,) = set(output_dirs(tmpdir)) - set(before)
    time.sleep(3 * step)  # inside the denoising loop
    cancelled_at = time.monotonic()
    assert server.cancel("cancel-me") == 200, "the prediction ended before the cancel"
    event = webhooks.completed("cancel-me", timeout=full)
    server.wait_until({"READY"}, timeout=full)
    # Cog answers for an async predict once its task is cancelled; the coroutine removes the
    # partial dir after the engine has let go of the request, so its going marks the engine's stop.
    while partial.exists() and time.monotonic() < cancelled_at + full:
        time.sleep(0.01)
    latency = time.monotonic() - cancelled_at

    print(f"uncancelled ~{full:.2f}s, step {step:.3f}s, cancelled to files removed in {latency:.3f}s")
    assert event["status"] == "canceled", event
    assert not event.get("output"), event
    assert latency < 0.5 * full, (latency, full)  # the remaining 40-odd steps never ran
    assert output_dirs(tmpdir) == before  # the cancelled run's partial dir is gone

    status, body = server.predict(**CHEAP)
    assert status == 200 and body["status"] == "succeeded", body
    assert len(output_dirs(tmpdir)) == len(before) + 1  # the new prediction's files, nothing else


def test_a_client_that_hangs_up_cancels_its_prediction(tmpdir_server, uncancelled):
    server, _ = tmpdir_server
    full, step = uncancelled
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        server.send_when_free("POST", "/predictions", {"input": SLOW}, timeout=5 * step)
    start = time.monotonic()
    server.wait_until({"READY"}, timeout=full)
    assert time.monotonic() - start < 0.5 * full  # cancelled, not run to the end
    status, body = server.predict(**CHEAP)
    assert status == 200 and body["status"] == "succeeded", body


def test_cancelling_an_unknown_or_finished_prediction_is_404(tmpdir_server):
    server, _ = tmpdir_server
    assert server.cancel("never-started") == 404
    status, body = server.send_when_free("POST", "/predictions", {"id": "finished", "input": CHEAP})
    assert body["status"] == "succeeded", body
    assert server.cancel("finished") == 404
