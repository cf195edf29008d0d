"""Prometheus metrics, one CollectorRegistry per daemon (tests run several in a process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # process_resident_memory_bytes, process_open_fds, process_cpu_seconds_total (Linux)
        ProcessCollector(registry=r)
        self.sessions_active = Gauge("streamd_sessions_active", "Open sessions", registry=r)
        self.sessions = Counter("streamd_sessions", "Sessions started", ["source"], registry=r)
        self.rejected = Counter(
            "streamd_connections_rejected", "Handshakes refused", ["reason"], registry=r
        )
        self.audio_seconds = Counter(
            "streamd_audio_seconds", "Audio received, seconds at 16 kHz", registry=r
        )
        self.segments = Counter("streamd_segments", "Finals emitted", registry=r)
        self.noise_segments = Counter(
            "streamd_noise_segments", "VAD segments dropped: recognition found no words",
            registry=r,
        )
        self.partial_latency = Histogram(
            "streamd_partial_latency_seconds", "Audio arrival to partial event",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.final_latency = Histogram(
            "streamd_final_latency_seconds", "Endpoint to final event",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.rtf = Histogram(
            "streamd_real_time_factor", "Recognition compute seconds per audio second",
            ["kind"], buckets=_RTF_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("streamd_queue_depth", "Items waiting", ["queue"], registry=r)
        self.drops = Counter("streamd_drops", "Items dropped or coalesced", ["reason"], registry=r)
        self.errors = Counter("streamd_errors", "Error events sent", ["code"], registry=r)
        # Counters owned by other components (the MQTT publisher), read at scrape time.
        self._external = _ExternalCounters()
        r.register(self._external)
        self.track_counter("streamd_mqtt_reconnects", "MQTT reconnections", lambda: 0)
        self.track_counter("streamd_mqtt_dropped_partials", "MQTT partials dropped", lambda: 0)
        self.engine_batches = Histogram(
            "streamd_engine_batch_fill", "Requests per engine batch", ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.engine_seconds = Histogram(
            "streamd_engine_batch_seconds", "Engine batch run time", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ready = Gauge("streamd_ready", "1 once warm-up finished", registry=r)
        # POST /v1/audio/transcriptions (streamd/http_server.py); status is the HTTP code.
        self.transcriptions = Counter(
            "streamd_transcriptions", "File transcription requests answered",
            ["format", "status"], registry=r,
        )
        self.transcription_seconds = Histogram(
            "streamd_transcription_seconds", "File decode and recognition time per request",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0), registry=r,
        )
        self.transcription_audio_seconds = Counter(
            "streamd_transcription_audio_seconds", "Audio of transcribed files, seconds",
            registry=r,
        )

    def observe_recognition(
        self, kind: str, latency_s: float, compute_s: float, audio_s: float
    ) -> None:
        (self.partial_latency if kind == "partial" else self.final_latency).observe(latency_s)
        if audio_s > 0:
            self.rtf.labels(kind=kind).observe(compute_s / audio_s)

    def observe_batch(self, kind: str, real: int, bucket: int, seconds: float) -> None:
        self.engine_batches.labels(kind=kind).observe(real)
        self.engine_seconds.labels(kind=kind).observe(seconds)

    def track_queue(self, name: str, depth: Callable[[], float]) -> None:
        """Sample a queue's depth at scrape time."""
        self.queue_depth.labels(queue=name).set_function(depth)

    def track_counter(self, name: str, doc: str, value: Callable[[], float]) -> None:
        """Expose a counter kept elsewhere (e.g. `MqttPublisher.reconnects`)."""
        self._external.counters[name] = (doc, value)

    def track_labeled_counter(self, name: str, doc: str, label: str,
                              values: Callable[[], Mapping[str, float]]) -> None:
        """Expose counters kept elsewhere, one series per `label` value (e.g.
        `MqttPublisher.connect_failures_by_reason`)."""
        self._external.labeled[name] = (doc, label, values)

    def track_gauge(self, name: str, doc: str, value: Callable[[], float]) -> None:
        """Expose a gauge sampled at scrape time (e.g. the MQTT journal's size)."""
        Gauge(name, doc, registry=self.registry).set_function(value)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ExternalCounters(Collector):
    def __init__(self) -> None:
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self.labeled: dict[str, tuple[str, str, Callable[[], Mapping[str, float]]]] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (doc, value) in self.counters.items():
            yield CounterMetricFamily(name, doc, value=float(value()))
        for name, (doc, label, values) in self.labeled.items():
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, count in values().items():
                family.add_metric([key], float(count))
            yield family
