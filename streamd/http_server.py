"""The HTTP listener beside the WebSocket server: OpenAI's `POST /v1/audio/transcriptions`.

websockets answers GET only (its HTTP side exists for the upgrade), so requests with a
body get their own aiohttp server on `server.http_port` (default: the WebSocket port + 1);
a load balancer can put both behind one address (deploy/haproxy/haproxy.cfg routes
`/v1/audio/` to it). The form and the response formats are streamd/openai_api.py.

Admission mirrors the WebSocket port's: the per-address rate limit (429), Origin (403),
tokens as `Authorization: Bearer` (401, what the `openai` client sends), not ready or
draining (503), then the body limit `server.http_max_bytes` (413). Decoding and
recognition run on a thread per request, at most `server.http_workers` at once, never on
the event loop, so live sessions keep their loop; at most `server.http_queue` requests
wait for one, more get 429. Those threads run the Whisper decoder directly, not through
the engine, on the same cores as the engine's workers: a long file slows live sessions'
partials (the pipeline skips partials while the engine is busy) but never blocks their
I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from aiohttp import BodyPartReader, web

from streamd.audio import SAMPLE_RATE
from streamd.config import Config
from streamd.errors import InternalError
from streamd.metrics import Metrics
from streamd.openai_api import (
    FIELD_MAX_CHARS,
    TRANSCRIPTIONS_PATH,
    ApiError,
    TranscriptionRequest,
    WhisperFiles,
    decode_audio,
    parse_fields,
    render,
)
from streamd.server import StreamServer, authorized, origin_allowed

log = logging.getLogger("streamd.http")
CHUNK_BYTES = 64 * 1024
T = TypeVar("T")


async def in_thread(work: Callable[[], T]) -> T:
    """`work()` on a new daemon thread, awaited: like the engine's threads, a file still
    transcribing when the daemon exits does not hold the exit (a pool's threads would)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the request was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result, error = None, None
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting request
            error = exc
        # RuntimeError: the loop closed meanwhile (daemon exiting): nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="streamd-file", daemon=True).start()
    return await future


class HttpServer:
    """Lifecycle: `await start()` (after the WebSocket server), `await close()`."""

    def __init__(self, config: Config, stream: StreamServer, metrics: Metrics,
                 files: WhisperFiles | None) -> None:
        self.config = config
        self.stream = stream  # readiness, draining and the rate limiter are shared
        self.metrics = metrics
        self.files = files
        cfg = config.server
        self._slots = asyncio.Semaphore(cfg.http_workers)  # threads transcribing at once
        self.pending = 0  # requests transcribing or waiting for a thread
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def port(self) -> int | None:
        """The bound port; None while off."""
        if self._site is None or self._runner is None or not self._runner.addresses:
            return None
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        cfg = self.config.server
        if cfg.http_port == 0:
            return
        port = cfg.http_port if cfg.http_port > 0 else (cfg.port + 1 if cfg.port else 0)
        app = web.Application()
        app.router.add_post(TRANSCRIPTIONS_PATH, self._transcriptions)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=cfg.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            if cfg.http_port > 0:
                raise InternalError(
                    f"cannot listen on {cfg.host}:{port} (server.http_port): {exc.strerror}"
                ) from exc
            log.warning("OpenAI-compatible endpoint off: port %d (server.port + 1) is taken; "
                        "set server.http_port (--http-port)", port,
                        extra={"host": cfg.host, "port": port, "reason": exc.strerror})
            return
        self._site = site
        self.metrics.track_queue("transcriptions", lambda: self.pending)
        log.info("listening (HTTP)", extra={"host": cfg.host, "port": self.port,
                                            "path": TRANSCRIPTIONS_PATH})

    async def close(self) -> None:
        """Stop accepting; requests in flight get up to `server.shutdown_timeout_s`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(ApiError(404, f"Invalid URL ({request.method} {request.path})",
                               code="unknown_url"))

    async def _transcriptions(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        fmt = "unknown"  # the metrics label until response_format is read
        try:
            self._admit(request)
            cfg = self.config.server
            try:
                async with asyncio.timeout(cfg.http_body_timeout_s):
                    fields, data = await _read_form(request, cfg.http_max_bytes)
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within "
                                    f"{cfg.http_body_timeout_s:g} s", None,
                               "request_timeout") from None
            form = parse_fields(fields)
            fmt = form.response_format
            if data is None:
                raise ApiError(400, "you must provide a file parameter (the audio, as a "
                                    "multipart/form-data file)", "file",
                               "missing_required_parameter")
            segments, duration_s = await self._run(data, form)
            body, content_type = render(form, segments, duration_s)
        except ApiError as exc:
            self.metrics.transcriptions.labels(format=fmt, status=str(exc.status)).inc()
            log.info("transcription refused", extra={
                "status": exc.status, "param": exc.param, "code": exc.code,
                "detail": exc.message})
            return _error(exc)
        elapsed = time.monotonic() - started
        self.metrics.transcriptions.labels(format=fmt, status="200").inc()
        self.metrics.transcription_seconds.observe(elapsed)
        self.metrics.transcription_audio_seconds.inc(duration_s)
        if duration_s > 0:
            self.metrics.rtf.labels(kind="file").observe(elapsed / duration_s)
        log.info("transcription", extra={"format": fmt, "model": form.model,
                                         "audio_s": round(duration_s, 3),
                                         "elapsed_s": round(elapsed, 3),
                                         "segments": len(segments)})
        if isinstance(body, dict):
            return web.Response(text=json.dumps(body, ensure_ascii=False),
                                content_type=content_type)
        mime, _, _ = content_type.partition(";")
        return web.Response(text=body, content_type=mime, charset="utf-8")

    def _admit(self, request: web.Request) -> None:
        """The checks before the body is read, in the WebSocket port's order."""
        cfg = self.config.server
        if not self.stream.limiter.allow(request.remote or ""):
            self.metrics.rejected.labels(reason="rate_limited").inc()
            raise ApiError(429, "too many new requests from this address", None,
                           "rate_limit_exceeded", "rate_limit_error")
        if not origin_allowed(request.headers, cfg.allowed_origins):
            self.metrics.rejected.labels(reason="origin").inc()
            raise ApiError(403, "origin not allowed", None, "origin_not_allowed")
        if not authorized(cfg.tokens, request.headers.get("Authorization", "")):
            self.metrics.rejected.labels(reason="unauthorized").inc()
            raise ApiError(401, "Incorrect API key provided: send one of this server's "
                                "tokens as 'Authorization: Bearer TOKEN'", None,
                           "invalid_api_key")
        if not self.stream.ready or self.stream.draining:
            self.metrics.rejected.labels(reason="not_ready").inc()
            raise ApiError(503, "not accepting requests (starting or draining)", None,
                           "unavailable", "server_error")

    async def _run(self, data: bytes, form: TranscriptionRequest) -> tuple[list[Any], float]:
        """Decode and transcribe on a worker thread; 429 when too many wait."""
        cfg = self.config.server
        if self.pending >= cfg.http_workers + cfg.http_queue:
            raise ApiError(429, f"{self.pending} transcriptions are running or waiting; "
                                "retry later", None, "rate_limit_exceeded", "rate_limit_error")
        self.pending += 1
        try:
            async with self._slots:
                return await in_thread(lambda: self._work(data, form))
        finally:
            self.pending -= 1

    def _work(self, data: bytes, form: TranscriptionRequest) -> tuple[list[Any], float]:
        """On a worker thread: the file's audio, then its segments."""
        audio: np.ndarray = decode_audio(data, self.config.server.http_max_audio_s)
        if self.files is None:
            raise ApiError(400, f"the pipeline {self.stream.pipeline.name!r} of this daemon "
                                "cannot transcribe files (a Whisper pipeline can: whisper, "
                                "two-pass)", "model", "model_not_supported")
        try:
            segments = self.files.transcribe(audio, form)
        except Exception as exc:
            log.exception("file transcription failed")
            raise ApiError(500, "internal error while transcribing", None, "internal_error",
                           "server_error") from exc
        return segments, len(audio) / SAMPLE_RATE


async def _read_form(request: web.Request,
                     max_bytes: int) -> tuple[dict[str, list[str]], bytes | None]:
    """The multipart form's text fields and its `file`, streamed: a body over `max_bytes`
    gets 413 as soon as it is seen (at once when Content-Length says so)."""
    too_large = ApiError(413, f"Maximum content size limit ({max_bytes}) exceeded", None,
                         "request_too_large")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    if request.content_type != "multipart/form-data":
        raise ApiError(400, "expected a multipart/form-data body (fields file, model, ...), "
                            f"got {request.content_type or 'none'}", None, "invalid_value")
    fields: dict[str, list[str]] = {}
    data: bytes | None = None
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise ApiError(400, "nested or unnamed multipart parts are not supported",
                               None, "invalid_value")
            buffer = bytearray()
            limit = max_bytes if part.name == "file" else FIELD_MAX_CHARS
            while chunk := await part.read_chunk(CHUNK_BYTES):
                total += len(chunk)
                if total > max_bytes:
                    raise too_large
                buffer += chunk
                if len(buffer) > limit:
                    raise ApiError(400, f"field '{part.name}' is over {limit} bytes",
                                   part.name, "invalid_value")
            if part.name == "file":
                if data is not None:
                    raise ApiError(400, "more than one file", "file", "invalid_value")
                data = bytes(buffer)
            else:
                fields.setdefault(part.name, []).append(buffer.decode("utf-8", "replace"))
    except (ValueError, AssertionError, RuntimeError) as exc:  # aiohttp's malformed-body errors
        raise ApiError(400, f"malformed multipart body: {exc}", None, "invalid_value") from exc
    return fields, data


def _error(exc: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(exc.body(), status=exc.status, headers=headers)
