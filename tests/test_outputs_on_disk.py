"""Returned outputs on disk through Cog's real server with several slots: LCM_KEEP_OUTPUTS_MB bounds
them once Cog has surely read them, and no answer misses a file.

1. SLOTS clients send ROUNDS predictions each, which the engine batches: every answer must carry
   all its images, whole (Cog's server reads returned files after predict() returns and leaves a
   missing one out of an answer that still succeeds: the last test here).
2. SEQUENTIAL predictions one at a time: with slots free nothing proves their files read, so all
   of them stay, over the budget. (This is what fails for a rule that removes unproven folders:
   the engine's returns are milliseconds apart, time enough for the server to read, so answers in
   1 came back whole even with such a rule, tried.)
3. A long prediction holds the engine while SLOTS - 1 more start. Their output folders, SLOTS of
   them and all empty, show every slot running in predict(): the last start proved every earlier
   folder read, and none can return while they stay empty. The returned files on disk must then be
   within the budget, the newest kept; once the held ones return, within the budget or their own
   bytes, whichever is more.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from cogserver import ROOT, CogServer, WebhookReceiver

SLOTS = 4
ROUNDS = 4
SEQUENTIAL = 4
BUDGET = 1_000_000  # bytes: LCM_KEEP_OUTPUTS_MB=1
REQUEST = {  # about 310 kB of PNG: 2 images of 256x256 at compress level 1 from the tiny checkpoint
    "prompt": "a lighthouse",
    "width": 256,
    "height": 256,
    "num_images": 2,
    "num_inference_steps": 1,
    "output_format": "png",
    "disable_safety_checker": True,
}
HOLD = {**REQUEST, "num_images": 4, "num_inference_steps": 50}  # seconds of steps, cancelled within one
EARLY = "and Cog had read them"  # ends predict.py's line for files removed before LCM_KEEP_OUTPUTS_S
WAIT_S = 120.0  # for a state to show before the test gives up (a bound on hanging, not a timing)


def files_bytes(root: Path) -> int:
    """Bytes of every file under root (files removed meanwhile count as gone)."""
    total = 0
    for path in root.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total


def output_folders(root: Path) -> dict[str, int]:
    """Each output folder (tempfile.mkdtemp(prefix="lcm-")) under root and the bytes of its files."""
    folders = {}
    for folder in root.glob("lcm-*"):
        try:
            folders[folder.name] = sum(f.stat().st_size for f in folder.iterdir())
        except FileNotFoundError:  # removed meanwhile
            continue
    return folders


def answer_bytes(result: dict[str, Any], images: int) -> int:
    """The bytes of a succeeded answer's files, each a whole PNG of the requested size."""
    assert result["status"] == "succeeded", result.get("error")
    assert len(result["output"]) == images, f"{len(result['output'])} of {images} files came back"
    total = 0
    for url in result["output"]:
        data = base64.b64decode(url.partition(",")[2])
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a cut file fails here
            assert (image.format, image.size) == ("PNG", (REQUEST["width"], REQUEST["height"]))
        total += len(data)
    return total


