"""The sans-I/O MQTT outbox (streamd/outbox.py): order, seq, coalescing, bounds, acks and
requeue on link loss, driven directly: no broker, no event loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamd.errors import BadRequest
from streamd.outbox import Message, Outbox, OutboxFull


def _outbox(**kw: object) -> Outbox:
    args = {"prefix": "p", "node": "n", "max_entries": 100, "inflight_max": 4,
            "clock": lambda: 123.5, **kw}
    box = Outbox(**args)  # type: ignore[arg-type]
    box.link_up()
    return box


def _final(session: str, k: int) -> dict:
    return {"type": "final", "session": session, "segment": k, "text": f"t{k}"}


def _partial(session: str, text: str) -> dict:
    return {"type": "partial", "session": session, "segment": 0, "text": text}


def _drain(box: Outbox) -> list[Message]:
    out = []
    while (msg := box.next_to_send()) is not None:
        out.append(msg)
    return out


def _texts(msgs: list[Message]) -> list[str]:
    return [json.loads(m.payload)["text"] for m in msgs]


def test_topics_payloads_qos_and_seq_per_session() -> None:
    box = _outbox()
    box.put({"type": "speech_start", "session": "a", "segment": 0, "start": np.float32(0.5)})
    box.put(_partial("a", "pa"))
    box.put(_final("b", 0))
    box.put(_final("a", 0))
    box.put({"type": "done", "session": "a", "segments": 1})
    msgs = _drain(box)
    assert [(m.topic, m.qos) for m in msgs] == [
        ("p/a/speech_start", 1), ("p/a/partial", 0), ("p/b/final", 1), ("p/a/final", 1),
        ("p/a/done", 1)]
    payloads = [json.loads(m.payload) for m in msgs]
    assert [(p["session"], p["seq"]) for p in payloads] == [
        ("a", 0), ("a", 1), ("b", 0), ("a", 2), ("a", 3)]
    assert all(p["node"] == "n" and p["ts"] == 123.5 for p in payloads)
    assert payloads[0]["start"] == 0.5  # numpy scalars encode as numbers
    assert b" " not in msgs[2].payload  # compact JSON
    with pytest.raises(BadRequest):
        box.put({"type": "final", "session": "a/b"})
    with pytest.raises(BadRequest):
        box.put({"type": "fi#nal", "session": "a"})
    with pytest.raises(BadRequest):
        box.put({"session": "a"})


def test_partials_coalesce_per_session_finals_never() -> None:
    box = _outbox()
    for k in range(5):
        box.put(_partial("a", f"a{k}"))
        box.put(_partial("b", f"b{k}"))
    box.put(_final("a", 0))
    box.put(_final("a", 1))
    box.put(_partial("a", "a5"))  # the newest partial of a: replaces a4, moves last
    msgs = _drain(box)
    assert _texts(msgs) == ["b4", "t0", "t1", "a5"]
    assert box.dropped_partials == 4 + 5  # b0..b3; a0..a4
    # seq counts dropped partials too: a gap is a dropped partial.
    assert [json.loads(m.payload)["seq"] for m in msgs] == [4, 5, 6, 7]


def test_a_partial_never_overtakes_an_entry_put_before_it() -> None:
    box = _outbox()
    box.put(_partial("a", "first"))
    box.put(_final("b", 0))
    box.put(_partial("b", "after"))
    box.put(_final("c", 0))
    assert _texts(_drain(box)) == ["first", "t0", "after", "t0"]
    # Entries still in flight: a new partial goes after the entries put before it
    # (already handed out), not before them.
    box.put(_partial("a", "late"))
    assert _texts(_drain(box)) == ["late"]


def test_partials_are_dropped_while_the_link_is_down_entries_kept() -> None:
    box = _outbox()
    box.link_lost()
    box.put(_partial("a", "x"))
    box.put(_final("a", 0))
    assert box.dropped_partials == 1 and len(box) == 1
    assert box.next_to_send() is not None  # the caller only asks while connected
    box.link_lost()
    box.link_up()
    box.put(_partial("a", "y"))
    box.put(_partial("b", "z"))
    box.link_lost()  # not sent yet: dropped, counted
    assert box.dropped_partials == 3 and len(box) == 1
    box.link_up()
    assert _texts(_drain(box)) == ["t0"]
    assert json.loads(box.put(_final("a", 1)).payload)["seq"] == 3  # x, t0, y before


def test_bound_overflow_policy_back_pressure_not_drops() -> None:
    box = _outbox(max_entries=3)
    for k in range(3):
        box.put(_final("a", k))
    assert box.full
    with pytest.raises(OutboxFull):
        box.put(_final("a", 3))
    assert len(box) == 3
    box.put(_partial("a", "p"))  # partials are not bound by entries: one per session
    box.put(_partial("a", "q"))
    assert box.dropped_partials == 1
    sent = _drain(box)
    assert _texts(sent) == ["t0", "t1", "t2", "q"]
    assert box.acked(sent[1]) == 0 and box.full  # leaves only from the head
    assert box.acked(sent[0]) == 2 and not box.full and box.published == 2
    # seq: t0-t2 0-2, p and q 3-4; the refused put took none.
    assert json.loads(box.put(_final("a", 3)).payload)["seq"] == 5
    assert box.acked(sent[3]) == 0 and len(box) == 2


def test_inflight_windows() -> None:
    box = _outbox(inflight_max=2)
    for k in range(4):
        box.put(_final("a", k))
    first = _drain(box)
    assert _texts(first) == ["t0", "t1"]  # at most 2 await their PUBACK
    box.acked(first[0])
    nxt = _drain(box)
    assert _texts(nxt) == ["t2"]
    box.acked(first[1], nxt[0])
    assert _texts(_drain(box)) == ["t3"]

    box = _outbox(inflight_max=1)
    box.put(_partial("a", "a0"))
    box.put(_partial("b", "b0"))
    box.put(_final("c", 0))
    (p,) = _drain(box)  # the partial window is full: the final put after b0 waits too
    assert _texts([p]) == ["a0"]
    box.put(_partial("b", "b1"))  # coalesced while the socket is backed up
    box.acked(p)  # written
    assert _texts(_drain(box)) == ["t0", "b1"]
    assert box.dropped_partials == 1


def test_link_lost_requeues_unacknowledged_entries_in_order() -> None:
    box = _outbox(inflight_max=3)
    for k in range(5):
        box.put(_final("a", k))
    sent = _drain(box)
    assert _texts(sent) == ["t0", "t1", "t2"]
    box.acked(sent[0], sent[2])  # t2 acknowledged, t1 not: only t0 leaves
    assert len(box) == 4
    box.failed(sent[1], "link gone")
    box.link_lost()
    box.link_up()
    again = _drain(box)
    # t1 again, the same bytes (same seq and ts); t2 was acknowledged: skipped.
    assert _texts(again) == ["t1", "t3", "t4"] and again[0] is sent[1]
    box.acked(*again)
    assert len(box) == 0 and box.published == 5 and box.drained


def test_failed_partial_is_counted_and_drained() -> None:
    box = _outbox()
    box.put(_partial("a", "x"))
    assert not box.drained
    (p,) = _drain(box)
    assert not box.drained  # its write is pending
    box.failed(p, "OSError()")
    assert box.dropped_partials == 1 and box.drained


class _Store:
    def __init__(self, rows: list[tuple[int, str, bytes]] | None = None) -> None:
        self.rows = list(rows or [])
        self.fail = False

    def entries(self) -> list[tuple[int, str, bytes]]:
        return list(self.rows)

    def append(self, topic: str, payload: bytes) -> int:
        if self.fail:
            raise OSError("disk full")
        jid = (self.rows[-1][0] if self.rows else 0) + 1
        self.rows.append((jid, topic, payload))
        return jid

    def remove_through(self, jid: int) -> None:
        self.rows = [r for r in self.rows if r[0] > jid]


def test_store_first_in_order_seq_continues_rows_leave_on_ack() -> None:
    old = [json.dumps({"type": "final", "session": s, "seq": q, "ts": 1.0}).encode()
           for s, q in (("a", 4), ("b", 0), ("a", 6))]
    store = _Store([(7, "p/a/final", old[0]), (8, "p/b/final", old[1]),
                    (9, "p/a/final", old[2]), (10, "p/x/final", b"not json")])
    box = _outbox(store=store, inflight_max=8)
    assert box.recovered == 4 and len(box) == 4
    box.put(_final("a", 0))
    assert store.rows[-1][0] == 11  # on disk before accepted
    sent = _drain(box)
    assert [m.payload for m in sent[:4]] == [*old, b"not json"]  # the same bytes, in order
    assert json.loads(sent[4].payload)["seq"] == 7  # a's seq goes on after 6
    assert json.loads(box.put(_final("b", 1)).payload)["seq"] == 1
    box.acked(sent[0], sent[1])
    assert [r[0] for r in store.rows] == [9, 10, 11, 12]
    store.fail = True
    with pytest.raises(OSError):
        box.put(_final("c", 0))  # the error reaches the caller; nothing accepted
    assert len(box) == 4


def test_seq_counters_forget_the_least_recently_used_sessions() -> None:
    box = _outbox(seq_sessions_max=2)
    box.put(_final("a", 0))
    box.put(_final("b", 0))
    box.put(_final("a", 1))  # a is now the most recent
    box.put(_final("c", 0))  # b goes
    seqs = [json.loads(box.put(_final(s, 9)).payload)["seq"] for s in ("a", "b")]
    assert seqs == [2, 0]
