"""The MQTT publisher's outbox, without I/O: order, `seq`, coalescing, bounds and acks.

A plain synchronous class (style point 7): `streamd.mqtt` moves its messages to and from
a broker; tests drive it directly, without a broker or an event loop.

Events enter with `put(event)`: the topic is `<prefix>/<session>/<type>`, the payload the
event's JSON plus `node`, `seq` (per session, from 0) and `ts` (the clock at `put`).

- A `partial` (QoS 0) is never stored: while the link is down it is dropped; while up
  it waits, one per session, until it is sent. A newer partial of the same session
  replaces one not yet sent (it is coalesced, and moves behind the others).
- Every other event (QoS 1: `final`, `speech_start`, `done`, ...) is an *entry*: it waits
  in order until the broker acknowledges it (`acked`). Entries leave from the head only,
  so delivery is at-least-once, in order: `link_lost()` puts every unacknowledged entry
  back to be sent again, with the same payload (same `seq` and `ts`).

Overflow policy (style point 8): the entries are bounded by `max_entries`. When they are
full, `put` of a non-partial raises `OutboxFull` and drops nothing: the caller waits for
room (`full`), which is back-pressure on the sessions; a final is never dropped or
coalesced. Partials are what gives way: coalesced per session (so at most one waits per
live session), dropped while the link is down, dropped when their write fails or the link
is lost before they were sent. Every dropped partial is counted in `dropped_partials`
(logged once per outage, the rest at debug level).

Order: partials and entries go out in the order they were put; a partial never overtakes
an entry put before it (each partial remembers how many entries were put before it). At
most `inflight_max` entries await their acknowledgement at once, and as many partials
their write; `next_to_send()` returns None while a window is full.

`seq` counts every event of a session, dropped partials included (a gap is a dropped
partial). Counters are kept for the `seq_sessions_max` most recently active sessions.

Persistence: with a `store` (`streamd.journal.Journal`, or anything with its `entries`,
`append` and `remove_through`), an entry is appended there before `put` accepts it (an
error there reaches the caller) and removed once acknowledged; the store's entries at
construction come first, in order, and their sessions' `seq` continues after them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from streamd.errors import BadRequest

log = logging.getLogger("streamd.mqtt")

PARTIAL = "partial"
SEQ_SESSIONS_MAX = 4096  # per-session counters kept; the least recently used go first


class OutboxFull(Exception):
    """`put` of a non-partial while the outbox is full: wait for room (back-pressure)."""


class Store(Protocol):
    """Durable entries (`streamd.journal.Journal`)."""

    def entries(self) -> list[tuple[int, str, bytes]]: ...
    def append(self, topic: str, payload: bytes) -> int: ...
    def remove_through(self, jid: int) -> None: ...


@dataclass(eq=False)
class Message:
    """One publication: QoS 0 for a partial, 1 for an entry; never retained."""

    topic: str
    payload: bytes
    qos: int = 1
    acked: bool = False
    jid: int | None = None  # its row in the store


def topic_free(text: str, *, allow_slash: bool = False) -> bool:
    """True when `text` may be (with `allow_slash`: may be a part of) a topic level."""
    bad = "+#\0" if allow_slash else "+#/\0"
    return not any(c in text for c in bad)


def encode(payload: dict) -> bytes:
    """Compact UTF-8 JSON; numpy scalars (from the recognizer) become numbers."""
    def default(obj: Any) -> Any:
        if hasattr(obj, "item"):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__} in an MQTT event")

    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                      default=default).encode()


class Outbox:
    """See the module docstring."""

    def __init__(self, *, prefix: str, node: str, max_entries: int, inflight_max: int,
                 store: Store | None = None, clock: Callable[[], float] = time.time,
                 seq_sessions_max: int = SEQ_SESSIONS_MAX) -> None:
        self.prefix, self.node = prefix, node
        self.max_entries, self.inflight_max = max_entries, inflight_max
        self.store, self.clock = store, clock
        self.seq_sessions_max = seq_sessions_max
        self.online = False  # partials are accepted only while the link is up
        self.dropped_partials = 0
        self.published = 0  # entries acknowledged (and gone from the head)
        self.dropped_logged = False  # a drop was logged at warning level this outage
        self._entries: deque[Message] = deque()
        self._seq: dict[str, int] = {}  # session -> next seq, least recently used first
        # Latest unsent partial per session, in order of `put`, with the number of entries
        # put before it (so it goes out after them and before later ones).
        self._partials: dict[str, tuple[Message, int]] = {}
        self._put = 0  # entries ever put
        self._cursor = 0  # entries after the head handed out on this link
        self._entries_inflight = 0
        self._partials_inflight = 0
        self.recovered = 0
        if store is not None:
            for jid, topic, payload in store.entries():
                self._entries.append(Message(topic, payload, jid=jid))
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(payload)
                    session, seq = event["session"], int(event["seq"])
                    self._seq.pop(session, None)  # re-inserted: most recent last
                    self._seq[session] = seq + 1
            self.recovered = self._put = len(self._entries)

    # --- state ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Entries waiting (not yet acknowledged); partials are not counted."""
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.max_entries

    @property
    def drained(self) -> bool:
        """Nothing left to send or to wait for."""
        return not (self._entries or self._partials or self._partials_inflight)

    # --- input ---------------------------------------------------------------------------
    def topic(self, event: dict) -> str:
        """`<prefix>/<session>/<type>`; BadRequest unless both are topic-safe."""
        etype, session = event.get("type"), event.get("session")
        if not (isinstance(etype, str) and etype and topic_free(etype)
                and isinstance(session, str) and session and topic_free(session)):
            raise BadRequest(f"event needs topic-safe 'type' and 'session': {event!r:.200}")
        return f"{self.prefix}/{session}/{etype}"

    def put(self, event: dict) -> Message:
        """Accept one event (`type` and `session` required); its message.

        A partial is taken, coalesced or dropped (counted) at once. Any other event is
        appended (and written to the store first); OutboxFull when there is no room."""
        topic = self.topic(event)
        session = event["session"]
        if event["type"] == PARTIAL:
            msg = Message(topic, encode(self._stamp(event, session)), qos=0)
            if not self.online:
                self.drop_partial("broker unreachable")
                return msg
            if self._partials.pop(session, None) is not None:
                self.dropped_partials += 1  # coalesced: the newer one replaces it
                log.debug("mqtt partial of %s coalesced", session)
            self._partials[session] = (msg, self._put)
            return msg
        if self.full:
            raise OutboxFull(f"{len(self._entries)} entries wait (mqtt.outbox_size)")
        msg = Message(topic, encode(self._stamp(event, session)))
        if self.store is not None:  # on disk before it counts as accepted
            msg.jid = self.store.append(topic, msg.payload)
        self._entries.append(msg)
        self._put += 1
        return msg

    def _stamp(self, event: dict, session: str) -> dict:
        seq = self._seq.pop(session, 0)
        self._seq[session] = seq + 1  # re-inserted: the dict stays in LRU order
        if len(self._seq) > self.seq_sessions_max:
            del self._seq[next(iter(self._seq))]  # sessions that ended without `done`
        return {**event, "node": self.node, "seq": seq, "ts": self.clock()}

    def drop_partial(self, why: str, count: int = 1) -> None:
        self.dropped_partials += count
        # One warning per outage; the rest at debug, the total on reconnect.
        level = logging.DEBUG if self.dropped_logged else logging.WARNING
        self.dropped_logged = True
        log.log(level, "mqtt partial dropped (%s); %d dropped so far", why,
                self.dropped_partials)

    # --- output --------------------------------------------------------------------------
    def next_to_send(self) -> Message | None:
        """The next message to publish on this link, in order; None when there is none or
        its window (`inflight_max`) is full. Report each with `acked` or `failed`."""
        while True:
            if self._partials:
                session, (msg, before) = next(iter(self._partials.items()))
                if before <= self.published + self._cursor:  # put before the next entry
                    if self._partials_inflight >= self.inflight_max:
                        return None  # socket backed up: newer partials coalesce meanwhile
                    del self._partials[session]
                    self._partials_inflight += 1
                    return msg
            if (self._cursor >= len(self._entries)
                    or self._entries_inflight >= self.inflight_max):
                return None
            entry = self._entries[self._cursor]
            self._cursor += 1
            if not entry.acked:  # acknowledged out of order on an earlier link: skipped
                self._entries_inflight += 1
                return entry

    def acked(self, *msgs: Message) -> int:
        """The broker acknowledged these entries (PUBACK), or these partials were written.
        Returns how many entries left the head (room for `put`)."""
        for msg in msgs:
            if msg.qos == 0:
                self._partials_inflight -= 1
            else:
                self._entries_inflight -= 1
                msg.acked = True
        left, last_jid = 0, None
        while self._entries and self._entries[0].acked:
            last_jid = self._entries.popleft().jid
            left += 1
        if last_jid is not None and self.store is not None:
            self.store.remove_through(last_jid)
        self._cursor -= left
        self.published += left
        return left

    def failed(self, msg: Message, why: str) -> None:
        """Publishing `msg` failed (the link is going): a partial is dropped, counted; an
        entry is sent again after `link_lost()`."""
        if msg.qos == 0:
            self._partials_inflight -= 1
            self.drop_partial(why)
        else:
            self._entries_inflight -= 1

    # --- the link --------------------------------------------------------------------------
    def link_up(self) -> None:
        """Connected: partials are taken from now on; the drops of the outage are logged."""
        self.online = True
        if self.dropped_logged:
            log.info("mqtt: %d partials dropped so far", self.dropped_partials)
            self.dropped_logged = False

    def link_lost(self) -> None:
        """The link is gone (or closed): unacknowledged entries go again from the head, in
        order, on the next link; partials not yet sent are dropped (counted), and so is
        every new one until `link_up`. What was in flight is forgotten."""
        self.online = False
        self._cursor = self._entries_inflight = self._partials_inflight = 0
        if self._partials:
            self.drop_partial("connection closed", len(self._partials))
            self._partials.clear()