def wait_for(what: str, found: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (value := found()):
        assert time.monotonic() < deadline, f"never saw {what} in {WAIT_S:.0f}s"
        time.sleep(0.005)
    return value


class Sampler:
    """The most bytes seen on disk under root, polled in a thread."""

    def __init__(self, root: Path) -> None:
        self.root, self.most, self.folders = root, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.most = max(self.most, files_bytes(self.root))
            self.folders = max(self.folders, sum(1 for size in output_folders(self.root).values() if size))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_returned_outputs_stay_within_the_byte_budget_once_read_and_no_answer_loses_a_file(
    tiny_checkpoint, openapi_schema, tmp_path
):
    tmpdir = tmp_path / "server-tmp"
    tmpdir.mkdir()
    env = {
        "TMPDIR": str(tmpdir),
        "COG_MAX_CONCURRENCY": str(SLOTS),
        "LCM_KEEP_OUTPUTS_MB": str(BUDGET / 1e6),
        "LCM_BATCH_PIXELS": str(SLOTS * REQUEST["num_images"] * 256 * 256),
    }
    server = CogServer(tiny_checkpoint, openapi_schema, env=env)
    webhooks = WebhookReceiver()
    try:
        server.wait_until({"READY"})

        def client(k: int) -> int:
            sent = 0
            for r in range(ROUNDS):
                status, result = server.predict(**REQUEST, seed=k * ROUNDS + r)
                assert status == 200, result
                sent += answer_bytes(result, REQUEST["num_images"])
            return sent

        sampler = Sampler(tmpdir)
        with ThreadPoolExecutor(SLOTS) as pool:
            sent = sum(pool.map(client, range(SLOTS)))
        sampler.stop()

        sequential = []  # (folder, bytes) of each, in the order they returned
        for i in range(SEQUENTIAL):
            before = set(output_folders(tmpdir))
            status, result = server.predict(**REQUEST, seed=1000 + i)
            assert status == 200, result
            (folder,) = set(output_folders(tmpdir)) - before
            sequential.append((folder, answer_bytes(result, REQUEST["num_images"])))
        on_disk = output_folders(tmpdir)
        assert all(on_disk.get(folder) == size for folder, size in sequential)  # unproven: all stay
        assert sum(size for _, size in sequential) > BUDGET

        before = set(output_folders(tmpdir))
        status, started = server.start("hold", webhooks.url, **HOLD)
        assert status == 202, started
        wait_for("the held prediction's folder", lambda: set(output_folders(tmpdir)) - before)
        with ThreadPoolExecutor(SLOTS - 1) as pool:
            answers = [pool.submit(server.predict, **REQUEST, seed=2000 + k) for k in range(SLOTS - 1)]

            def all_slots_in_predict() -> set[str]:
                new = {name: size for name, size in output_folders(tmpdir).items() if name not in before}
                return set(new) if len(new) == SLOTS and not any(new.values()) else set()

            running = wait_for(f"{SLOTS} empty output folders at once", all_slots_in_predict)
            held = output_folders(tmpdir)
            held_bytes = files_bytes(tmpdir)
            assert all_slots_in_predict() == running, "a held prediction returned during the count"
            assert server.cancel("hold") == 200
            hold = webhooks.completed("hold")
            assert hold["status"] == "canceled"
            results = []
            for answer in answers:
                status, result = answer.result()
                assert status == 200, result
                results.append(result)

        kept = [folder for folder, _ in sequential if held.get(folder)]
        assert held_bytes <= BUDGET
        assert held_bytes > BUDGET - max(size for _, size in sequential)  # no more removed than needed
        assert kept == [folder for folder, _ in sequential[len(sequential) - len(kept) :]]  # oldest first
        assert sum(1 for size in held.values() if size) == len(kept)  # nothing older than those kept
        assert any(EARLY in r.get("logs", "") for r in [*results, hold])  # the byte rule said so
        last = sum(answer_bytes(result, REQUEST["num_images"]) for result in results)
        final = files_bytes(tmpdir)
        assert last <= final <= max(BUDGET, last)
    finally:
        webhooks.close()
        server.stop()
    print(
        f"\nbudget {BUDGET} B; {SLOTS} clients x {ROUNDS} predictions sent {sent} B, at most "
        f"{sampler.most} B on disk at once ({sampler.folders} folders with files); with every slot in "
        f"predict(): {held_bytes} B; after the last {SLOTS - 1} returned: {final} B (their answers: "
        f"{last} B)",
        flush=True,
    )


def test_cog_reads_returned_files_after_predict_returns_and_leaves_a_missing_one_out(
    tiny_checkpoint, tmp_path
):
    """What ReturnedOutputs is built on: the worker does not read a returned file (a missing one would
    fail the prediction there); Cog's server reads it later, and one gone by then is left out of an
    answer that still succeeds, which only the server's log tells."""
    predictor = f"{ROOT / 'tests' / 'missing_output_predictor.py'}:Predictor"
    server = CogServer(tiny_checkpoint, None, env={"TMPDIR": str(tmp_path)}, predictor=predictor)
    try:
        server.wait_until({"READY"})
        status, result = server.predict()
    finally:
        server.stop()
    assert status == 200 and result["status"] == "succeeded", result
    (kept,) = result["output"]
    with Image.open(io.BytesIO(base64.b64decode(kept.partition(",")[2]))) as image:
        assert image.size == (8, 8)
    assert "Failed to read FileOutput" in server.stderr_path.read_text()
