"""Engine: batching across callers, fixed buckets, off-loop execution, no recompiles."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from streamd.engine import Engine
from streamd.errors import InternalError, Overloaded


def run(coro):
    return asyncio.run(coro)


def test_results_match_requests_and_buckets_are_fixed() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def square(items: list[int]) -> list[int]:
        gate.wait(5)  # hold the first batch so the rest queue up behind it
        seen.append(list(items))
        return [x * x for x in items]

    async def main() -> list[int]:
        engine = Engine(batch_sizes=(1, 2, 4), max_queue=64)
        engine.add_kind("square", square, pad=-1)
        engine.start()
        tasks = [asyncio.create_task(engine.submit("square", i)) for i in range(11)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*tasks)
        await engine.stop()
        return out

    assert run(main()) == [i * i for i in range(11)]
    assert all(len(b) in (1, 2, 4) for b in seen)
    real = [x for b in seen for x in b if x != -1]
    assert sorted(real) == list(range(11))
    # Requests from many callers shared batches: fewer calls than requests.
    assert len(seen) < 11 and max(len(b) for b in seen) == 4
    # Padding fills buckets with the kind's empty item only.
    assert all(x == -1 for b in seen for x in b[sum(v != -1 for v in b):])


def test_a_kind_gets_only_its_own_batch_sizes() -> None:
    """A kind registered with its own batch sizes is warmed at exactly those and gets no
    other shape: more waiting requests than its largest size are split by the engine."""
    seen: list[int] = []
    gate = threading.Event()

    def double(items: list[int]) -> list[int]:
        gate.wait(5)
        seen.append(len(items))
        return [2 * x for x in items]

    async def main() -> list[int]:
        engine = Engine(batch_sizes=(1, 2, 4, 8))
        engine.add_kind("double", double, pad=0, batch_sizes=(1, 2))
        gate.set()
        engine.warmup()
        assert seen == [1, 2]
        seen.clear()
        gate.clear()
        engine.start()
        tasks = [asyncio.create_task(engine.submit("double", i)) for i in range(7)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*tasks)
        await engine.stop()
        return out

    assert run(main()) == [2 * i for i in range(7)]
    assert seen and set(seen) <= {1, 2}
    with pytest.raises(ValueError):
        Engine().add_kind("bad", lambda items: items, pad=0, batch_sizes=(0, 1))


def test_kinds_are_batched_separately_and_in_order() -> None:
    calls: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def make(name: str):
        def fn(items: list[int]) -> list[str]:
            gate.wait(5)
            calls.append((name, items))
            return [f"{name}{x}" for x in items]
        return fn

    async def main() -> list[str]:
        engine = Engine(batch_sizes=(1, 2, 4, 8))
        engine.add_kind("a", make("a"), 0)
        engine.add_kind("b", make("b"), 0)
        engine.start()
        tasks = [asyncio.create_task(engine.submit("ab"[i % 2], i + 1)) for i in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*tasks)
        await engine.stop()
        return out

    assert run(main()) == [f"{'ab'[i % 2]}{i + 1}" for i in range(6)]
    for name, items in calls:
        assert all(x == 0 or "ab"[(x - 1) % 2] == name for x in items)


def test_runs_off_the_event_loop_thread() -> None:
    threads: list[int] = []

    def fn(items: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        return items

    async def main() -> int:
        engine = Engine(batch_sizes=(1,))
        engine.add_kind("id", fn, 0)
        engine.start()
        assert await engine.submit("id", 5) == 5
        await engine.stop()
        return threading.get_ident()

    loop_thread = run(main())
    assert threads and all(t != loop_thread for t in threads)


def test_errors_reach_every_request_and_engine_survives() -> None:
    def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad luck")
        return items

    async def main() -> None:
        engine = Engine(batch_sizes=(1, 2))
        engine.add_kind("k", fn, 0)
        engine.start()
        with pytest.raises(InternalError, match="k batch failed: ValueError"):
            await engine.submit("k", 13)
        assert await engine.submit("k", 7) == 7
        with pytest.raises(InternalError, match="unknown engine kind"):
            await engine.submit("nope", 1)
        await engine.stop()
        with pytest.raises(InternalError, match="not running"):
            await engine.submit("k", 1)

    run(main())


@pytest.mark.parametrize("workers", [1, 2])
def test_full_queue_is_overloaded(workers: int) -> None:
    gate = threading.Event()

    def fn(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def main() -> None:
        engine = Engine(batch_sizes=(1,), max_queue=2, workers=workers)
        engine.add_kind("k", fn, 0)
        engine.start()
        held = []
        for i in range(workers):  # each worker holds one request
            held.append(asyncio.create_task(engine.submit("k", i)))
            await asyncio.sleep(0.05)
        assert engine.queue_depth == 0
        queued = [asyncio.create_task(engine.submit("k", i)) for i in (10, 11)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await engine.submit("k", 12)
        gate.set()
        assert await asyncio.gather(*held, *queued) == [*range(workers), 10, 11]
        await engine.stop()

    run(main())


def test_urgent_requests_run_first() -> None:
    """A final (priority 1) submitted after partials runs before them."""
    gate = threading.Event()
    order: list[tuple[str, list[int]]] = []

    def make(name: str):
        def fn(items: list[int]) -> list[int]:
            gate.wait(5)
            order.append((name, [x for x in items if x]))
            return items
        return fn

    async def main() -> None:
        engine = Engine(batch_sizes=(1, 2), workers=1)
        engine.add_kind("partial", make("partial"), 0)
        engine.add_kind("final", make("final"), 0)
        engine.start()
        busy = asyncio.create_task(engine.submit("partial", 1))
        await asyncio.sleep(0.05)  # the worker is blocked on request 1
        later = [asyncio.create_task(engine.submit("partial", i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        final = asyncio.create_task(engine.submit("final", 4, priority=1))
        await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.gather(busy, *later, final) == [1, 2, 3, 4]
        await engine.stop()

    run(main())
    assert order == [("partial", [1]), ("final", [4]), ("partial", [2, 3])]


def test_best_effort_requests_give_way() -> None:
    """Partials (best effort) are refused while a request waits, and one that waits is
    dropped when a final is queued: the final then runs next, and both return None."""
    gate = threading.Event()
    order: list[int] = []

    def fn(items: list[int]) -> list[int]:
        gate.wait(5)
        order.extend(x for x in items if x)
        return items

    async def main() -> Engine:
        engine = Engine(batch_sizes=(1,), workers=1)
        engine.add_kind("k", fn, 0)
        engine.start()
        busy = asyncio.create_task(engine.submit("k", 1, best_effort=True))
        await asyncio.sleep(0.05)  # the worker runs request 1; nothing waits
        waiting = asyncio.create_task(engine.submit("k", 2, best_effort=True))
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 1
        assert await engine.submit("k", 3, best_effort=True) is None  # 2 waits already
        final = asyncio.create_task(engine.submit("k", 4, priority=1))
        await asyncio.sleep(0.01)
        assert waiting.done() and waiting.result() is None  # dropped for the final
        gate.set()
        assert await asyncio.gather(busy, final) == [1, 4]
        await engine.stop()
        return engine

    engine = run(main())
    assert order == [1, 4] and engine.shed == 2


def test_cancelled_request_leaves_the_queue() -> None:
    """A caller that gives up on a request not yet started (its session ended, a final
    superseded the partial) takes it out of the queue: it never runs."""
    gate = threading.Event()
    ran: list[int] = []

    def fn(items: list[int]) -> list[int]:
        gate.wait(5)
        ran.extend(items)
        return items

    async def main() -> None:
        engine = Engine(batch_sizes=(1,), workers=1)
        engine.add_kind("k", fn, 0)
        engine.start()
        busy = asyncio.create_task(engine.submit("k", 1))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(engine.submit("k", 2))
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 1
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 0
        gate.set()
        assert await busy == 1
        await engine.stop()

    run(main())
    assert ran == [1]


def test_busy_fraction_counts_running_and_recent_batches() -> None:
    gate = threading.Event()

    def fn(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def main() -> None:
        engine = Engine(batch_sizes=(1,), workers=2)
        engine.add_kind("k", fn, 0)
        engine.start()
        assert engine.busy_fraction() == 0.0
        held = asyncio.create_task(engine.submit("k", 1))
        await asyncio.sleep(0.2)  # one of two workers busy for 0.2 s of a 0.4 s window
        assert 0.2 <= engine.busy_fraction(window=0.4) <= 0.3
        gate.set()
        await held
        assert engine.busy_s >= 0.2
        await asyncio.sleep(0.1)
        assert 0.2 <= engine.busy_fraction(window=0.4) <= 0.3  # the batch that ended
        await engine.stop()

    run(main())


def test_two_workers_run_batches_concurrently() -> None:
    # Each call waits for the other at a barrier: only concurrent workers get through.
    barrier = threading.Barrier(2, timeout=5)
    threads: set[int] = set()

    def fn(items: list[int]) -> list[int]:
        threads.add(threading.get_ident())
        barrier.wait()
        return items

    async def main() -> list[int]:
        engine = Engine(batch_sizes=(1,), workers=2)
        engine.add_kind("k", fn, 0)
        engine.start()
        out = await asyncio.gather(engine.submit("k", 1), engine.submit("k", 2))
        await engine.stop()
        assert not engine.alive
        return list(out)

    assert run(main()) == [1, 2]
    assert len(threads) == 2


def test_warmup_compiles_every_bucket_and_nothing_recompiles() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    traces: list[tuple[int, ...]] = []

    @jax.jit
    def step(x):
        traces.append(x.shape)  # runs only while tracing, i.e. on a (re)compile
        return jnp.tanh(x).sum(axis=1)

    def batch(items: list[np.ndarray]) -> list[float]:
        return [float(v) for v in np.asarray(step(jnp.asarray(np.stack(items))))]

    pad = np.zeros(16, np.float32)

    async def main() -> None:
        engine = Engine(batch_sizes=(1, 2, 4))
        engine.add_kind("step", batch, pad)
        await asyncio.to_thread(engine.warmup)
        assert sorted(s[0] for s in traces) == [1, 2, 4]
        engine.start()
        rng = np.random.default_rng(0)
        for n in (1, 3, 4, 2, 5, 7):  # ragged request counts
            xs = [rng.standard_normal(16).astype(np.float32) for _ in range(n)]
            got = await asyncio.gather(*(engine.submit("step", x) for x in xs))
            np.testing.assert_allclose(got, [np.tanh(x).sum() for x in xs], rtol=1e-5)
        await engine.stop()

    run(main())
    assert len(traces) == 3  # only the warm-up compiles
