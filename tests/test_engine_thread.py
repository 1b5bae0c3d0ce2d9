"""One engine thread does all model work; other threads hand it requests, wait, and cancel by a flag."""

from __future__ import annotations

import ctypes
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cogserver import ROOT, CogServer
from lcm.params import Request
from lcm.worker import POLL_S, Cancelled, EngineThread
from probe_predictor import PROBE

MODULES = ("unet", "vae", "text_encoder", "safety_checker")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("input") / "in.png"
    Image.fromarray(np.linspace(0, 255, 256 * 256 * 3).reshape(256, 256, 3).astype(np.uint8)).save(path)
    return path


def request(**kw) -> Request:
    return Request.build(**{"prompt": "a cat", "width": 256, "height": 256, "seed": 3, **kw})


@pytest.fixture
def watched(engine):
    """(threads, grad) seen by every forward of the engine's modules while the test runs."""
    seen: dict[str, list] = {"threads": [], "grad": []}

    def note(module, args, kwargs):
        seen["threads"].append(threading.get_ident())
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        seen["grad"].append(
            (
                torch.is_grad_enabled(),
                torch.is_inference_mode_enabled(),
                any(t.requires_grad for t in tensors),
            )
        )

    handles = [
        getattr(engine.model.pipe, name).register_forward_pre_hook(note, with_kwargs=True) for name in MODULES
    ]
    yield seen
    for handle in handles:
        handle.remove()


def test_generations_from_many_threads_all_run_on_the_engine_thread(engine, watched, image_file):
    requests = [request(), request(num_images=2), request(image=str(image_file), num_inference_steps=2)]
    with ThreadPoolExecutor(3) as pool:
        callers = list(pool.map(lambda r: (threading.get_ident(), engine.generate(r)), requests))
    assert len(watched["threads"]) >= 3 * 4
    assert set(watched["threads"]) == {engine.thread.ident}
    assert engine.thread.ident not in {ident for ident, _ in callers}


def test_no_tensor_in_a_request_requires_grad(engine, watched, image_file):
    params = [p for name in MODULES for p in getattr(engine.model.pipe, name).parameters()]
    assert params and not any(p.requires_grad for p in params)
    engine.generate(request(image=str(image_file), num_inference_steps=2))
    engine.generate(request(prompt="a cat " * 60))  # two token windows
    assert watched["grad"] and set(watched["grad"]) == {(False, True, False)}


def test_loading_runs_on_the_engine_thread(tiny_checkpoint, monkeypatch):
    import lcm.engine
    import lcm.model

    threads = []
    load = lcm.model.load_pipeline
    monkeypatch.setattr(
        lcm.model, "load_pipeline", lambda *a, **k: threads.append(threading.get_ident()) or load(*a, **k)
    )
    engine = lcm.engine.Engine.load(tiny_checkpoint, device="cpu")
    try:
        assert threads == [engine.thread.ident] != [threading.get_ident()]
    finally:
        engine.close()


def test_a_cancel_flag_stops_the_request_after_the_current_step(engine, tmp_path):
    passes = []
    handle = engine.model.pipe.unet.register_forward_pre_hook(lambda *_: passes.append(1))
    holder = {}

    def cancel_at_second_step(step: int, timestep) -> None:
        if step == 1:
            holder["job"].cancel()

    generate_batch = engine.generate_batch
    try:
        engine.generate_batch = lambda rs, cs, on_step=None: generate_batch(rs, cs, cancel_at_second_step)
        holder["job"] = engine.submit(request(num_inference_steps=20), tmp_path / "out")
        with pytest.raises(Cancelled):
            holder["job"].result()
    finally:
        del engine.generate_batch
        handle.remove()
    assert len(passes) == 2  # the step that saw the flag was the last
    assert not list((tmp_path / "out").glob("*"))
    assert engine.generate(request(num_inference_steps=1)).pixels.shape == (1, 256, 256, 3)


def test_a_job_cancelled_before_it_starts_never_runs(engine, tmp_path):
    gate = threading.Event()
    blocker = engine.thread.submit(lambda _flag: gate.wait(10))
    job = engine.submit(request(), tmp_path / "out")
    job.cancel()
    gate.set()
    blocker.result()
    with pytest.raises(Cancelled):
        job.result()
    assert not (tmp_path / "out").exists()


def test_an_exception_injected_into_a_waiting_thread_lands_within_a_poll(engine, tmp_path):
    """Cog cancels a sync predict() with PyThreadState_SetAsyncExc in its thread: mimic it exactly."""

    class Injected(BaseException):
        pass

    outcome: dict = {}
    started = threading.Event()

    def waiting_caller() -> None:
        job = engine.submit(request(num_inference_steps=50), tmp_path / "out")
        started.set()
        try:
            job.result()
        except Injected:
            outcome["landed"] = time.monotonic()
            job.cancel_and_wait()
            outcome["stopped"] = time.monotonic()

    caller = threading.Thread(target=waiting_caller)
    caller.start()
    started.wait(10)
    time.sleep(0.3)  # inside the denoising loop
    sent = time.monotonic()
    assert (
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(caller.ident), ctypes.py_object(Injected))
        == 1
    )
    caller.join(30)
    assert outcome["landed"] - sent < 10 * POLL_S + 0.5
    assert not list((tmp_path / "out").glob("*"))
    assert engine.generate(request(num_inference_steps=1)).pixels.shape == (1, 256, 256, 3)


def test_errors_on_the_engine_thread_reach_the_caller_and_the_thread_serves_on():
    thread = EngineThread()
    try:
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        assert thread.call(threading.get_ident) == thread.ident != threading.get_ident()
    finally:
        thread.stop()


def test_through_cogs_server_every_prediction_runs_on_the_one_engine_thread(tiny_checkpoint, openapi_schema):
    server = CogServer(
        tiny_checkpoint, openapi_schema, predictor=f"{ROOT / 'tests' / 'probe_predictor.py'}:Predictor"
    )
    inputs = [
        {"width": 256, "height": 256},
        {"width": 320, "height": 256, "num_images": 2},
        {"width": 256, "height": 256, "prompt": "a cat " * 60},
    ]
    try:
        server.wait_until({"READY"})

        turn = threading.Lock()  # one slot: the clients take turns rather than racing for it

        def client(extra: dict) -> list[tuple[str, ...]]:
            found = []
            for seed in (1, 2):
                with turn:
                    status, body = server.predict(
                        **{"prompt": "a cat", "num_inference_steps": 2, "seed": seed, **extra}
                    )
                assert status == 200 and body["status"] == "succeeded", body
                found.append(PROBE.search(body["logs"]).groups())
            return found

        with ThreadPoolExecutor(3) as pool:
            probes = [p for found in pool.map(client, inputs) for p in found]
    finally:
        server.stop()
    setups, loads, engines, predicts, models = (set(column) for column in zip(*probes, strict=True))
    (engine_thread,) = engines
    print(f"predict() ran on {len(predicts)} thread(s); the model on {models}")
    assert len(probes) == 6
    assert models == {engine_thread} and loads == {engine_thread}
    assert engine_thread not in setups | predicts
