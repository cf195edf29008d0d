"""`streamd serve`: startup() -> serve() -> shutdown(), with systemd notify and SIGTERM.

Startup builds the pipeline, compiles every engine bucket (warm-up), binds the port and
only then reports READY=1. On SIGTERM: STOPPING=1; with `server.drain_timeout_s`, first
drain (/healthz 404, new sessions refused, open ones go on for up to that long); then
stop accepting, finish segments in
flight (finals to every publisher), flush MQTT, exit 0 within `server.shutdown_timeout_s`
plus the MQTT flush bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any

from models.disk_cache import enable_compilation_cache
from streamd import protocol
from streamd.config import Config
from streamd.engine import Engine
from streamd.errors import ConfigError, StreamdError
from streamd.http_server import HttpServer
from streamd.metrics import Metrics
from streamd.notify import Notifier
from streamd.openai_api import whisper_files
from streamd.recognizer import Pipeline, create_pipeline
from streamd.serve_args import add_arguments, config_from_args
from streamd.server import Publisher, StreamServer
from streamd.session import Session, SessionRunner

log = logging.getLogger("streamd.daemon")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus `extra=` fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._standard and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RedactingFormatter(logging.Formatter):
    """Wraps a formatter: configured secrets, `token=` query values, `Bearer` and `Token`
    credentials never reach the log, whatever logged them (websockets logs request lines at
    debug)."""

    _patterns = (re.compile(r"(?i)(token=)[^&\s\"'\\]+"),
                 re.compile(r"(?i)(bearer\s+)[^\s\"'\\,]+"),
                 re.compile(r"(?i)(authorization:\s*token\s+)[^\s\"'\\,]+"))

    def __init__(self, inner: logging.Formatter, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        for pattern in self._patterns:
            text = pattern.sub(r"\1[redacted]", text)
        return text


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    inner = (JsonFormatter() if config.log_format == "json" else
             logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        mqtt_password = config.mqtt.read_password()
    except ConfigError:  # reported when the publisher starts
        mqtt_password = config.mqtt.password
    secrets = (*config.server.tokens, mqtt_password)
    handler.setFormatter(RedactingFormatter(inner, secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


class Daemon:
    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        publishers: list[Publisher] | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.publishers: list[Publisher] = list(publishers or [])
        self.engine = Engine(config.recognition.batch_sizes, config.recognition.engine_queue,
                             observe=self.metrics.observe_batch,
                             workers=config.recognition.workers)
        self.pipeline: Pipeline | None = None
        self.server: StreamServer | None = None
        self.http: HttpServer | None = None
        self.mqtt: Any = None
        self._mic: _MicSession | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def request_stop(self) -> None:
        self._stop.set()

    async def startup(self) -> None:
        cfg = self.config
        t0 = time.monotonic()
        self.notifier.status("loading pipeline")
        # Before the pipeline compiles; main() did it already (a no-op then).
        enable_compilation_cache(cfg.recognition.compile_cache_dir or None)
        self.pipeline = create_pipeline(cfg.recognition.pipeline, cfg, self.engine)
        self.notifier.status("compiling")
        warm = await asyncio.to_thread(self.engine.warmup)  # every bucket, before READY
        self.engine.start()
        self.metrics.track_queue("engine", lambda: self.engine.queue_depth)
        self.metrics.track_gauge("streamd_engine_busy",
                                 "Share of the engine workers' time spent running batches "
                                 "over the last 5 s", self.engine.busy_fraction)
        self.metrics.track_counter("streamd_engine_busy_seconds",
                                   "Seconds the engine workers spent running batches, summed",
                                   lambda: self.engine.busy_s)
        self.metrics.track_counter("streamd_engine_shed",
                                   "Best-effort requests (partials) the busy engine did not run",
                                   lambda: self.engine.shed)
        for name, (doc, value) in self.pipeline.counters().items():
            self.metrics.track_counter(name, doc, value)
        if cfg.mqtt.enabled:
            from streamd.mqtt import MqttPublisher, journal_path

            journal = journal_path(cfg.mqtt.journal, cfg.node, os.environ)
            self.mqtt = MqttPublisher(cfg.mqtt, cfg.node, journal=journal)
            await self.mqtt.start()
            self.publishers.append(self.mqtt)
            self.metrics.track_queue("mqtt_outbox", lambda: self.mqtt.outbox_depth)
            self.metrics.track_gauge("streamd_mqtt_journal_bytes",
                                     "Size of the on-disk MQTT outbox (SQLite file and WAL)",
                                     lambda: self.mqtt.journal_bytes)
            self.metrics.track_counter("streamd_mqtt_recovered",
                                       "MQTT events found in the journal at start",
                                       lambda: self.mqtt.recovered)
            self.metrics.track_counter("streamd_mqtt_reconnects", "MQTT reconnections",
                                       lambda: self.mqtt.reconnects)
            self.metrics.track_counter("streamd_mqtt_dropped_partials", "MQTT partials dropped",
                                       lambda: self.mqtt.dropped_partials)
            self.metrics.track_gauge("streamd_mqtt_connected",
                                     "1 while connected to an MQTT broker, else 0",
                                     lambda: float(self.mqtt.connected))
            self.metrics.track_gauge("streamd_mqtt_backpressure_max_seconds",
                                     "Longest single wait for room in the MQTT outbox",
                                     lambda: self.mqtt.backpressure_max_s)
            self.metrics.track_gauge("streamd_mqtt_outbox_waiters",
                                     "Events waiting for room in the full MQTT outbox "
                                     "(sessions held up by back-pressure)",
                                     lambda: self.mqtt.outbox_waiters)
            self.metrics.track_labeled_counter(
                "streamd_mqtt_connect_failures", "Failed MQTT connection attempts", "reason",
                lambda: self.mqtt.connect_failures_by_reason)
            self.metrics.track_counter("streamd_mqtt_published",
                                       "MQTT QoS 1 events acknowledged by the broker",
                                       lambda: self.mqtt.published)
            self.metrics.track_counter(
                "streamd_mqtt_backpressure_seconds",
                "Seconds sessions waited for room in the full MQTT outbox, summed",
                lambda: self.mqtt.backpressure_s)
        self.server = StreamServer(cfg, self.pipeline, self.metrics, self.publishers,
                                   engine=self.engine)
        if self.mqtt is not None:
            self.server.health_details["mqtt"] = self.mqtt.health
        await self.server.start()
        self.http = HttpServer(cfg, self.server, self.metrics,
                               whisper_files(self.pipeline, cfg.recognition.beam_size))
        await self.http.start()
        if cfg.mic.enabled:
            self._mic = _MicSession(self)
            await self._mic.start()
            self.server.extra_sessions = lambda: 1
            self.server.reserved_ids.add(cfg.mic.session)
        self.server.ready = True
        self.metrics.ready.set(1)
        log.info("ready", extra={"pipeline": self.pipeline.name, "port": self.server.port,
                                 "http_port": self.http.port,
                                 "max_sessions": cfg.server.max_sessions,
                                 "warmup_s": round(warm, 3),
                                 "startup_s": round(time.monotonic() - t0, 3)})
        self.notifier.ready(f"serving on port {self.server.port}")
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_interval)))

    async def _watchdog(self, interval: float) -> None:
        while True:
            if self.engine.alive:  # a dead engine thread lets systemd restart us
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def serve(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        self.notifier.stopping()
        log.info("shutting down")
        timeout = self.config.server.shutdown_timeout_s
        drain_s = self.config.server.drain_timeout_s
        if self.server is not None and drain_s > 0:
            self.server.begin_drain()
            self.notifier.status("draining")
            log.info("draining", extra={"sessions": self.server.session_count,
                                        "drain_timeout_s": drain_s})
            if not await self.server.wait_idle(drain_s):
                log.warning("sessions still open after the drain timeout; ending them")
        if self.server is not None:
            drains = [self.server.drain(timeout)]
            if self._mic is not None:
                drains.append(self._mic.stop(timeout))
            finished = await asyncio.gather(*drains)
            if not all(finished):
                log.warning("sessions still running at the shutdown bound; finals may be lost")
        if self.http is not None:  # file requests in flight get the shutdown bound too
            await self.http.close()
        if self.mqtt is not None:
            await self.mqtt.stop()
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.engine.stop(), timeout)
        except TimeoutError:  # a hung device call: exit anyway (the thread is a daemon)
            log.error("engine did not stop within %.0f s", timeout)
        if self.server is not None:
            await self.server.close()
        self.notifier.close()
        log.info("stopped")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.startup()
        except StreamdError as exc:
            log.error("startup failed: %s", exc)
            print(f"streamd: {exc}", file=sys.stderr)
            await self.shutdown()
            return 1
        await self.serve()
        await self.shutdown()
        return 0


class _MicSession:
    """The microphone as a session that lives as long as the daemon; events go to publishers."""

    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.config
        assert daemon.pipeline is not None and daemon.server is not None
        start = protocol.Start(cfg.mic.sample_rate, "pcm_f32le", 1, cfg.mic.session)
        self.session = Session(start, cfg.vad, daemon.pipeline.name,
                               cfg.recognition.partial_interval_ms)
        self.runner = SessionRunner(self.session, daemon.pipeline.new_recognizer(start.session),
                                    daemon.server.publish, daemon.metrics)
        self.publish = daemon.server.publish
        self.metrics = daemon.metrics
        self.device = cfg.mic.device or None
        self.source: Any = None

    async def start(self) -> None:
        from streamd.mic import MicSource

        self.runner.start()
        self.source = MicSource(self.device, self.session.start.sample_rate, self.on_frames)
        await self.source.start()
        self.metrics.track_counter("streamd_mic_dropped_blocks", "Mic blocks dropped",
                                   lambda: getattr(self.source, "dropped_blocks", 0))
        self.metrics.sessions.labels(source="mic").inc()
        log.info("microphone session started", extra={"session": self.session.id,
                                                      "device": self.device})

    def on_frames(self, frames: Any) -> None:
        """Called on the event loop with mono float32 samples at the mic's rate."""
        self.metrics.audio_seconds.inc(len(frames) / self.session.start.sample_rate)
        self.runner.push(self.session.feed_samples(frames))

    async def stop(self, timeout: float) -> bool:
        if self.source is not None:
            await self.source.stop()
        self.runner.push(self.session.stop())
        try:
            await asyncio.wait_for(self.runner.finish(), timeout)
        except TimeoutError:
            return False  # finals still in flight: a `done` now would overtake them
        # Like a WebSocket session's end: subscribers learn the session is over.
        await self.publish(self.session.done())
        return True


def main(args: argparse.Namespace) -> int:
    """Entry point of `streamd serve`; returns the exit code (2: bad config, 1: failed start)."""
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    enable_compilation_cache(config.recognition.compile_cache_dir or None)  # before JAX
    return asyncio.run(Daemon(config).run())


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="streamd serve")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
