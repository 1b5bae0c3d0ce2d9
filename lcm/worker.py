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
    """One piece of work queued for the engine thread, its cancel flag and, once done, its outcome."""

    def __init__(self, work: Callable[[CancelFlag], T]) -> None:
        self.work = work
        self.cancel_flag = CancelFlag()
        self._done = threading.Event()
        self._result: Optional[T] = None
        self._error: Optional[BaseException] = None

    def run(self) -> None:
        """On the engine thread: the work, keeping its result or exception for the waiting thread."""
        try:
            if not self.cancel_flag.is_set():
                self._result = self.work(self.cancel_flag)
            else:
                self._error = Cancelled()
        except BaseException as exc:  # handed to the waiting thread, whatever it was
            self._error = exc
        finally:
            self.work = None  # type: ignore[assignment]  # drop what the closure holds
            self._done.set()

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
