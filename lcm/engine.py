"""One loaded model serving requests: each travels submit -> queue -> batch -> files -> settled.

The engine owns one thread (lcm.worker) and does all its model work there: loading (lcm.model),
warm-up and every batch (lcm.generation), whichever thread calls. Requests wait in lcm.batching's
queue until the engine takes those that fit the same passes; each then gets its files
(lcm.outputs) and log line (lcm.summary), or its own error, on its own. Generation runs under
torch.inference_mode, on modules whose parameters never require grad, so nothing keeps autograd
state while serving.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lcm import accel, allocator, batching, generation, model, outputs, prompts, summary
from lcm.errors import LCMError
from lcm.generation import Generation, StepCallback
from lcm.loading import pick_device
from lcm.outputs import Served
from lcm.params import Request
from lcm.worker import CancelFlag, Cancelled, EngineThread, Job

WARM_UP_PROMPT = "warm-up"

log = logging.getLogger("lcm")


class Engine:
    """The loaded model, the one thread that uses it, and the queue of requests waiting for it.

    Every public method may be called from any thread: the work runs on the engine's thread,
    one batch at a time, and the caller waits.
    """

    def __init__(self, loaded: model.Model, thread: EngineThread) -> None:
        self.model = loaded
        self.thread = thread
        self.queue = batching.Queue()  # submitted requests, until a batch takes them

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        device: str | None = None,
        lora_path: str | os.PathLike | None = None,
        dtype: str | None = None,
    ) -> "Engine":
        """Load from a local weights directory (default: LCM_WEIGHTS_DIR, else weights/), with the
        trained LoRA at `lora_path` (a local .safetensors, see lcm.lora.fetch) on the UNet if given,
        in `dtype` ("float32", "bfloat16", ...; default: loading.choose_dtype's choice).

        Loading, and everything after, runs on the engine's own new thread.
        """
        dev = pick_device(device)
        if accel.holds_memory(dev):  # before the thread starts, so that it allocates in the main arena
            allocator.hold_freed_memory(True)
        thread = EngineThread()
        try:
            return thread.call(cls._load, path, dev, thread, lora_path, dtype)
        except BaseException:
            thread.stop()
            raise

    @classmethod
    def _load(
        cls,
        path: str | os.PathLike | None,
        dev: torch.device,
        thread: EngineThread,
        lora_path: str | os.PathLike | None,
        dtype: str | None,
    ) -> "Engine":
        engine = cls(model.load(path, dev, lora_path, dtype), thread)
        if engine.model.accel.compile:
            start = time.perf_counter()
            engine.warm_up()
            log.info(
                "warm-up: %d size(s) compiled in %.1fs",
                len(engine.model.accel.compile_sizes),
                time.perf_counter() - start,
            )
        return engine

    def warm_up(self) -> None:
        """Compile (and record CUDA graphs) for each declared size now, then seal: no request compiles.

        A run sees every input signature of its size: the first step's latents and the later
        steps'. CUDA graph trees record on a function's second call and replay from the third.
        """
        runs = 3 if self.model.accel.cuda_graphs else 1
        for width, height, images_ in self.model.accel.compile_sizes:
            request = Request.build(
                WARM_UP_PROMPT,
                width=width,
                height=height,
                num_images=images_,
                seed=0,
                disable_safety_checker=True,
            )
            for _ in range(runs):
                self.generate_batch([request], [CancelFlag()])
        for module in self.model.compiled:
            module.seal()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the engine thread, under inference mode, waiting for it."""
        return self.thread.call(_inference(fn), *args, **kwargs)

    def close(self) -> None:
        """End the engine thread once its queued work is done."""
        self.thread.stop()

    def submit(self, request: Request, out_dir: str | os.PathLike) -> Job[Served]:
        """Queue the request's files for the engine; returns at once with its Job.

        `job.result()` (or `await job.outcome()`) gives the files and log line, or re-raises the request's
        error; `job.cancel()` stops it at the next step or stage boundary, and a cancelled
        request leaves no files. Requests queued meanwhile that fit the same passes are served
        together (lcm.batching), within the device's batch budget.
        """
        self.model.check(request)
        job: Job[Served] = Job()
        self.queue.put(batching.Pending(request, Path(out_dir), job))
        self.thread.submit(self._serve_queue)  # finds its request already served when batched earlier
        return job

    def generate_files(self, request: Request, out_dir: str | os.PathLike) -> list[Path]:
        """submit() and wait, then log the request's line; interrupted while waiting (Ctrl-C), the
        request is cancelled first."""
        job = self.submit(request, out_dir)
        try:
            served = job.result()
        except BaseException:
            job.cancel_and_wait()
            raise
        log.info("%s", served.summary)
        return served.paths

    def generate(
        self,
        request: Request,
        on_step: Optional[StepCallback] = None,
        cancel: Optional[CancelFlag] = None,
    ) -> Generation:
        """Every image of the request, with the safety checker's verdicts when it is on; no files.

        Runs on the engine thread. `on_step(i, t)` is called there after each step; a set
        `cancel` flag stops the request at the next step or stage boundary with worker.Cancelled.
        Running out of device memory fails this request only: the memory is given back and the
        error says what to ask for instead.
        """
        self.model.check(request)
        return self.thread.call(self._generate_one, request, on_step, cancel)

    def _generate_one(
        self, request: Request, on_step: Optional[StepCallback], cancel: Optional[CancelFlag]
    ) -> Generation:
        try:
            (generated,) = self.generate_batch([request], [cancel or CancelFlag()], on_step)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc, [request]) from None
        if generated is None:
            raise Cancelled()
        return generated

    def generate_batch(
        self, requests: list[Request], cancels: list[CancelFlag], on_step: Optional[StepCallback] = None
    ) -> list[Optional[Generation]]:
        """lcm.generation.generate_batch on this engine's model; on the engine thread."""
        return generation.generate_batch(self.model, requests, cancels, on_step)

    def summary(self, generated: Generation) -> str:
        """The request's log line (lcm.summary)."""
        return summary.line(generated, self.model)

    def _shape_key(self, item: batching.Pending) -> Any:
        windows, _ = prompts.count_windows(
            self.model.pipe.tokenizer, item.request.prompt, item.request.compel
        )
        return batching.shape_key(item.request, windows)

    def _serve_queue(self, _flag: CancelFlag) -> None:
        """On the engine thread: the next batch from the queue (nothing if it was served already)."""
        items = []
        for item in self.queue.take(self._shape_key, self.model.accel.batch_pixels):
            if item.job.cancel_flag.is_set():
                item.job.settle(error=Cancelled())
            else:
                items.append(item)
        if items:
            self._serve(items)

    def _serve(self, items: list[batching.Pending]) -> None:
        """Generate the batch, then write and settle each request on its own: one failing fails alone."""
        requests = [item.request for item in items]
        try:
            generations = self.generate_batch(requests, [item.job.cancel_flag for item in items])
        except BaseException as exc:
            if len(items) > 1:  # whatever broke the batch (memory, say): each request alone
                log.warning("a batch of %d requests failed (%s): serving each alone", len(items), exc)
                self.model.free_memory()
                for item in items:
                    self._serve([item])
                return
            if isinstance(exc, torch.OutOfMemoryError):
                exc = self._out_of_memory(exc, requests)
            items[0].job.settle(error=exc)
            return
        for item, generated in zip(items, generations, strict=True):
            try:
                item.job.settle(self._files(item, generated))
            except BaseException as exc:  # this request's own failure: every image flagged, say
                item.job.settle(error=exc)

    def _files(self, item: batching.Pending, generated: Optional[Generation]) -> Served:
        """The request's files and line; a request whose every image was flagged fails, its line logged
        here (the server's log), as the prediction fails without it."""
        if generated is None:
            raise Cancelled()
        paths = outputs.write(generated, self.model, item.out_dir, item.job.cancel_flag)
        line = self.summary(generated)
        if not paths:
            log.info("%s", line)
            raise outputs.all_flagged(generated.request)
        return Served(paths, line)

    def _out_of_memory(self, exc: BaseException, requests: list[Request]) -> LCMError:
        log.warning("out of memory: %s", exc)
        self.model.free_memory()
        r, images_ = requests[0], sum(r.num_images for r in requests)
        return LCMError(
            f"out of {self.model.device.type.upper()} memory generating {images_} image(s) at "
            f"{r.width}x{r.height}: try a smaller size or fewer images"
        )


def _inference(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run
