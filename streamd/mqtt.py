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

Order, `seq`, coalescing of partials, the bound and acknowledgements belong to
`streamd.outbox.Outbox` (sans-I/O; its docstring has the rules): this module connects,
reconnects and moves the outbox's messages. Overflow policy (style point 8): every
non-partial event waits in one bounded, ordered outbox, and `publish` blocks
(back-pressure) while it is full; partials are coalesced per session and dropped while
the broker is unreachable, each counted in `dropped_partials`. Entries leave only when
the broker acknowledges them (PUBACK), so delivery is at-least-once: after a connection
drops, unacknowledged entries go again, in order, with the same `seq` and `ts`, so
subscribers can de-duplicate on (`session`, `seq`). `seq` goes on after a session's
`done`, so a session resumed on this node keeps increasing it; it restarts only once 4096
more recently active sessions pushed the session out.

Durability: with `journal` set, the outbox is also on disk (`streamd.journal`, SQLite in
WAL mode): an event is committed there before `publish` accepts it and deleted once
acknowledged. A publisher that starts on a journal with entries (the daemon was killed
while the broker was away) sends them first, in order, with their original `seq` and
`ts`, and continues each of those sessions' `seq` after them. The journal holds at most
`outbox_size` entries, the same bound as the memory outbox: when it is full, `publish`
waits; a final is never dropped.

Several brokers: `hosts` lists more brokers after `host`:`port`. When the link is lost
(or a connection attempt fails) the publisher tries the next one at once; only after
every broker failed in a row does it back off. The outbox carries over unchanged, so
unacknowledged entries go to the next broker, in order.

Link state (`state`, `health()`, `/healthz`): `connecting` (at start, and after a lost
link until an attempt fails), `connected`, `unreachable` (the last attempt found no broker:
TCP refused or timed out, no CONNACK in time), `refused` (a broker answered and said no:
CONNACK refused, e.g. bad credentials or not authorised, or the TLS handshake failed).
Logs: one line per change of state, broker or error, not one per retry (the repeats are
at debug level); the line names the broker and the reason, never the password. Failed
attempts are counted per reason (`connect_failures_by_reason`: `unreachable`, `refused`,
`tls`).

Settings: `streamd.config.MqttConfig`, the one definition. Connection handling follows
aiomqtt's reconnection recipe: aiomqtt 2.x clients are not reusable across connections,
so every attempt builds a new `aiomqtt.Client`, with a last will that marks the node
offline; failed attempts back off exponentially with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
import secrets
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not exported by aiomqtt 2.x

from streamd.config import MqttConfig
from streamd.errors import ConfigError
from streamd.journal import Journal
from streamd.outbox import PARTIAL, Message, Outbox, encode, topic_free

log = logging.getLogger("streamd.mqtt")

FAILURE_REASONS = ("unreachable", "refused", "tls")  # why a connection attempt failed


