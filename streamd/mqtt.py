"""MQTT publisher: contract events out to a broker, surviving broker outages.

Topics under `prefix` (default `streamd`), payload = the event's JSON plus `node`,
`seq` and `ts`:

| event          | topic                             | QoS | retained | broker away        |
| -------------- | --------------------------------- | --- | -------- | ------------------ |
| `partial`      | `<prefix>/<session>/partial`      | 0   | no       | dropped, counted   |
| `final`        | `<prefix>/<session>/final`        | 1   | no       | kept in the outbox |
| `speech_start` | `<prefix>/<session>/speech_start` | 1   | no       | kept in the outbox |
| `done`         | `<prefix>/<session>/done`         | 1   | no       | kept in the outbox |
| any other `T`  | `<prefix>/<session>/T`            | 1   | no       | kept in the outbox |
| status         | `<prefix>/status/<node>`          | 1   | yes      | will: offline      |

Status payloads: `{"state": "online", "node", "version", "ts"}` on every connect;
`{"state": "offline", "node", "version", "reason": "shutdown", "ts", "undelivered"}`
from stop(); the last will `{"state": "offline", "node", "version", "reason": "lost"}`.

Overflow policy (style point 8): every non-partial event waits in one bounded, ordered
outbox, and `publish` blocks (back-pressure) while it is full. Entries leave only when
the broker acknowledges them (PUBACK), so delivery is at-least-once: after a connection
drops, unacknowledged entries go again, in order, with the same `seq` and `ts`, so
subscribers can de-duplicate on (`session`, `seq`).

Durability: with `journal` set, the outbox is also on disk (`streamd.journal`, SQLite in
WAL mode): an event is committed there before `publish` accepts it and deleted once
acknowledged. A publisher that starts on a journal with entries (the daemon was killed
while the broker was away) sends them first, in order, with their original `seq` and
`ts`, and continues each of those sessions' `seq` after them. The journal holds at most
`outbox_max` entries, the same bound as the memory outbox: when it is full, `publish`
waits; a final is never dropped.

Several brokers: `hosts` lists more brokers after `host`:`port`. When the link is lost
(or a connection attempt fails) the publisher tries the next one at once; only after
every broker failed in a row does it back off. The outbox carries over unchanged, so
unacknowledged entries go to the next broker, in order. Partials are coalesced per session
(a newer one replaces one not yet sent) and dropped while the broker is unreachable,
each counted in `dropped_partials`. Partials and outbox entries reach the wire in
publication order, so a partial never overtakes the final published before it.

`seq` counts every event of a session, dropped partials included (a gap is a dropped
partial). It goes on after the session's `done`, so a session resumed on this node (a new
connection, same id) keeps increasing it; it restarts only once 4096 more recently active
sessions pushed the session out. `ts` is the Unix time at which `publish` accepted the
event.

Link state (`state`, `health()`, `/healthz`): `connecting` (at start, and after a lost
link until an attempt fails), `connected`, `unreachable` (the last attempt found no broker:
TCP refused or timed out, no CONNACK in time), `refused` (a broker answered and said no:
CONNACK refused, e.g. bad credentials or not authorised, or the TLS handshake failed).
Logs: one line per change of state, broker or error, not one per retry (the repeats are
at debug level); the line names the broker and the reason, never the password. Failed
attempts are counted per reason (`connect_failures_by_reason`: `unreachable`, `refused`,
`tls`).

Connection handling follows aiomqtt's reconnection recipe: aiomqtt 2.x clients are
not reusable across connections, so every attempt builds a new `aiomqtt.Client`, with
a last will that marks the node offline; failed attempts back off exponentially with
jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not exported by aiomqtt 2.x

from streamd.errors import BadRequest, ConfigError
from streamd.journal import Journal

log = logging.getLogger("streamd.mqtt")

_PARTIAL = "partial"
FAILURE_REASONS = ("unreachable", "refused", "tls")  # why a connection attempt failed
_SEQ_SESSIONS_MAX = 4096  # per-session counters kept; the least recently used go first


def _version() -> str:
    try:
        return importlib.metadata.version("streamd")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection and publication policy.

    `tls_insecure` skips the server hostname check only (paho's meaning); the
    certificate is still verified against `tls_ca_file` (or the system CAs).
    `tls_cert_file` (with `tls_key_file`, or the key in the same PEM) is the client
    certificate for brokers that require one.
    """

    host: str
    port: int = 1883
    prefix: str = "streamd"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_insecure: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    client_id: str | None = None  # None: "streamd-<node>-<random>", fixed per publisher
    keepalive: int = 30
    outbox_max: int = 1000
    inflight_max: int = 16  # QoS 1 messages awaiting PUBACK at once (paho allows 20)
    ack_timeout_s: float = 10.0  # connect / PUBACK wait; past it the link counts as dead
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    hosts: tuple[tuple[str, int], ...] = ()  # more brokers, tried after host:port in turn
    # CONNACK wait and the online status's PUBACK wait. None: ack_timeout_s with one
    # broker; with several, 3 s, so that a
    # broker that accepts TCP but cannot answer yet (a NATS node while the cluster elects
    # new stream leaders) does not hold up trying the next one for long.
    connect_timeout_s: float | None = None
    journal: str | None = None  # the outbox's SQLite file; None: memory only

    @property
    def connect_timeout(self) -> float:
        if self.connect_timeout_s is not None:
            return self.connect_timeout_s
        return self.ack_timeout_s if len(self.brokers) == 1 else min(self.ack_timeout_s, 3.0)

    @property
    def brokers(self) -> tuple[tuple[str, int], ...]:
        """`host`:`port`, then `hosts`, without repeats."""
        return tuple(dict.fromkeys(((self.host, self.port), *self.hosts)))

    def __post_init__(self) -> None:
        checks = [
            (bool(self.host), "host", "must not be empty"),
            (1 <= self.port <= 65535, "port", "must be 1..65535"),
            (bool(self.prefix) and _topic_free(self.prefix, allow_slash=True)
             and not self.prefix.endswith("/"), "prefix",
             "a non-empty topic without wildcards or a trailing '/'"),
            (self.keepalive >= 1, "keepalive", "must be >= 1"),
            (self.outbox_max >= 1, "outbox_max", "must be >= 1"),
            (1 <= self.inflight_max <= 20, "inflight_max", "must be 1..20"),
            (self.ack_timeout_s > 0, "ack_timeout_s", "must be > 0"),
            (self.connect_timeout_s is None or self.connect_timeout_s > 0,
             "connect_timeout_s", "must be > 0"),
            (0 < self.reconnect_min_s <= self.reconnect_max_s, "reconnect_min_s",
             "must be > 0 and <= reconnect_max_s"),
            (not self.tls_ca_file or self.tls, "tls_ca_file", "needs tls = true"),
            (all(h and 1 <= p <= 65535 for h, p in self.hosts), "hosts",
             "(host, port) pairs with ports 1..65535"),
            (not self.tls_cert_file or self.tls, "tls_cert_file", "needs tls = true"),
            (not self.tls_key_file or self.tls_cert_file, "tls_key_file",
             "needs tls_cert_file"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"mqtt.{key}", message)

    # Config keys whose names differ from the fields here (older, documented TOML keys).
    _CONFIG_NAMES: ClassVar[dict[str, str]] = {"keepalive_s": "keepalive",
                                                "outbox_size": "outbox_max"}

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> MqttSettings:
        """From `streamd.config.MqttConfig`: every key named as a field here (or in
        `_CONFIG_NAMES`) passes on, so a new setting is declared once per class without a
        list to keep in step; empty strings there mean "not set" (None); the password
        comes from `cfg.read_password()` (`password` or `password_file`). The broker list
        is `host`:`port` (when `host` is set) followed by `hosts`. The journal path is not
        taken from `cfg` (it depends on the node and the state directory): pass
        `journal=` (see `journal_path`)."""
        from streamd.config import parse_broker

        own = {f.name for f in dataclasses.fields(cls)} - {"hosts", "journal"}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cfg):
            name = cls._CONFIG_NAMES.get(f.name, f.name)
            if name in own:
                value = getattr(cfg, f.name)
                values[name] = None if value == "" else value
        values["password"] = cfg.read_password() or None
        brokers = [parse_broker(h, cfg.port) for h in cfg.hosts]
        if cfg.host:
            brokers.insert(0, (cfg.host, cfg.port))
        if brokers:
            values["host"], values["port"] = brokers[0]
        values["hosts"] = tuple(brokers[1:])
        return cls(**{**values, **overrides})

    def describe_failure(self, exc: BaseException) -> str:
        """A hint for a failed connection whose cause is TLS ("" otherwise)."""
        chain: list[BaseException] = []
        cause: BaseException | None = exc
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        for cause in chain:
            if isinstance(cause, ssl.SSLCertVerificationError):
                ca = (f"mqtt.tls_ca_file {self.tls_ca_file!r}" if self.tls_ca_file
                      else "the system CAs (mqtt.tls_ca_file is not set)")
                return f" (TLS: the broker's certificate does not verify against {ca})"
            if isinstance(cause, ssl.SSLError):
                return f" (TLS handshake failed: {getattr(cause, 'reason', None) or cause})"
        if self.tls and isinstance(chain[-1], ConnectionResetError):
            return f" (mqtt.tls is on: is {self.host}:{self.port} a TLS listener?)"
        return ""


