"""One owner of the device: batches requests from all sessions on its worker threads.

Pipelines register batch *kinds* (e.g. "encode", "decode"), each with its batch sizes
(default: the engine's); a kind is a function from a list of items of one of its sizes to
a list of results. The most urgent waiting request (priority, then age) picks the kind;
that kind's requests are drained up to its largest size, padded with the kind's empty item
to the next of its sizes (so jitted calls only ever see the shapes compiled by
`warmup()`), and run off the event loop. The engine is the only place that pads batches.
Futures are resolved on their own loop via `call_soon_threadsafe`.

Overload (docs/scale-out.md, *Overload*): a `best_effort` request (a partial) is not run
when the engine is busy: it is refused while another request already waits, and one that
waits is dropped when a more urgent request (a final) is queued; both come back as None
and are counted (`shed`). So partials thin out first, and a final waits behind no partial
but the ones already running. `busy_fraction()` is the share of the workers' time spent
running batches over the last `BUSY_WINDOW_S`, which `/healthz` reports as the load.
"""

from __future__ import annotations

import asyncio
import logging
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
# busy_fraction()'s window: long enough to smooth single batches, short enough that a load
# balancer polling /healthz every second sees a change of load within a few polls.
BUSY_WINDOW_S = 5.0


@dataclass(frozen=True)
class BatchKind(Generic[T, R]):
    fn: Callable[[list[T]], Sequence[R]]  # len(result) == len(items) == one of `sizes`
    pad: T  # the empty slot used to fill a bucket
    sizes: tuple[int, ...]  # batch sizes, ascending: each is compiled at warm-up

    def bucket(self, n: int) -> int:
        """Smallest of this kind's batch sizes that holds n requests (n <= the largest)."""
        return next(b for b in self.sizes if b >= n)


@dataclass
class _Request:
    kind: str
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    priority: int = 0
    best_effort: bool = False


