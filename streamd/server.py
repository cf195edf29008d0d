"""WebSocket server at /v1/stream plus /healthz, /metrics and the static page, one port.

The handler only moves bytes and events: a receive loop feeding the sans-I/O Session,
and a send loop draining a bounded queue to the socket (sibling tasks). Partials are
dropped when the client reads too slowly; finals wait, and a client that accepts no event
for `send_timeout_s` is disconnected. `start` must come within `handshake_timeout_s` of
the upgrade; a connection silent for `idle_timeout_s` (if set) is ended as by `stop`.
The per-address rate limit (429), the Origin check (403), auth (401), the session limit
and draining (503) are decided in `process_request`, before the upgrade.

Resume (`start.resume`): a session continues under its id from a stream offset; its
events are shifted here (times by the offset, segment numbers by the segments it had),
so the Session itself always counts from zero. The next segment number comes from the
client (`resume.segment`) or from this server's memory of sessions that ended here.

Deepgram dialect (`/v1/listen`, streamd/deepgram.py): the query string is the `start`
(checked before the upgrade: 400), the session starts at the upgrade, and the events this
connection sends are translated by `deepgram.Translator`; publishers see native events.

`/healthz` reports the load for a load balancer: `sessions` of `max_sessions`, the
engine's waiting requests and busy share, and `load`, the larger of the two shares
(docs/scale-out.md, *Overload*). It also shows each `health_details` entry (the MQTT
link: state, broker, outbox) without letting it change the status code (docs/protocol.md
says why).

HAProxy agent-check (`server.agent_port`): each connection gets `agent_reply()`, one line
with the node's weight and session limit, and is closed.

Draining (`begin_drain()`, SIGTERM): `/healthz` answers 404 `{"status": "draining"}`,
which a load balancer's health check (HAProxy `http-check disable-on-404`) takes as
"no new sessions, keep the open ones"; new streams get 503; open sessions go on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import mimetypes
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from streamd import deepgram, protocol
from streamd.config import Config
from streamd.engine import Engine
from streamd.errors import BadRequest, InternalError, StreamdError, Unsupported
from streamd.metrics import Metrics
from streamd.recognizer import Pipeline, RecognizerOptions
from streamd.session import Request, Session, SessionRunner

log = logging.getLogger("streamd.server")
STREAM_PATH = "/v1/stream"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# Event types that go to publishers (MQTT, its journal), in emission order; `ready`,
# `error` and the dialect-specific replies concern one WebSocket client only.
PUBLISHED = ("speech_start", "partial", "final", "done")
ENDED_MAX = 4096  # sessions remembered after they end, for resume (least recent go first)


class Publisher(Protocol):
    async def publish(self, event: dict[str, Any]) -> None: ...


def _response(status: int, body: bytes | str, content_type: str, **headers: str) -> Response:
    data = body.encode() if isinstance(body, str) else body
    h = Headers({"Content-Type": content_type, "Content-Length": str(len(data))})
    for key, value in headers.items():
        h[key.replace("_", "-")] = value
    phrase = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
              404: "Not Found", 429: "Too Many Requests", 503: "Service Unavailable"}
    return Response(status, phrase.get(status, ""), h, data)


def _json_response(status: int, obj: dict[str, Any], **headers: str) -> Response:
    return _response(status, json.dumps(obj) + "\n", "application/json", **headers)


def authorized(tokens: tuple[str, ...], authorization: str,
               query_tokens: list[str] | tuple[str, ...] = ()) -> bool:
    """No tokens configured, or one offered as `Authorization: Bearer T` (OpenAI clients),
    `Authorization: Token T` (Deepgram clients) or `?token=T` (browsers)."""
    if not tokens:
        return True
    offered = list(query_tokens)
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() in ("bearer", "token"):
        offered.append(credential.strip())
    return any(hmac.compare_digest(o.encode(), t.encode()) for o in offered for t in tokens)


class RateLimiter:
    """Token bucket per client address: `rate` new connections per second, `burst` deep.
    At most `max_keys` addresses are tracked (the least recently seen are forgotten)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 65536) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time

    def allow(self, key: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


def origin_allowed(headers: Mapping[str, str], allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), a listed one, or the page's own (same-origin)."""
    origin = headers.get("Origin")
    if not allowed or origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in {a.rstrip("/").lower() for a in allowed}:
        return True
    host = headers.get("Host", "").strip().lower()
    return bool(host) and origin in (f"http://{host}", f"https://{host}")


class StreamServer:
    """Lifecycle: `await start()`; `ready = True` after warm-up; `drain()`; `close()`."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        metrics: Metrics,
        publishers: list[Publisher] | None = None,
        static_dir: Path = STATIC_DIR,
        engine: Engine | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.engine = engine  # its queue and busy share go to /healthz
        self.metrics = metrics
        self.publishers = list(publishers or [])
        self.static_dir = static_dir
        self.ready = False
        self.draining = False
        self._drain_event = asyncio.Event()
        self._idle = asyncio.Event()  # set while no WebSocket session is open
        self._idle.set()
        self._active: dict[str, _Connection] = {}
        self._ws: WsServer | None = None
        self._agent: asyncio.Server | None = None
        self.extra_sessions: Callable[[], int] = lambda: 0  # e.g. the mic session
        self.reserved_ids: set[str] = set()  # session ids clients may not take ("mic")
        # More /healthz fields, sampled per request (e.g. "mqtt": the publisher's link).
        self.health_details: dict[str, Callable[[], Any]] = {}
        # Sessions that ended here: id -> segments so far (the next number on resume).
        self.ended: OrderedDict[str, int] = OrderedDict()
        self.limiter = RateLimiter(config.server.connection_rate, config.server.connection_burst)
        self.connections = 0  # open WebSocket connections, sessions or not

    def remember(self, session: str, segments: int) -> None:
        self.ended.pop(session, None)
        self.ended[session] = segments
        while len(self.ended) > ENDED_MAX:
            self.ended.popitem(last=False)

    @property
    def port(self) -> int:
        assert self._ws is not None
        return self._ws.sockets[0].getsockname()[1]

    @property
    def session_count(self) -> int:
        return len(self._active) + self.extra_sessions()

    def load(self) -> dict[str, Any]:
        """/healthz's load fields: `load` (0..1) is the larger of sessions / max_sessions
        and the engine's busy share over the last few seconds."""
        sessions, limit = self.session_count, self.config.server.max_sessions
        out: dict[str, Any] = {"sessions": sessions, "max_sessions": limit}
        share = sessions / limit
        if self.engine is not None:
            busy = self.engine.busy_fraction()
            share = max(share, busy)
            out["engine"] = {"queue": self.engine.queue_depth, "busy": round(busy, 3),
                             "workers": self.engine.workers, "shed": self.engine.shed}
        out["load"] = round(min(share, 1.0), 3)
        return out

    def agent_reply(self) -> str:
        """HAProxy's agent-check reply: a weight (percent of the configured one) that falls
        as the engine gets busy, 100 % idle to 1 % saturated (never 0, which would drain
        the node), so `leastconn` sends fewer new sessions to a node whose device is
        busier; and `maxconn:` the sessions it accepts from clients (the microphone's
        session counts against `max_sessions` too)."""
        busy = self.engine.busy_fraction() if self.engine is not None else 0.0
        weight = max(1, round(100 * (1 - busy)))
        maxconn = max(1, self.config.server.max_sessions - self.extra_sessions())
        return f"{weight}% maxconn:{maxconn}\n"

    async def _agent_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.agent_reply().encode())
            await writer.drain()
        except OSError:
            pass  # HAProxy gave up on this check: the next one comes
        finally:
            writer.close()

    async def start(self) -> None:
        cfg = self.config.server
        try:
            self._ws = await serve(
                self._handle,
                cfg.host,
                cfg.port,
                process_request=self._process_request,
                # Frames above the contract limit get an error event; far above,
                # websockets closes with 1009 before buffering them.
                max_size=4 * cfg.max_frame_bytes,
                server_header="streamd",
                # HTTP request line and header limits are websockets' own (8192 bytes a
                # line, 128 headers; docs/protocol.md).
                open_timeout=cfg.handshake_timeout_s,
                write_limit=cfg.send_buffer_bytes,
            )
        except OSError as exc:
            raise InternalError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from exc
        log.info("listening", extra={"host": cfg.host, "port": self.port})
        if cfg.agent_port:
            try:
                self._agent = await asyncio.start_server(self._agent_connection, cfg.host,
                                                         cfg.agent_port)
            except OSError as exc:
                raise InternalError(f"cannot listen on {cfg.host}:{cfg.agent_port} "
                                    f"(server.agent_port): {exc.strerror}") from exc
            log.info("agent-check listening", extra={"port": cfg.agent_port})
        self.metrics.track_queue(
            "sessions", lambda: sum(c.runner.pending for c in self._active.values() if c.runner)
        )
        self.metrics.track_gauge("streamd_connections_open", "Open WebSocket connections",
                                 lambda: self.connections)
        self.metrics.track_gauge("streamd_event_loop_tasks", "Tasks of the event loop",
                                 lambda: len(asyncio.all_tasks()))
        self.metrics.track_gauge("streamd_threads", "Python threads of the process",
                                 threading.active_count)

    async def publish(self, event: dict[str, Any]) -> None:
        """Send a published event (`PUBLISHED`) to every publisher; a failing publisher never
        breaks a session."""
        if event.get("type") not in PUBLISHED:
            return
        for pub in self.publishers:
            try:
                await pub.publish(event)
            except Exception:
                log.exception("publisher %s failed", type(pub).__name__)

    def begin_drain(self) -> None:
        """Refuse new sessions (503) and report draining on /healthz (404)."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every WebSocket session ended by itself; False after `timeout` s."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; finish every session's segments in flight. True if all finished."""
        self.draining = True
        if self._ws is not None:
            self._ws.server.close()  # listening socket only; open connections go on
        self._drain_event.set()
        tasks = [c.task for c in self._active.values() if c.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            await self._agent.wait_closed()
            self._agent = None
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()
            self._ws = None

    # HTTP side, before any upgrade.

    def _authorized(self, request: HttpRequest, query: dict[str, list[str]]) -> bool:
        return authorized(self.config.server.tokens, request.headers.get("Authorization", ""),
                          query.get("token", []))

    def _process_request(
        self, connection: ServerConnection, request: HttpRequest
    ) -> Response | None:
        url = urlsplit(request.path)
        path = url.path
        peer = connection.remote_address
        if not self.limiter.allow(str(peer[0]) if peer else ""):
            self.metrics.rejected.labels(reason="rate_limited").inc()
            return _json_response(
                429, protocol.error_event("overloaded", "too many new connections"),
                Retry_After="1",
            )
        if not origin_allowed(request.headers, self.config.server.allowed_origins):
            self.metrics.rejected.labels(reason="origin").inc()
            return _json_response(403, protocol.error_event("unauthorized", "origin not allowed"))
        if path in (STREAM_PATH, deepgram.LISTEN_PATH):
            if not self._authorized(request, parse_qs(url.query)):
                self.metrics.rejected.labels(reason="unauthorized").inc()
                return _json_response(
                    401, protocol.error_event("unauthorized", "missing or wrong token"),
                    WWW_Authenticate="Bearer",
                )
            if not self.ready or self.draining:
                self.metrics.rejected.labels(reason="not_ready").inc()
                return _json_response(
                    503, protocol.error_event("overloaded", "not accepting sessions"),
                    Retry_After="5",
                )
            if self.session_count >= self.config.server.max_sessions:
                self.metrics.rejected.labels(reason="session_limit").inc()
                return _json_response(
                    503, protocol.error_event("overloaded", "session limit reached"),
                    Retry_After="1",
                )
            if path == deepgram.LISTEN_PATH:
                try:
                    deepgram.parse_query(url.query)
                except StreamdError as exc:
                    self.metrics.rejected.labels(reason="bad_request").inc()
                    body = deepgram.error_body(str(exc), deepgram.new_request_id())
                    return _json_response(400, body, dg_error=str(exc))
            return None
        if path == "/healthz":
            state = "draining" if self.draining else "ok" if self.ready else "starting"
            body = {"status": state, "node": self.config.node, **self.load(),
                    "pipeline": self.pipeline.name}
            body.update({name: detail() for name, detail in self.health_details.items()})
            # Not the MQTT link: finals wait in the journal through a broker outage, so a
            # load balancer must not pull every node because their broker went away.
            code = {"ok": 200, "draining": 404}.get(state, 503)
            return _json_response(code, body)
        if path == "/metrics":
            data, content_type = self.metrics.render()
            return _response(200, data, content_type)
        return self._static(path)

    def _static(self, path: str) -> Response:
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        root = self.static_dir.resolve()
        target = (root / name).resolve()
        if root not in target.parents or not target.is_file():
            return _response(404, "not found\n", "text/plain; charset=utf-8")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return _response(200, target.read_bytes(), ctype, Cache_Control="no-cache")

    # WebSocket side.

    async def _handle(self, ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:  # bounds what a client that stops reading holds in the kernel
            size = self.config.server.send_buffer_bytes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        listen = None
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        if url.path == deepgram.LISTEN_PATH:  # checked in _process_request
            listen = deepgram.parse_query(url.query)
        conn = _Connection(self, ws, listen)
        conn.task = asyncio.current_task()
        self.connections += 1
        try:
            await conn.run()
        finally:
            self.connections -= 1


class _Connection:
    """One client connection: receive loop + send loop; cleanup in `finally`."""

    def __init__(self, server: StreamServer, ws: ServerConnection,
                 listen: deepgram.ListenParams | None = None) -> None:
        self.server = server
        self.ws = ws
        self.cfg = server.config
        self.metrics = server.metrics
        self.session: Session | None = None
        self.runner: SessionRunner | None = None
        self.task: asyncio.Task | None = None
        self.gone = False  # client vanished: keep publishing, stop sending
        self._out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.cfg.server.send_queue)
        self._close_code = 1000
        self._dropped = False  # logged the first dropped partial
        self._close_reason = ""
        self._offset = 0.0  # resume: stream time of the first sample of this connection
        self._base = 0  # resume: segments the session had before this connection
        self.listen = listen  # a Deepgram `/v1/listen` connection: its query
        self.dialect: deepgram.Translator | None = None

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        receiver = asyncio.create_task(self._receive_loop())
        drain = asyncio.create_task(self.server._drain_event.wait())
        try:
            await asyncio.wait([receiver, drain], return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():  # daemon shutting down: finish what was heard
                receiver.cancel()
                self._close_code, self._close_reason = 1001, "server shutting down"
            await asyncio.gather(receiver, return_exceptions=True)
            if receiver.done() and not receiver.cancelled() and receiver.exception():
                exc = receiver.exception()
                log.error("session handler failed", exc_info=exc)
                await self._error("internal", "internal error", close=1011)
            await self._finish()
            await self._out.put(None)  # sender closes the socket after the last event
            await sender
        finally:
            drain.cancel()
            receiver.cancel()
            sender.cancel()
            if self.runner is not None:
                self.runner.cancel()
            if self.session is not None:
                self.server.remember(self.session.id, self._base + self.session.segments)
                self.server._active.pop(self.session.id, None)
                if not self.server._active:
                    self.server._idle.set()
                self.metrics.sessions_active.dec()
                log.info("session closed", extra={"session": self.session.id})

    async def _finish(self) -> None:
        """Stop the session (if any): finals of speech in flight, then `done`."""
        if self.runner is None or self.session is None:
            return
        self.runner.push(self.session.stop())
        await self.runner.finish()
        await self._emit(self.session.done())

    async def _receive_loop(self) -> None:
        idle = self.cfg.server.idle_timeout_s or None
        wait_start = self.cfg.server.handshake_timeout_s
        start_by = time.monotonic() + wait_start
        try:
            if self.listen is not None:  # Deepgram: the query was the start
                session = deepgram.new_request_id()
                self.dialect = deepgram.Translator(self.listen, session,
                                                   self.server.pipeline.name)
                if await self._start(self.listen.start(session)):
                    return
            while True:
                timeout = idle
                if self.session is None:  # `start` is part of the opening handshake
                    left = max(0.0, start_by - time.monotonic())
                    timeout = left if idle is None else min(idle, left)
                try:
                    # Cancelling recv() loses nothing (websockets' asyncio API).
                    message = await asyncio.wait_for(self.ws.recv(), timeout)
                except TimeoutError:
                    if self.session is None and time.monotonic() >= start_by:
                        await self._error("bad_request", f"no start within {wait_start:g} s",
                                          close=1008)
                        return
                    # Nothing, not even a keepalive: end as a `stop` would (finals, done).
                    log.info("idle connection ended", extra={
                        "session": self.session.id if self.session else None,
                        "idle_timeout_s": idle})
                    self._close_reason = "idle timeout"
                    return
                if isinstance(message, str):
                    if await self._control(message):
                        return
                else:
                    await self._audio(message)
        except ConnectionClosed:
            pass
        except _EndStream:
            return
        # The client went away (or closed): its finals still go to the publishers.
        if self.ws.state.name != "OPEN":
            self.gone = True

    async def _control(self, text: str) -> bool:
        """Handle a text message; True when the stream ends (stop or fatal error)."""
        try:
            msg = (protocol.parse_control(text) if self.dialect is None
                   else deepgram.parse_control(text))
        except Unsupported as exc:
            if self.session is None:  # a start we cannot serve: the stream cannot go on
                await self._error(exc.code, str(exc), close=1008)
                return True
            # A second start, whatever its fields: the session goes on as it was.
            await self._error("bad_request", "session already started")
            return False
        except BadRequest as exc:
            await self._error(exc.code, str(exc))
            return False
        if isinstance(msg, protocol.Keepalive):
            return False  # no reply; reading it was the point
        if isinstance(msg, protocol.Finalize):
            if self.session is None or self.runner is None:
                await self._error("bad_request", "finalize before start")
                return False
            outputs = self.session.finalize()
            if self.dialect is not None:
                self.dialect.finalize_requested([o.segment.start for o in outputs
                                                 if isinstance(o, Request) and o.kind == "final"])
            self.runner.push(outputs)
            return False
        if isinstance(msg, protocol.Stop):
            if self.session is None:
                await self._error("bad_request", "stop before start")
                return False
            return True
        if self.session is not None:
            await self._error("bad_request", "session already started")
            return False
        return await self._start(msg)

    async def _start(self, start: protocol.Start) -> bool:
        name = self.server.pipeline.name
        if start.pipeline is not None and start.pipeline != name:
            message = f"pipeline {start.pipeline!r} is not served here (this daemon: {name})"
            await self._error("unsupported", message, close=1008)
            return True
        if start.session in self.server._active or start.session in self.server.reserved_ids:
            message = f"session {start.session!r} is already open"
            await self._error("bad_request", message, close=1008)
            return True
        if self.server.session_count >= self.cfg.server.max_sessions:  # raced past the check
            await self._error("overloaded", "session limit reached", close=1013)
            return True
        if start.resume is not None:
            base = start.resume.segment
            if base is None:
                base = self.server.ended.get(start.session)
            if base is None:
                message = (f"session {start.session!r} is unknown here; resume.segment "
                           "gives its next segment number")
                await self._error("bad_request", message, close=1008)
                return True
            self._offset, self._base = start.resume.offset, base
        self.session = Session(start, self.cfg.vad, name, self.cfg.recognition.partial_interval_ms)
        self.server._active[start.session] = self
        self.server._idle.clear()
        self.metrics.sessions_active.inc()
        self.metrics.sessions.labels(source="websocket").inc()
        recognizer = self.server.pipeline.new_recognizer(
            start.session, RecognizerOptions(context=start.context, prompt=start.prompt))
        self.runner = SessionRunner(self.session, recognizer, self._emit, self.metrics)
        self.runner.start()
        log.info("session started", extra={
            "session": start.session, "sample_rate": start.sample_rate,
            "encoding": start.encoding, "channels": start.channels})
        await self._emit(self.session.ready())
        return False

    async def _audio(self, data: bytes) -> None:
        limit = self.cfg.server.max_frame_bytes
        if len(data) > limit:
            message = f"audio frame of {len(data)} bytes over the limit of {limit}"
            await self._error("bad_request", message, close=1008)
            raise _EndStream
        if self.session is None or self.runner is None:
            await self._error("bad_request", "audio before start")
            return
        try:
            outputs = self.session.feed(data)
        except StreamdError as exc:
            await self._error(exc.code, str(exc))
            return
        self.metrics.audio_seconds.inc(len(data) / self.session.start.frame_bytes
                                       / self.session.start.sample_rate)
        self.runner.push(outputs)
        # Recognition behind: stop reading, so TCP flow control slows the client.
        await self.runner.wait_room()

    async def _error(self, code: str, message: str, close: int | None = None) -> None:
        self.metrics.errors.labels(code=code).inc()
        session = self.session.id if self.session is not None else None
        log.info("client error", extra={"code": code, "detail": message, "session": session})
        await self._emit(protocol.error_event(code, message, session))
        if close is not None:
            self._close_code, self._close_reason = close, code

    async def _emit(self, event: dict[str, Any]) -> None:
        if self.session is not None and self.session.start.resume is not None:
            event = self._resumed(event)
        await self.server.publish(event)
        if self.gone:
            return
        if event["type"] == "partial" and self._out.full():
            self.metrics.drops.labels(reason="partial_slow_client").inc()
            if not self._dropped:
                self._dropped = True
                log.warning("client reads too slowly: dropping partials",
                            extra={"session": self.session.id if self.session else None})
            return
        if self.dialect is None:
            await self._out.put(event)
            return
        heard = self.session.samples_in if self.session is not None else 0
        audio_s = heard / protocol.TARGET_RATE
        for message in self.dialect.translate(event, audio_s):
            await self._out.put(message)

    def _resumed(self, event: dict[str, Any]) -> dict[str, Any]:
        """An event of this connection as the resumed session's: times + offset, segment
        numbers + the segments it had."""
        event = dict(event)
        off, base = self._offset, self._base
        kind = event["type"]
        if kind == "ready":
            event["resume"] = {"offset": round(off, 3), "segment": base}
        for key in ("start", "end"):
            if key in event:
                event[key] = round(event[key] + off, 3)
        if "segment" in event:
            event["segment"] += base
        if "words" in event:
            event["words"] = [{**w, "start": round(w["start"] + off, 3),
                               "end": round(w["end"] + off, 3)} for w in event["words"]]
        if kind == "done":
            event["segments"] += base
        if kind == "error" and base:
            event["message"] = re.sub(r"^segment (\d+):",
                                      lambda m: f"segment {int(m[1]) + base}:", event["message"])
        return event

    async def _send_loop(self) -> None:
        while True:
            event = await self._out.get()
            if event is None:
                break
            if self.gone:
                continue  # keep draining so producers never block on a dead client
            try:
                await asyncio.wait_for(self.ws.send(protocol.encode_event(event)),
                                       self.cfg.server.send_timeout_s)
            except ConnectionClosed:
                self.gone = True
            except TimeoutError:  # it stopped reading: drop it, its finals go to MQTT only
                self.gone = True
                self.metrics.drops.labels(reason="slow_client_disconnected").inc()
                log.warning("client accepted no event for %g s: disconnecting",
                            self.cfg.server.send_timeout_s,
                            extra={"session": self.session.id if self.session else None})
                self.ws.transport.abort()
        if not self.gone:
            await self.ws.close(self._close_code, self._close_reason)


class _EndStream(Exception):
    """Raised inside the receive loop when the stream cannot go on."""