def journal_path(journal: str, node: str, environ: Mapping[str, str]) -> str | None:
    """Where the outbox journal lives, from `mqtt.journal`: "off" -> None (memory only);
    a path -> itself; "" -> `mqtt-journal-<node>.sqlite` in systemd's `$STATE_DIRECTORY`
    (its first entry), else in `$XDG_STATE_HOME/streamd` (default `~/.local/state`)."""
    if journal == "off":
        return None
    if journal:
        return journal
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        base = Path(state)
    else:
        xdg = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        base = Path(xdg) / "streamd"
    return str(base / f"mqtt-journal-{node}.sqlite")


def _topic_free(text: str, *, allow_slash: bool = False) -> bool:
    bad = "+#\0" if allow_slash else "+#/\0"
    return not any(c in text for c in bad)


def _encode(payload: dict) -> bytes:
    def default(obj: Any) -> Any:
        if hasattr(obj, "item"):  # numpy scalars from the recognizer
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__} in an MQTT event")

    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                      default=default).encode()


@dataclass
class _Entry:
    topic: str
    payload: bytes
    acked: bool = False
    jid: int | None = None  # its journal row


class MqttPublisher:
    """Publishes contract events for one daemon node; see the module docstring.

    Counters for metrics: `reconnects` (connections made after the first),
    `connect_failures` (and `connect_failures_by_reason`), `dropped_partials`,
    `published` (acknowledged outbox entries), `recovered` (entries found in the journal
    at start), `backpressure_s` (seconds `publish` callers waited for outbox room, summed;
    `backpressure_max_s` the longest single wait), the `outbox_depth` and `journal_bytes`
    properties. `broker` is the (host, port) in use or tried last; `state` and
    `last_error` describe the link (module docstring).
    """

    def __init__(self, settings: MqttSettings, node: str) -> None:
        if not node or not _topic_free(node):
            raise ConfigError("node", "must be non-empty without '/', '+' or '#'")
        self.settings = settings
        self.node = node
        self.version = _version()
        self.client_id = settings.client_id or f"streamd-{node}-{secrets.token_hex(4)}"
        self.status_topic = f"{settings.prefix}/status/{node}"
        self.reconnects = 0
        self.connect_failures = 0
        self.connect_failures_by_reason: dict[str, int] = dict.fromkeys(FAILURE_REASONS, 0)
        self.state = "connecting"
        self.last_error = ""
        # Back-pressure: publish() calls waiting for outbox room now (-> start time), and
        # the waits that ended (their sum and the longest).
        self._waiting: dict[object, float] = {}
        self._backpressure_done_s = 0.0
        self._backpressure_max_done_s = 0.0
        # (broker, error) pairs already logged since the link was last up: repeats of a
        # failed attempt go to debug, so a long outage is one warning, not one per retry.
        self._failures_logged: set[tuple[tuple[str, int], str]] = set()
        self._down_since: float | None = time.monotonic()  # None while connected
        self._outage_failures = 0  # failed attempts since the link was last up
        self.dropped_partials = 0
        self.published = 0
        self._outbox: deque[_Entry] = deque()
        self._space = asyncio.Condition()  # notified when outbox entries leave
        self._wake = asyncio.Event()  # set when the sender has something new to do
        self._seq: dict[str, int] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        # Latest unsent partial per session, in publication order; coalescing bounds it
        # by the number of live sessions. Each remembers how many outbox entries were
        # published before it, so the sender puts both on the wire in publication order.
        self._partials: dict[str, tuple[str, bytes, int]] = {}
        self._enqueued = 0  # outbox entries ever appended
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._dropped_logged = False
        self._broker = 0  # index in settings.brokers
        self.recovered = 0
        self._journal = Journal(settings.journal) if settings.journal else None
        if self._journal is not None:
            self._recover(self._journal)

    def _recover(self, journal: Journal) -> None:
        """Put the journal's entries back in the outbox and continue their sessions' seq."""
        for jid, topic, payload in journal.entries():
            self._outbox.append(_Entry(topic, payload, jid=jid))
            with contextlib.suppress(ValueError, KeyError, TypeError):
                event = json.loads(payload)
                session, seq = event["session"], int(event["seq"])
                self._seq.pop(session, None)  # re-inserted: most recent last
                self._seq[session] = seq + 1
        self.recovered = self._enqueued = len(self._outbox)
        if self.recovered:
            log.warning("mqtt: %d undelivered events from %s go first", self.recovered,
                        journal.path)

    # --- state for metrics and callers -------------------------------------------------
    @property
    def outbox_depth(self) -> int:
        return len(self._outbox)

    @property
    def journal_bytes(self) -> int:
        """Size of the journal on disk (0 without one)."""
        return self._journal.size_bytes if self._journal is not None else 0

    @property
    def broker(self) -> tuple[str, int]:
        return self.settings.brokers[self._broker]

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def backpressure_s(self) -> float:
        """Seconds publish() callers waited for outbox room, summed (waits going on too)."""
        now = time.monotonic()
        return self._backpressure_done_s + sum(now - t for t in self._waiting.values())

    @property
    def backpressure_max_s(self) -> float:
        """The longest single wait for outbox room so far (one going on included)."""
        ongoing = time.monotonic() - min(self._waiting.values()) if self._waiting else 0.0
        return max(self._backpressure_max_done_s, ongoing)

    @property
    def outbox_waiters(self) -> int:
        """publish() calls waiting for outbox room now (sessions held up)."""
        return len(self._waiting)

    def health(self) -> dict[str, Any]:
        """The link for `/healthz`: state, broker (host:port), outbox entries and bound,
        publish() calls waiting for room, the last connection error ("" once connected)."""
        host, port = self.broker
        return {"state": self.state, "broker": f"{host}:{port}",
                "outbox": len(self._outbox), "outbox_max": self.settings.outbox_max,
                "waiting": len(self._waiting), "last_error": self.last_error}

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """True once connected (online status published), False after `timeout` s."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the background connection loop; returns at once."""
        if self._task is not None:
            raise RuntimeError("MqttPublisher.start() called twice")
        self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.node}")

    async def stop(self, timeout: float = 5.0) -> int:
        """Flush the outbox (up to `timeout` s), publish the retained offline status and
        disconnect. Returns how many outbox entries could not be delivered."""
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is not None:
            if self._outbox or self.connected:
                # The loop ends by itself once the outbox is flushed and goodbye said.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
            task.cancel()  # no-op when it has finished
            await asyncio.gather(task, return_exceptions=True)
        self._closed = True
        async with self._space:
            self._space.notify_all()  # publishers blocked on a full outbox now fail
        left = len(self._outbox)
        if self._journal is not None:
            self._journal.close()
            if left:
                log.warning("mqtt stopped with %d undelivered events; they stay in %s "
                            "for the next start", left, self._journal.path)
        elif left:
            log.error("mqtt stopped with %d undelivered events in the outbox", left)
        return left

    # --- publishing --------------------------------------------------------------------
    async def publish(self, event: dict) -> None:
        """Publish one contract event (`type` and `session` required).

        A partial returns at once (sent or dropped); any other event returns once it is
        in the outbox, waiting while the outbox is full.
        """
        etype, session = event.get("type"), event.get("session")
        if not (isinstance(etype, str) and etype and _topic_free(etype)
                and isinstance(session, str) and session and _topic_free(session)):
            raise BadRequest(f"event needs topic-safe 'type' and 'session': {event!r:.200}")
        if self._closed or self._stopping:
            raise RuntimeError("MqttPublisher is stopped")
        topic = f"{self.settings.prefix}/{session}/{etype}"
        if etype == _PARTIAL:
            payload = _encode(self._stamp(event, session))
            if self._client is None:
                self._drop_partial("broker unreachable")
            elif self._partials.pop(session, None) is not None:
                self.dropped_partials += 1  # coalesced: a newer one replaces it
                log.debug("mqtt partial of %s coalesced", session)
            if self._client is not None:
                self._partials[session] = (topic, payload, self._enqueued)
                self._wake.set()
            return
        async with self._space:
            # Back-pressure: wait for room (FIFO among waiters keeps their order).
            if len(self._outbox) >= self.settings.outbox_max:
                waiter = object()
                self._waiting[waiter] = time.monotonic()
                try:
                    await self._space.wait_for(
                        lambda: self._closed or len(self._outbox) < self.settings.outbox_max)
                finally:
                    waited = time.monotonic() - self._waiting.pop(waiter)
                    self._backpressure_done_s += waited
                    self._backpressure_max_done_s = max(self._backpressure_max_done_s, waited)
            if self._closed:
                raise RuntimeError("MqttPublisher stopped while waiting for outbox room")
            payload = _encode(self._stamp(event, session))
            # On disk before it counts as accepted; an error here reaches the caller.
            jid = self._journal.append(topic, payload) if self._journal is not None else None
            self._outbox.append(_Entry(topic, payload, jid=jid))
            self._enqueued += 1
        self._wake.set()

    def _stamp(self, event: dict, session: str) -> dict:
        seq = self._seq.pop(session, 0)
        self._seq[session] = seq + 1  # re-inserted: the dict stays in LRU order
        if len(self._seq) > _SEQ_SESSIONS_MAX:
            del self._seq[next(iter(self._seq))]  # sessions that ended without `done`
        return {**event, "node": self.node, "seq": seq, "ts": time.time()}

    def _drop_partial(self, why: str, count: int = 1) -> None:
        self.dropped_partials += count
        # One warning per outage; the rest at debug, the total on reconnect.
        level = logging.DEBUG if self._dropped_logged else logging.WARNING
        self._dropped_logged = True
        log.log(level, "mqtt partial dropped (%s); %d dropped so far", why,
                self.dropped_partials)

    # --- connection loop ---------------------------------------------------------------
    def _payload(self, state: str, **extra: Any) -> bytes:
        return _encode({"state": state, "node": self.node, "version": self.version, **extra})

    def _new_client(self) -> aiomqtt.Client:
        s = self.settings
        host, port = self.broker
        tls = aiomqtt.TLSParameters(ca_certs=s.tls_ca_file, certfile=s.tls_cert_file,
                                    keyfile=s.tls_key_file) if s.tls else None
        client = aiomqtt.Client(
            host,
            port,
            username=s.username,
            password=s.password,
            identifier=self.client_id,
            keepalive=s.keepalive,
            timeout=s.connect_timeout,  # publishes pass ack_timeout_s themselves
            tls_params=tls,
            tls_insecure=s.tls_insecure if s.tls else None,
            max_inflight_messages=s.inflight_max,
            will=aiomqtt.Will(self.status_topic, self._payload("offline", reason="lost"),
                              qos=1, retain=True),
        )
        # A full window is normal here; aiomqtt warns above this many pending calls.
        client.pending_calls_threshold = s.inflight_max + 4
        return client

    async def _run(self) -> None:
        failures = 0  # consecutive failed attempts: the back-off exponent
        ever_connected = False
        while True:
            up = False
            try:
                async with self._new_client() as client:
                    up = True
                    if ever_connected:
                        self.reconnects += 1
                    ever_connected, failures = True, 0
                    # Part of connecting: a broker that cannot store it yet (a NATS node
                    # whose cluster elects stream leaders) is given connect_timeout only.
                    await client.publish(self.status_topic,
                                         self._payload("online", ts=time.time()),
                                         qos=1, retain=True,
                                         timeout=self.settings.connect_timeout)
                    self._client = client
                    self._connected.set()
                    self._link_up()
                    if self._dropped_logged:
                        log.info("mqtt: %d partials dropped so far", self.dropped_partials)
                        self._dropped_logged = False
                    try:
                        await self._serve(client)
                    except asyncio.CancelledError:
                        # stop() gave up flushing. Our clean DISCONNECT (in __aexit__)
                        # stops the broker from sending the will, so say it ourselves.
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self._say_offline(client), 1.0)
                        raise
                    # Only a stop with an empty outbox gets here.
                    await self._say_offline(client)
                    return
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one link
                self._link_failed(exc, was_up=up and self._connected.is_set())
            finally:
                self._client = None
                self._connected.clear()
                if self._partials:
                    self._drop_partial("connection closed", len(self._partials))
                    self._partials.clear()
            if self._stopping and not self._outbox:
                return
            # Next broker at once; back off only after a whole round of them failed
            # (one broker: after every failure, as before).
            n = len(self.settings.brokers)
            self._broker = (self._broker + 1) % n
            rounds, position = divmod(failures, n)
            if position == n - 1:
                await asyncio.sleep(self._backoff(rounds))
            failures += 1

    def _link_up(self) -> None:
        """Connected (online status acknowledged): state, and one line about the outage."""
        outage = ""
        if self._down_since is not None and (self.reconnects or self._outage_failures):
            outage = (f" after {time.monotonic() - self._down_since:.1f} s without a broker "
                      f"({self._outage_failures} failed attempts; {len(self._outbox)} "
                      "events waiting)")
        log.info("mqtt connected to %s:%d as %s%s", *self.broker, self.client_id, outage)
        self.state, self.last_error = "connected", ""
        self._failures_logged.clear()
        self._down_since, self._outage_failures = None, 0

    def _link_failed(self, exc: Exception, *, was_up: bool) -> None:
        """A lost link or a failed attempt: counters, state, and a log line when the state,
        broker or error is new (not on every retry)."""
        broker = self.broker
        hint = self.settings.describe_failure(exc)  # e.g. a TLS listener's hint, or ""
        detail = f"{exc!r}{hint}"
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not isinstance(exc, aiomqtt.MqttError):  # a bug, not the network: always loud
            log.error("mqtt link to %s:%d failed: %s", *broker, detail, exc_info=exc)
        if was_up:
            self.state, self.last_error = "connecting", f"connection lost: {exc}"
            self._failures_logged.clear()
            if isinstance(exc, aiomqtt.MqttError):
                log.warning("mqtt connection lost to %s:%d: %s; reconnecting", *broker, detail)
            return
        reason = self._failure_reason(exc, hint)
        self.connect_failures += 1
        self._outage_failures += 1
        self.connect_failures_by_reason[reason] += 1
        self.state = "unreachable" if reason == "unreachable" else "refused"
        self.last_error = f"{reason}: {exc}{hint}"
        key = (broker, self.last_error)
        if key in self._failures_logged or not isinstance(exc, aiomqtt.MqttError):
            log.debug("mqtt cannot connect to %s:%d: %s (again)", *broker, detail)
            return
        if len(self._failures_logged) >= 64:  # errors that keep changing: bounded anyway
            self._failures_logged.clear()
        self._failures_logged.add(key)
        log.warning("mqtt cannot connect to %s:%d: %s (%s; retrying with back-off, outbox %d "
                    "of %d; logged again when this changes)", *broker, detail,
                    self.state, len(self._outbox), self.settings.outbox_max)

    @staticmethod
    def _failure_reason(exc: BaseException, hint: str) -> str:
        """`refused` (the broker said no in its CONNACK), `tls` (the settings' failure
        `hint` names one), or `unreachable`."""
        if isinstance(exc, MqttConnectError):
            return "refused"
        if hint:
            return "tls"
        return "unreachable"

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        self._client = None  # no new partials for this link
        await client.publish(self.status_topic,
                             self._payload("offline", reason="shutdown", ts=time.time(),
                                           undelivered=len(self._outbox)),
                             qos=1, retain=True, timeout=self.settings.ack_timeout_s)

    def _backoff(self, failures: int) -> float:
        # Exponential, capped, with "equal jitter" so that many daemons that lost the
        # same broker do not come back in lock-step.
        cap = min(self.settings.reconnect_max_s, self.settings.reconnect_min_s * 2**failures)
        return cap / 2 + random.uniform(0, cap / 2)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Run the outbox sender until stop() drained it; raise MqttError on link loss."""
        tasks = [asyncio.create_task(self._watch(client)),
                 send := asyncio.create_task(self._send(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the watcher's MqttError, or a bug
            assert send in done, "only the outbox sender ends without an error"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        # We subscribe to nothing: the message iterator is aiomqtt's public way to learn
        # that the connection dropped (it raises MqttError), even while we are idle.
        async for _ in client.messages:
            pass

    async def _send(self, client: aiomqtt.Client) -> None:
        """Put outbox entries and partials on the wire in publication order.

        At most `inflight_max` outbox entries await their PUBACK and as many partials
        their write. Outbox entries before `cursor` were sent on this connection (or
        acknowledged on an earlier one); acknowledged entries leave from the head only.
        Returns once stop() was asked and everything is out; raises MqttError when the
        link fails (unacknowledged entries then go again on the next connection).
        """
        cursor = 0
        finals: dict[asyncio.Task[None], _Entry] = {}
        partials: set[asyncio.Task[None]] = set()
        wake: asyncio.Task[bool] | None = None
        try:
            while True:
                self._wake.clear()
                while True:
                    nxt = self.published + cursor  # absolute index of the next entry
                    if self._partials:
                        session = next(iter(self._partials))
                        topic, payload, before = self._partials[session]
                        if before <= nxt:  # published before entry `nxt`: goes first
                            if len(partials) >= self.settings.inflight_max:
                                break  # socket backed up: newer partials coalesce
                            del self._partials[session]
                            # Tasks start in creation order, so paho queues in order.
                            partials.add(asyncio.create_task(
                                client.publish(topic, payload, qos=0,
                                               timeout=self.settings.ack_timeout_s)))
                            continue
                    if cursor < len(self._outbox) and len(finals) < self.settings.inflight_max:
                        entry = self._outbox[cursor]
                        cursor += 1
                        if not entry.acked:
                            finals[asyncio.create_task(
                                client.publish(entry.topic, entry.payload, qos=1,
                                               timeout=self.settings.ack_timeout_s))] = entry
                        continue
                    break
                if self._stopping and not (self._outbox or self._partials or partials):
                    return
                if wake is None or wake.done():
                    wake = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait({wake, *finals, *partials},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task in partials:
                        partials.discard(task)
                        if task.exception() is not None:
                            self._drop_partial(repr(task.exception()))
                            task.result()  # the link is gone
                    elif task in finals:
                        entry = finals.pop(task)
                        task.result()  # MqttError: the link is gone, retry on the next
                        entry.acked = True
                popped, last_jid = 0, None
                while self._outbox and self._outbox[0].acked:
                    last_jid = self._outbox.popleft().jid
                    popped += 1
                if last_jid is not None and self._journal is not None:
                    self._journal.remove_through(last_jid)
                if popped:
                    cursor -= popped
                    self.published += popped
                    async with self._space:
                        self._space.notify_all()
        finally:
            pending = [*finals, *partials, *([wake] if wake else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