class Engine:
    """`await engine.submit(kind, item)` from any session; results come back per request.

    `workers` threads take batches from one pending list: the most urgent request (highest
    `priority`, then oldest) picks the kind, and that kind's waiting requests are batched.
    Jitted calls release the GIL, so a second worker overlaps one call's single-threaded
    stretches (host-side padding, small decode steps) with another call. Measured with the
    whisper pipeline and tiny.en, 4 concurrent sessions (8 partials + 1 final each),
    alternating rounds on the shared 2-core machine (load ~4 from others): 2 workers
    wall 8.9 s, final median 1.40 s, partial 0.80 s; 1 worker 10.2 s, 1.72 s, 0.94 s.
    """

    def __init__(
        self,
        batch_sizes: Sequence[int] = (1, 2, 4, 8),
        max_queue: int = 256,
        observe: Callable[[str, int, int, float], None] | None = None,
        workers: int = 2,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.workers = workers
        self._kinds: dict[str, BatchKind] = {}
        self._pending: list[_Request] = []  # guarded by _cond; submit() bounds it
        self._cond = threading.Condition()
        self.max_queue = max_queue
        self._stopping = False
        self._exit: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        self._threads: list[threading.Thread] = []
        self._running = 0  # worker threads not yet finished
        # observe(kind, real, bucket, seconds): metrics hook, called on a worker thread.
        self._observe = observe
        self.batches_run = 0
        self.shed = 0  # best-effort requests not run (refused or dropped while waiting)
        self.busy_s = 0.0  # seconds the workers spent running batches, summed
        # (start, end) of batches that ended within BUSY_WINDOW_S, and the start of each
        # batch running now (by worker thread): busy_fraction() sums their overlap.
        self._recent: deque[tuple[float, float]] = deque()
        self._running_since: dict[int, float] = {}

    def add_kind(self, name: str, fn: Callable[[list[T]], Sequence[R]], pad: T,
                 batch_sizes: Sequence[int] | None = None) -> None:
        """Registers a kind; `batch_sizes` (default: the engine's) are the only batch
        shapes its `fn` gets, each run once by `warmup()`."""
        if self._threads:
            raise RuntimeError("add kinds before start()")
        sizes = tuple(sorted(set(batch_sizes or self.batch_sizes)))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"engine kind {name!r}: batch sizes must be >= 1, got {sizes}")
        self._kinds[name] = BatchKind(fn, pad, sizes)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a worker (not those being run)."""
        return len(self._pending)

    def warmup(self) -> float:
        """Run every kind at each of its batch sizes (compiles them); call before reporting
        ready.

        Runs on the calling thread, before start(): no request can interleave. Returns seconds.
        """
        t0 = time.perf_counter()
        for name, kind in self._kinds.items():
            for size in kind.sizes:
                results = kind.fn([kind.pad] * size)
                if len(results) != size:
                    raise InternalError(f"engine kind {name!r} returned {len(results)} of {size}")
        return time.perf_counter() - t0

    def start(self) -> None:
        self._stopping = False
        self._running = self.workers
        self._threads = [
            threading.Thread(target=self._worker, name=f"streamd-engine-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def busy_fraction(self, window: float = BUSY_WINDOW_S) -> float:
        """Share (0..1) of the workers' time spent running batches over the last `window`
        seconds (at most BUSY_WINDOW_S), batches still running included."""
        now = time.perf_counter()
        lo = now - window
        with self._cond:
            busy = sum(end - max(start, lo) for start, end in self._recent if end > lo)
            busy += sum(now - max(start, lo) for start in self._running_since.values())
        return min(1.0, busy / (window * self.workers))

    async def submit(self, kind: str, item: Any, priority: int = 0,
                     best_effort: bool = False) -> Any:
        """Queue one request and await its result. Raises Overloaded when the queue is full.

        Higher `priority` runs first (finals over partials); equal priorities in order.
        `best_effort` (partials): returns None without running when another request already
        waits, or when a request of higher priority is queued while this one waits (it
        would delay that one's caller behind this one, see the module docstring).
        """
        if kind not in self._kinds:
            raise InternalError(f"unknown engine kind {kind!r}")
        if not self.alive or self._stopping:
            raise InternalError("engine is not running")
        loop = asyncio.get_running_loop()
        request = _Request(kind, item, loop.create_future(), loop, time.perf_counter(), priority)
        request.best_effort = best_effort
        with self._cond:
            if best_effort and self._pending:
                self.shed += 1
                return None
            if len(self._pending) >= self.max_queue:
                raise Overloaded("engine queue is full")
            shed = [r for r in self._pending if r.best_effort and r.priority < priority]
            if shed:
                # A session awaits one request at a time: a final queued behind its own
                # waiting partial would also wait for everything more urgent than that
                # partial. Dropping the waiting partials frees those sessions at once.
                dropped = {id(r) for r in shed}
                self._pending = [r for r in self._pending if id(r) not in dropped]
                self.shed += len(shed)
            self._pending.append(request)
            self._cond.notify()
        for r in shed:
            r.loop.call_soon_threadsafe(_resolve, r.future, None, None)
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller gave up (its session ended, or a final superseded this partial):
            # a request not yet taken by a worker leaves the queue instead of running.
            with self._cond:
                self._pending = [r for r in self._pending if r is not request]
            raise

    async def stop(self) -> None:
        """Finish queued requests, then end the worker threads (awaitable with a timeout)."""
        if not self._threads:
            return
        if any(t.is_alive() for t in self._threads):
            loop = asyncio.get_running_loop()
            self._exit = (loop, loop.create_future())
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            await self._exit[1]
        self._threads = []

    def _worker(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._run(batch[0].kind, batch)
        finally:
            with self._cond:
                self._running -= 1
                last = self._running == 0
            if last and self._exit is not None:
                loop, future = self._exit
                loop.call_soon_threadsafe(_resolve, future, None, None)

    def _next_batch(self) -> list[_Request] | None:
        """Blocks until work is pending (no polling); None once stopping and drained."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            # max() keeps the first of equal priorities: the oldest most urgent request.
            lead = max(self._pending, key=lambda r: r.priority)
            most = self._kinds[lead.kind].sizes[-1]
            batch = [r for r in self._pending if r.kind == lead.kind][:most]
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
            return batch

    def _run(self, kind: str, batch: list[_Request]) -> None:
        spec = self._kinds[kind]
        size = spec.bucket(len(batch))
        items = [r.item for r in batch] + [spec.pad] * (size - len(batch))
        t0 = time.perf_counter()
        worker = threading.get_ident()
        with self._cond:
            self._running_since[worker] = t0
        try:
            results = spec.fn(items)
            error: BaseException | None = None
        except StreamdError as exc:
            error = exc
        except Exception as exc:  # model code: convert where it enters streamd
            log.exception("engine batch %s failed", kind)
            error = InternalError(f"{kind} batch failed: {type(exc).__name__}")
        t1 = time.perf_counter()
        with self._cond:
            self.batches_run += 1
            self.busy_s += t1 - t0
            self._running_since.pop(worker, None)
            self._recent.append((t0, t1))
            while self._recent and self._recent[0][1] <= t1 - BUSY_WINDOW_S:
                self._recent.popleft()
        if self._observe is not None:
            self._observe(kind, len(batch), size, t1 - t0)
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
