"""One owner of the device: batches requests from all sessions on its own worker thread.

Pipelines register batch *kinds* (e.g. "encode", "decode"); each kind is a function from a
fixed-size list of items to a list of results. Requests of the same kind are drained up to
the largest bucket, padded with the kind's empty item to the next bucket size (so jitted
calls only ever see the bucket shapes compiled by `warmup()`), and run off the event loop.
Futures are resolved on their own loop via `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from streamd.errors import InternalError, Overloaded, StreamdError

log = logging.getLogger("streamd.engine")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchKind(Generic[T, R]):
    fn: Callable[[list[T]], Sequence[R]]  # len(result) == len(items) == a bucket size
    pad: T  # the empty slot used to fill a bucket


@dataclass
class _Request:
    kind: str
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


_STOP = object()


class Engine:
    """`await engine.submit(kind, item)` from any session; results come back per request."""

    def __init__(
        self,
        batch_sizes: Sequence[int] = (1, 2, 4, 8),
        max_queue: int = 256,
        observe: Callable[[str, int, int, float], None] | None = None,
    ) -> None:
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_batch = self.batch_sizes[-1]
        self._kinds: dict[str, BatchKind] = {}
        # Unbounded underneath so the stop marker always fits; submit() enforces max_queue.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.max_queue = max_queue
        self._exit: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._thread: threading.Thread | None = None
        # observe(kind, real, bucket, seconds): metrics hook, called on the worker thread.
        self._observe = observe
        self.batches_run = 0

    def add_kind(self, name: str, fn: Callable[[list[T]], Sequence[R]], pad: T) -> None:
        if self._thread is not None:
            raise RuntimeError("add kinds before start()")
        self._kinds[name] = BatchKind(fn, pad)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def bucket(self, n: int) -> int:
        """Smallest batch size that holds n requests."""
        return next(b for b in self.batch_sizes if b >= n)

    def warmup(self) -> float:
        """Run every kind at every bucket size (compiles them); call before reporting ready.

        Runs on the calling thread, before start(): no request can interleave. Returns seconds.
        """
        t0 = time.perf_counter()
        for name, kind in self._kinds.items():
            for size in self.batch_sizes:
                results = kind.fn([kind.pad] * size)
                if len(results) != size:
                    raise InternalError(f"engine kind {name!r} returned {len(results)} of {size}")
        return time.perf_counter() - t0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="streamd-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, kind: str, item: Any) -> Any:
        """Queue one request and await its result. Raises Overloaded when the queue is full."""
        if kind not in self._kinds:
            raise InternalError(f"unknown engine kind {kind!r}")
        if not self.alive:
            raise InternalError("engine is not running")
        loop = asyncio.get_running_loop()
        request = _Request(kind, item, loop.create_future(), loop, time.perf_counter())
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded("engine queue is full")
        self._queue.put(request)
        return await request.future

    async def stop(self) -> None:
        """Finish queued requests, then end the worker thread (awaitable with a timeout)."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            loop = asyncio.get_running_loop()
            self._exit = (loop, loop.create_future())
            self._queue.put(_STOP)
            await self._exit[1]
        self._thread = None

    def _worker(self) -> None:
        try:
            self._serve()
        finally:
            if self._exit is not None:
                loop, future = self._exit
                loop.call_soon_threadsafe(_resolve, future, None, None)

    def _serve(self) -> None:
        held: deque[_Request] = deque()  # drained but of another kind than the batch run
        stopping = False
        while True:
            if not held:
                if stopping:
                    return
                first = self._queue.get()  # blocks: no polling
                if first is _STOP:
                    return
                held.append(first)
            # Drain what is already waiting, without blocking.
            while len(held) < 4 * self.max_batch:
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is _STOP:
                    stopping = True
                    break
                held.append(extra)
            kind = held[0].kind
            batch = [r for r in held if r.kind == kind][: self.max_batch]
            for r in batch:
                held.remove(r)
            self._run(kind, batch)

    def _run(self, kind: str, batch: list[_Request]) -> None:
        spec = self._kinds[kind]
        size = self.bucket(len(batch))
        items = [r.item for r in batch] + [spec.pad] * (size - len(batch))
        t0 = time.perf_counter()
        try:
            results = spec.fn(items)
            error: BaseException | None = None
        except StreamdError as exc:
            error = exc
        except Exception as exc:  # model code: convert where it enters streamd
            log.exception("engine batch %s failed", kind)
            error = InternalError(f"{kind} batch failed: {type(exc).__name__}")
        self.batches_run += 1
        if self._observe is not None:
            self._observe(kind, len(batch), size, time.perf_counter() - t0)
        for i, r in enumerate(batch):
            if error is None:
                r.loop.call_soon_threadsafe(_resolve, r.future, results[i], None)
            else:
                r.loop.call_soon_threadsafe(_resolve, r.future, None, error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting session was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