def _version() -> str:
    try:
        return importlib.metadata.version("streamd")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def describe_failure(config: MqttConfig, exc: BaseException,
                     broker: tuple[str, int] | None = None) -> str:
    """A hint for a failed connection (to `broker`, default the first) whose cause is TLS
    ("" otherwise)."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, ssl.SSLCertVerificationError):
            ca = (f"mqtt.tls_ca_file {config.tls_ca_file!r}" if config.tls_ca_file
                  else "the system CAs (mqtt.tls_ca_file is not set)")
            return f" (TLS: the broker's certificate does not verify against {ca})"
        if isinstance(cause, ssl.SSLError):
            return f" (TLS handshake failed: {getattr(cause, 'reason', None) or cause})"
    if config.tls and isinstance(chain[-1], ConnectionResetError):
        host, port = broker or config.brokers[0]
        return f" (mqtt.tls is on: is {host}:{port} a TLS listener?)"
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


class MqttPublisher:
    """Publishes contract events for one daemon node; see the module docstring.

    `config` is the `[mqtt]` section (`enabled`); `journal` the outbox's SQLite file
    (None: memory only; the daemon takes it from `journal_path`).

    Counters for metrics: `reconnects` (connections made after the first),
    `connect_failures` (and `connect_failures_by_reason`), `dropped_partials`,
    `published` (acknowledged outbox entries), `recovered` (entries found in the journal
    at start), `backpressure_s` (seconds `publish` callers waited for outbox room, summed;
    `backpressure_max_s` the longest single wait), the `outbox_depth` and `journal_bytes`
    properties. `broker` is the (host, port) in use or tried last; `state` and
    `last_error` describe the link (module docstring).
    """

    def __init__(self, config: MqttConfig, node: str, *, journal: str | None = None) -> None:
        if not node or not topic_free(node):
            raise ConfigError("node", "must be non-empty without '/', '+' or '#'")
        if not config.enabled:
            raise ConfigError("mqtt.host", "must not be empty")
        self.config = config
        self.node = node
        self.version = _version()
        self.client_id = config.client_id or f"streamd-{node}-{secrets.token_hex(4)}"
        self.status_topic = f"{config.prefix}/status/{node}"
        self._password = config.read_password() or None
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
        self._space = asyncio.Condition()  # notified when outbox entries leave
        self._wake = asyncio.Event()  # set when the sender has something new to do
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False
        self._broker = 0  # index in config.brokers
        self._journal = Journal(journal) if journal else None
        self._outbox = Outbox(prefix=config.prefix, node=node, max_entries=config.outbox_size,
                              inflight_max=config.inflight_max, store=self._journal)
        if self._journal is not None and self.recovered:
            log.warning("mqtt: %d undelivered events from %s go first", self.recovered,
                        self._journal.path)

    # --- state for metrics and callers -------------------------------------------------
    @property
    def outbox_depth(self) -> int:
        return len(self._outbox)

    @property
    def dropped_partials(self) -> int:
        return self._outbox.dropped_partials

    @property
    def published(self) -> int:
        return self._outbox.published

    @property
    def recovered(self) -> int:
        return self._outbox.recovered

    @property
    def journal_bytes(self) -> int:
        """Size of the journal on disk (0 without one)."""
        return self._journal.size_bytes if self._journal is not None else 0

    @property
    def broker(self) -> tuple[str, int]:
        return self.config.brokers[self._broker]

    @property
    def connected(self) -> bool:
        return self._outbox.online

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
                "outbox": len(self._outbox), "outbox_max": self.config.outbox_size,
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
        self._outbox.topic(event)  # BadRequest before anything else
        if self._closed or self._stopping:
            raise RuntimeError("MqttPublisher is stopped")
        if event["type"] != PARTIAL:
            async with self._space:
                # Back-pressure: wait for room (FIFO among waiters keeps their order).
                if self._outbox.full:
                    waiter = object()
                    self._waiting[waiter] = time.monotonic()
                    try:
                        await self._space.wait_for(
                            lambda: self._closed or not self._outbox.full)
                    finally:
                        waited = time.monotonic() - self._waiting.pop(waiter)
                        self._backpressure_done_s += waited
                        self._backpressure_max_done_s = max(self._backpressure_max_done_s,
                                                            waited)
                if self._closed:
                    raise RuntimeError("MqttPublisher stopped while waiting for outbox room")
                self._outbox.put(event)
        else:
            self._outbox.put(event)
        self._wake.set()

    # --- connection loop ---------------------------------------------------------------
    def _payload(self, state: str, **extra: Any) -> bytes:
        return encode({"state": state, "node": self.node, "version": self.version, **extra})

    def _new_client(self) -> aiomqtt.Client:
        c = self.config
        host, port = self.broker
        tls = aiomqtt.TLSParameters(ca_certs=c.tls_ca_file or None,
                                    certfile=c.tls_cert_file or None,
                                    keyfile=c.tls_key_file or None) if c.tls else None
        client = aiomqtt.Client(
            host,
            port,
            username=c.username or None,
            password=self._password,
            identifier=self.client_id,
            keepalive=c.keepalive_s,
            timeout=c.connect_timeout,  # publishes pass ack_timeout_s themselves
            tls_params=tls,
            tls_insecure=c.tls_insecure if c.tls else None,
            max_inflight_messages=c.inflight_max,
            will=aiomqtt.Will(self.status_topic, self._payload("offline", reason="lost"),
                              qos=1, retain=True),
        )
        # A full window is normal here; aiomqtt warns above this many pending calls.
        client.pending_calls_threshold = c.inflight_max + 4
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
                                         timeout=self.config.connect_timeout)
                    self._connected.set()
                    self._link_up()
                    self._outbox.link_up()  # partials are taken from now on
                    try:
                        await self._send(client)
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
                self._connected.clear()
                self._outbox.link_lost()
            if self._stopping and not self._outbox:
                return
            # Next broker at once; back off only after a whole round of them failed
            # (one broker: after every failure, as before).
            n = len(self.config.brokers)
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
        hint = describe_failure(self.config, exc, broker)  # e.g. a TLS listener's hint
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
                    self.state, len(self._outbox), self.config.outbox_size)

    @staticmethod
    def _failure_reason(exc: BaseException, hint: str) -> str:
        """`refused` (the broker said no in its CONNACK), `tls` (the failure `hint` names
        one), or `unreachable`."""
        if isinstance(exc, MqttConnectError):
            return "refused"
        if hint:
            return "tls"
        return "unreachable"

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        self._outbox.online = False  # no new partials for this link
        await client.publish(self.status_topic,
                             self._payload("offline", reason="shutdown", ts=time.time(),
                                           undelivered=len(self._outbox)),
                             qos=1, retain=True, timeout=self.config.ack_timeout_s)

    def _backoff(self, failures: int) -> float:
        # Exponential, capped, with "equal jitter" so that many daemons that lost the
        # same broker do not come back in lock-step.
        cap = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2**failures)
        return cap / 2 + random.uniform(0, cap / 2)

    async def _send(self, client: aiomqtt.Client) -> None:
        """Publish the outbox's messages until stop() drained it; raise MqttError when the
        link fails (unacknowledged entries then go again on the next link).

        Beside it runs a watcher on the message iterator, aiomqtt's public way to learn
        that the connection dropped (we subscribe to nothing), even while idle."""
        async def watch() -> None:
            async for _ in client.messages:
                pass

        watcher = asyncio.create_task(watch())
        sending: dict[asyncio.Task[Any], Message] = {}
        wake: asyncio.Task[bool] | None = None
        try:
            while True:
                self._wake.clear()
                # Tasks start in creation order, so paho queues the messages in order.
                while (msg := self._outbox.next_to_send()) is not None:
                    sending[asyncio.create_task(client.publish(
                        msg.topic, msg.payload, qos=msg.qos,
                        timeout=self.config.ack_timeout_s))] = msg
                if self._stopping and self._outbox.drained:
                    return
                if wake is None or wake.done():
                    wake = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait({wake, watcher, *sending},
                                             return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    watcher.result()  # the link's MqttError (or a bug)
                    raise RuntimeError("the MQTT message iterator ended without an error")
                ok, error = [], None
                for task in done - {wake}:
                    msg = sending.pop(task)
                    if task.exception() is None:
                        ok.append(msg)
                    else:
                        self._outbox.failed(msg, repr(task.exception()))
                        error = error or task.exception()
                if self._outbox.acked(*ok):
                    async with self._space:
                        self._space.notify_all()
                if error is not None:
                    raise error  # the link is gone
        finally:
            pending = [watcher, *sending, *([wake] if wake else [])]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
