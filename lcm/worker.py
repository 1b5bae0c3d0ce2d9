"""The engine's own thread: it owns the model and the device; other threads hand it work and wait.

Cog runs setup() on the worker's main thread and each predict() on another thread, a different
one from request to request (coglet 0.23), and torch keeps state per thread: CUDA graph trees
(torch 2.11 asserts when a compiled function is called from a thread other than the one that
imported them), OpenMP thread teams, glibc arenas. Every load, warm-up and generation runs here
instead, on one long-lived thread, whichever thread asked.

A cancellation is a flag the work reads at its own boundaries (between denoising steps, before
decoding, before writing files): nothing is ever raised into this thread from outside.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from typing import Any, Callable, Generic, Optional, TypeVar

from lcm.errors import LCMError

T = TypeVar("T")

# How often a waiting thread returns to Python: Cog cancels a sync predict() by raising
# CancelationException in its thread at the next bytecode, which a blocked wait never reaches.
POLL_S = 0.02
THREAD_NAME = "lcm-engine"


class Cancelled(LCMError):
    """The job's cancel flag was seen at a boundary; raised on the engine thread by the work itself."""

    def __init__(self) -> None:
        super().__init__("the request was cancelled")


class CancelFlag:
    """Set by any thread; read by the engine thread at step and stage boundaries."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise Cancelled if the flag is set: call only from the work, at a boundary."""
        if self._event.is_set():
            raise Cancelled()


class Job(Generic[T]):
    """One piece of work for the engine thread, its cancel flag and, once done, its outcome.

    Either it carries its own `work`, which `run` calls, or (work None) the engine settles it
    from the batch that served it.
    """

    def __init__(self, work: Optional[Callable[[CancelFlag], T]] = None) -> None:
        self.work = work
        self.cancel_flag = CancelFlag()
        self._done = threading.Event()
        self._result: Optional[T] = None
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def run(self) -> None:
        """On the engine thread: the work, keeping its result or exception for the waiting thread."""
        try:
            if self.cancel_flag.is_set():
                raise Cancelled()
            self.settle(self.work(self.cancel_flag))  # type: ignore[misc]
        except BaseException as exc:  # handed to the waiting thread, whatever it was
            self.settle(error=exc)
        finally:
            self.work = None  # drop what the closure holds

    def settle(self, result: Optional[T] = None, error: Optional[BaseException] = None) -> None:
        """Record the outcome (once; later calls are ignored) and wake whoever waits."""
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error = result, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def _when_done(self, callback: Callable[[], None]) -> None:
        """callback() once the job is done: now if it is, else from the thread that settles it."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> T:
        """Wait for the outcome: the work's return value, or its exception re-raised in this thread.

        The wait returns to Python every POLL_S, so an exception Cog injects into this thread
        (its cancellation) lands within that time; the caller then calls `cancel_and_wait`.
        """
        while not self._done.wait(POLL_S):
            pass
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    async def outcome(self) -> T:
        """Await the outcome in an event loop (Cog's, for an async predict), without polling.

        Cog cancels an async predict with asyncio.CancelledError at this await; the caller then
        awaits `cancelled`.
        """
        await self._settled()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    async def cancelled(self) -> None:
        """Set the flag and await the engine letting go of the job, whatever lands meanwhile."""
        self.cancel_flag.set()
        while not self._done.is_set():
            try:
                await self._settled()
            except asyncio.CancelledError:  # a repeated cancellation: keep waiting
                continue

    async def _settled(self) -> None:
        loop = asyncio.get_running_loop()
        settled = loop.create_future()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(lambda: settled.done() or settled.set_result(None))
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

        self._when_done(wake)
        await settled

    def cancel(self) -> None:
        self.cancel_flag.set()

    def cancel_and_wait(self) -> None:
        """Set the flag and wait until the engine has let go of the job, whatever lands meanwhile.

        A second cancellation injected while waiting must not leave the engine still writing the
        files its caller is about to remove.
        """
        self.cancel_flag.set()
        while not self._done.is_set():
            try:
                self._done.wait(POLL_S)
            except BaseException:  # noqa: S110 (a repeated cancellation: keep waiting)
                continue


def _serve(jobs: "queue.SimpleQueue[Optional[Job[Any]]]") -> None:
    """The thread's loop: run jobs in arrival order until told to stop (None)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        job.run()


class EngineThread:
    """One daemon thread that runs submitted work in order; `call` runs inline when already on it."""

    def __init__(self, name: str = THREAD_NAME) -> None:
        self._jobs: queue.SimpleQueue[Optional[Job[Any]]] = queue.SimpleQueue()
        # The loop holds only the queue, so an engine dropped by its owner is collected and its
        # finaliser stops the thread.
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)

    @property
    def ident(self) -> Optional[int]:
        return self._thread.ident

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, work: Callable[[CancelFlag], T]) -> Job[T]:
        """Queue `work(cancel_flag)`; returns at once with its Job."""
        if not self._thread.is_alive():
            raise LCMError("the engine thread has stopped; load the engine again")
        job: Job[T] = Job(work)
        self._jobs.put(job)
        return job

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the engine thread, waiting for it (inline when already on it)."""
        if self.is_current():
            return fn(*args, **kwargs)
        job = self.submit(lambda _flag: fn(*args, **kwargs))
        try:
            return job.result()
        except BaseException:
            if not job.done:  # interrupted while waiting: let the engine finish before going on
                job.cancel_and_wait()
            raise

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        self._finalizer()
        if not self.is_current():
            self._thread.join()
