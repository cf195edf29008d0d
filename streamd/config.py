"""One frozen, validated configuration: defaults < TOML file < STREAMD_* env < CLI flags.

Every bad value fails fast with a `ConfigError` that names the key (`vad.frame_ms`).
Environment names are `STREAMD_<SECTION>_<KEY>` (e.g. `STREAMD_SERVER_PORT`) or
`STREAMD_<KEY>` for top-level keys (`STREAMD_NODE`); other STREAMD_* names are ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamd.errors import ConfigError
from streamd.pipelines import check_pipeline_name


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# Real-time sessions one CPU core carries with the default pipeline (whisper, tiny.en), so
# that `server.max_sessions` refuses sessions (503) before the admitted ones' finals slow
# down. Measured (README, *Measured here*; bench/results/stream-context-latency.json, an
# idle 2-core machine): 8 concurrent real-time streams kept finals at median 0.68-0.72 s /
# p90 1.01-1.11 s (1 stream: 0.48 / 0.50 s) with both cores saturated (0.24 CPU s per
# audio s each); with other load on the machine, 8 streams were too many (finals 10 s
# late, bench/results/stream-context-latency-loaded.json). So
# 8 streams on 2 cores, 4 a core. An accelerator, a larger model or another pipeline has
# another capacity: set `max_sessions` for it.
SESSIONS_PER_CORE = 4
MIN_SESSIONS, MAX_DEFAULT_SESSIONS = 4, 256


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def default_max_sessions() -> int:
    """`server.max_sessions` when not set: SESSIONS_PER_CORE per available core, 4..256."""
    return min(MAX_DEFAULT_SESSIONS, max(MIN_SESSIONS, SESSIONS_PER_CORE * available_cores()))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    tokens: tuple[str, ...] = ()
    # Listening beyond loopback without tokens must be asked for explicitly.
    allow_insecure: bool = False
    # Concurrent sessions; more get 503. Default: the measured capacity (above).
    max_sessions: int = field(default_factory=default_max_sessions)
    max_frame_bytes: int = 256 * 1024
    send_queue: int = 64
    shutdown_timeout_s: float = 10.0
    # SIGTERM behind a load balancer: /healthz answers 404 (draining) and new sessions 503
    # while open sessions go on by themselves for up to this long; then shutdown as usual
    # (speech in flight finalized, close 1001). 0: no wait (docs/scale-out.md).
    drain_timeout_s: float = 0.0
    # A connection that sends no message at all (audio, keepalive, ...) for this long is
    # ended as by `stop`; 0: never.
    idle_timeout_s: float = 0.0
    # Browser origins allowed to open streams and pages ("https://app.example"); a request
    # carrying another Origin gets 403 before the upgrade. Empty: any. Same-origin requests
    # (Origin = http://<Host header>) and requests without Origin are always allowed.
    allowed_origins: tuple[str, ...] = ()
    # New connections per second per client address (token bucket, `connection_burst`
    # deep); beyond it 429. 0: no limit. Behind a proxy every client has its address.
    connection_rate: float = 20.0
    connection_burst: int = 40
    # The opening of a stream: the HTTP upgrade, and then `start`, must each come within
    # this long (no upgrade: the socket is closed; no `start`: `bad_request`, close 1008).
    handshake_timeout_s: float = 10.0
    # A client that accepts no event for this long (it stopped reading) is disconnected;
    # its finals still go to MQTT. Kernel send buffer per connection: `send_buffer_bytes`.
    send_timeout_s: float = 10.0
    send_buffer_bytes: int = 65536
    # OpenAI-compatible `POST /v1/audio/transcriptions` (docs/openai.md) has its own HTTP
    # port, since the WebSocket server answers GET only. -1: `port` + 1 (a free port when
    # `port` is 0; when port + 1 is taken the endpoint stays off, with a warning); 0: off.
    http_port: int = -1
    # HAProxy agent-check port (docs/scale-out.md, *Overload*): each connection gets one
    # line, the node's weight from its engine's busy share and `maxconn:` its session
    # limit, and is closed. 0: off.
    agent_port: int = 0
    # Request bodies above this get 413 (OpenAI's own limit is 25 MB).
    http_max_bytes: int = 25 * 1024 * 1024
    # Longer audio gets 400: a file is decoded whole into memory (4 bytes per sample at
    # 16 kHz: 230 MB per hour) before it is transcribed.
    http_max_audio_s: float = 3600.0
    # Files decoded and transcribed at once, each on a thread beside the engine's workers
    # (sharing the same cores); up to `http_queue` more wait, beyond that 429.
    http_workers: int = 1
    http_queue: int = 8
    # The whole request body must arrive within this long (408 after): a client that
    # trickles its upload cannot hold a connection forever.
    http_body_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "server.port", "must be 0..65535")
        _check(-1 <= self.http_port <= 65535, "server.http_port",
               "must be -1 (port + 1), 0 (off) or 1..65535")
        _check(self.http_port <= 0 or self.http_port != self.port, "server.http_port",
               "must differ from server.port")
        _check(0 <= self.agent_port <= 65535 and (self.agent_port == 0 or self.agent_port
               not in (self.port, self.http_port)), "server.agent_port",
               "must be 0 (off) or 1..65535, not server.port or server.http_port")
        _check(1024 <= self.http_max_bytes <= 2**31, "server.http_max_bytes",
               "must be 1024..2147483648")
        _check(1 <= self.http_max_audio_s <= 86400, "server.http_max_audio_s",
               "must be 1..86400")
        _check(1 <= self.http_workers <= 64, "server.http_workers", "must be 1..64")
        _check(0 <= self.http_queue <= 10000, "server.http_queue", "must be 0..10000")
        _check(0 < self.http_body_timeout_s <= 86400, "server.http_body_timeout_s",
               "must be > 0 and <= 86400")
        _check(all(_valid_origin(o) for o in self.allowed_origins), "server.allowed_origins",
               "each must be scheme://host[:port], e.g. https://app.example")
        _check(0 <= self.connection_rate <= 1e6, "server.connection_rate", "must be 0..1e6")
        _check(1 <= self.connection_burst <= 1_000_000, "server.connection_burst",
               "must be 1..1000000")
        _check(0 < self.handshake_timeout_s <= 3600, "server.handshake_timeout_s",
               "must be > 0 and <= 3600")
        _check(0 < self.send_timeout_s <= 3600, "server.send_timeout_s",
               "must be > 0 and <= 3600")
        _check(4096 <= self.send_buffer_bytes <= 64 * 1024 * 1024, "server.send_buffer_bytes",
               "must be 4096..67108864")
        _check(self.max_sessions >= 1, "server.max_sessions", "must be >= 1")
        _check(self.max_frame_bytes >= 1024, "server.max_frame_bytes", "must be >= 1024")
        _check(self.send_queue >= 2, "server.send_queue", "must be >= 2")
        _check(self.shutdown_timeout_s > 0, "server.shutdown_timeout_s", "must be > 0")
        _check(0 <= self.drain_timeout_s <= 86400, "server.drain_timeout_s", "must be 0..86400")
        _check(self.idle_timeout_s >= 0, "server.idle_timeout_s", "must be >= 0 (0: none)")
        _check(all(t for t in self.tokens), "server.tokens", "tokens must be non-empty")
        _check(
            bool(self.tokens) or self.allow_insecure or _is_loopback(self.host),
            "server.host",
            f"{self.host!r} is not loopback and no tokens are configured "
            "(set server.tokens or server.allow_insecure = true)",
        )


def _valid_origin(origin: str) -> bool:
    scheme, sep, rest = origin.partition("://")
    return bool(scheme and sep and rest) and "/" not in rest and origin == origin.strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = 2
    frame_ms: int = 30
    start_pad_ms: int = 300
    end_pad_ms: int = 300
    # 510 ms (was 600), measured on the shared recordings (offline replay, tiny.en, 10 s
    # final windows). Utterances split beyond the 11 + 11 reference ones with 30 ms frames:
    # 600: 4, 450-540: 6 (JFK's long pauses), 420: 7, 390: 12 (LJ Speech sentences split at
    # commas), 300: 17. WER stream/JFK 600: 0.061/0.000, 450: 0.061/0.000, 400: 0.054/0.000.
    # Not lower: with 20 ms frames and aggressiveness 3 the stream splits 3 more utterances
    # at 510 ms and 5 more at 450 ms. 510 ends segments 90 ms sooner than 600.
    # Re-checked on the dev set with bench/vad.py (135 utterances of the shared and dev sets'
    # single-utterance and stream files, bench/results/vad.json): utterances split into
    # several segments at 300/390/450/510/600/750 ms: 27/23/15/15/12/8, and 750 merges 3
    # utterances across the stream files' 0.5 s gaps; 510 sits on the 450-510 plateau.
    endpoint_silence_ms: int = 510
    max_segment_s: float = 20.0
    # Voiced audio that confirms a segment (and so its first partial). 150 (was 250):
    # the same 28 segments on all shared recordings at 120-250 ms; 100 ms sooner partials.
    # Dev set (bench/vad.py, 510 ms endpoint): 60/90/150/250 ms split 17/17/15/14 of 135
    # utterances, none missed, no noise segment.
    min_speech_ms: int = 150
    # Frames quieter than this are never speech, whatever webrtcvad says.
    energy_floor_dbfs: float = -55.0

    def __post_init__(self) -> None:
        _check(self.aggressiveness in (0, 1, 2, 3), "vad.aggressiveness", "must be 0..3")
        _check(self.frame_ms in (10, 20, 30), "vad.frame_ms", "must be 10, 20 or 30")
        _check(0 <= self.start_pad_ms <= 2000, "vad.start_pad_ms", "must be 0..2000")
        _check(0 <= self.end_pad_ms <= 2000, "vad.end_pad_ms", "must be 0..2000")
        _check(
            self.frame_ms <= self.endpoint_silence_ms <= 10000,
            "vad.endpoint_silence_ms",
            "must be frame_ms..10000",
        )
        _check(1.0 <= self.max_segment_s <= 120.0, "vad.max_segment_s", "must be 1..120")
        _check(0 <= self.min_speech_ms <= 5000, "vad.min_speech_ms", "must be 0..5000")
        _check(-120 <= self.energy_floor_dbfs <= 0, "vad.energy_floor_dbfs", "must be -120..0")


@dataclass(frozen=True)
class RecognitionConfig:
    # A name registered under the `streamd.pipelines` entry points (docs/pipelines.md).
    pipeline: str = "whisper"
    model: str = ""
    # Whisper model of the `two-pass` pipeline's finals (empty: the embedded tiny.en);
    # `model` is then the CTC folder that gives the partials.
    final_model: str = ""
    partial_interval_ms: int = 400
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    engine_queue: int = 256
    # Engine threads running device calls (see streamd/engine.py for the measurement).
    workers: int = 2
    compile_cache_dir: str = ""
    # Beam width of finals (whisper); 1 is greedy. Partials are always greedy.
    beam_size: int = 1
    # whisper (and two-pass finals): decode after a prompt of the session's recent final
    # text (sessions may say `context: false`); at most `context_tokens` of it (Whisper's
    # limit: 223), dropped after `context_reset_s` of silence between finals
    # (streamd/pipelines/whisper.py).
    context: bool = True
    context_tokens: int = 64
    context_reset_s: float = 2.0
    # Partials too (off: measured worse, see CONTEXT_PARTIALS in the whisper pipeline).
    context_partials: bool = False
    # whisper: finals carry `words` with times and confidence (one more encoder and
    # decoder pass per final; docs/protocol.md).
    word_timestamps: bool = False

    def __post_init__(self) -> None:
        check_pipeline_name(self.pipeline)  # a name some installed package registers
        _check(
            100 <= self.partial_interval_ms <= 5000,
            "recognition.partial_interval_ms",
            "must be 100..5000",
        )
        _check(
            bool(self.batch_sizes)
            and all(b >= 1 for b in self.batch_sizes)
            and list(self.batch_sizes) == sorted(set(self.batch_sizes)),
            "recognition.batch_sizes",
            "must be increasing positive integers",
        )
        _check(self.engine_queue >= 1, "recognition.engine_queue", "must be >= 1")
        _check(1 <= self.workers <= 64, "recognition.workers", "must be 1..64")
        _check(1 <= self.beam_size <= 16, "recognition.beam_size", "must be 1..16")
        _check(0 <= self.context_tokens <= 223, "recognition.context_tokens", "must be 0..223")
        _check(0 < self.context_reset_s <= 86400, "recognition.context_reset_s",
               "must be > 0 and <= 86400")


def parse_broker(text: str, default_port: int = 1883) -> tuple[str, int]:
    """"host", "host:port" or "[v6-address]:port" -> (host, port); ValueError if bad."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad broker address {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    port = int(port_text) if port_text else default_port
    if not host or not 1 <= port <= 65535:
        raise ValueError(f"bad broker address {text!r}")
    return host, port


@dataclass(frozen=True)
class MqttConfig:
    """Empty `host` and `hosts` disable MQTT; empty strings mean "not set".

    The one definition of the MQTT settings: `streamd.mqtt.MqttPublisher` takes it as it
    is. Files named here must be readable at start. The password comes from `password`
    (best set by STREAMD_MQTT_PASSWORD) or the first line of `password_file`, not both.
    `tls_insecure` skips the server host name check only (paho's meaning); the
    certificate is still verified against `tls_ca_file` (or the system CAs).
    """

    host: str = ""
    port: int = 1883
    prefix: str = "streamd"
    client_id: str = ""  # empty: "streamd-<node>-<random>"; two clients with one id evict
    username: str = ""
    password: str = ""
    password_file: str = ""
    tls: bool = False
    tls_ca_file: str = ""  # empty: the system CAs
    tls_cert_file: str = ""  # client certificate (PEM), for brokers that require one
    tls_key_file: str = ""  # its key; empty: in tls_cert_file
    tls_insecure: bool = False  # skip the host name check (the chain is still verified)
    keepalive_s: int = 30
    outbox_size: int = 1000
    # Back-off between failed connection rounds: doubles from min to max, jittered.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # More brokers ("host:port"), tried in turn after `host`:`port` when one is lost.
    hosts: tuple[str, ...] = ()
    # The on-disk outbox: "" = default file under the state directory, "off" = memory only,
    # else the file's path (see streamd/journal.py).
    journal: str = ""
    # QoS 1 events awaiting their PUBACK at once (paho allows 20).
    inflight_max: int = 16
    # PUBACK wait (and the shutdown status's); past it the link counts as dead.
    ack_timeout_s: float = 10.0
    # CONNACK wait and the online status's PUBACK wait. 0: ack_timeout_s with one broker;
    # with several, at most 3 s, so that a broker that accepts TCP but cannot answer yet
    # (a NATS node while the cluster elects new stream leaders) does not hold up trying
    # the next one for long.
    connect_timeout_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.host or self.hosts)

    @property
    def brokers(self) -> tuple[tuple[str, int], ...]:
        """`host`:`port` (when `host` is set), then `hosts`, without repeats."""
        first = [(self.host, self.port)] if self.host else []
        return tuple(dict.fromkeys([*first, *(parse_broker(h, self.port) for h in self.hosts)]))

    @property
    def connect_timeout(self) -> float:
        if self.connect_timeout_s:
            return self.connect_timeout_s
        return self.ack_timeout_s if len(self.brokers) <= 1 else min(self.ack_timeout_s, 3.0)

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "mqtt.port", "must be 1..65535")
        for item in self.hosts:
            try:
                parse_broker(item, self.port)
            except ValueError:
                raise ConfigError("mqtt.hosts", f"{item!r} is not host, host:port or "
                                                "[v6-address]:port") from None
        _check(
            bool(self.prefix) and not any(c in self.prefix for c in "#+\0")
            and not self.prefix.endswith("/"),
            "mqtt.prefix",
            "must be a non-empty topic without wildcards or a trailing '/'",
        )
        _check(self.keepalive_s >= 1, "mqtt.keepalive_s", "must be >= 1")
        _check(self.outbox_size >= 1, "mqtt.outbox_size", "must be >= 1")
        _check(1 <= self.inflight_max <= 20, "mqtt.inflight_max", "must be 1..20")
        _check(self.ack_timeout_s > 0, "mqtt.ack_timeout_s", "must be > 0")
        _check(self.connect_timeout_s >= 0, "mqtt.connect_timeout_s",
               "must be >= 0 (0: from ack_timeout_s)")
        _check(0 < self.reconnect_min_s <= self.reconnect_max_s, "mqtt.reconnect_min_s",
               "must be > 0 and <= reconnect_max_s")
        _check(
            len(self.client_id.encode()) <= 65535 and self.client_id.isprintable()
            and self.client_id.strip() == self.client_id,
            "mqtt.client_id",
            "printable, without surrounding spaces",
        )
        _check(not (self.password and self.password_file), "mqtt.password_file",
               "set mqtt.password or mqtt.password_file, not both")
        _check(not self.tls_key_file or bool(self.tls_cert_file), "mqtt.tls_key_file",
               "needs mqtt.tls_cert_file")
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            _check(self.tls or not getattr(self, key), f"mqtt.{key}",
                   "needs mqtt.tls = true (--mqtt-tls)")
        if self.enabled:  # files only matter when MQTT is on
            for key in ("password_file", "tls_ca_file", "tls_cert_file", "tls_key_file"):
                path = getattr(self, key)
                _check(not path or os.access(path, os.R_OK), f"mqtt.{key}",
                       f"cannot read {path!r}")

    def read_password(self) -> str:
        """`password`, or the first line of `password_file` (its newline stripped)."""
        if not self.password_file:
            return self.password
        try:
            text = Path(self.password_file).read_text()
        except OSError as exc:
            raise ConfigError("mqtt.password_file",
                              f"cannot read {self.password_file!r}: {exc.strerror}") from exc
        return text.splitlines()[0] if text else ""


@dataclass(frozen=True)
class MicConfig:
    enabled: bool = False
    device: str = ""  # empty: the system default input
    session: str = "mic"
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        _check(_valid_session_id(self.session), "mic.session", "letters, digits, - or _")
        _check(8000 <= self.sample_rate <= 48000, "mic.sample_rate", "must be 8000..48000")


def _valid_session_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)


@dataclass(frozen=True)
class Config:
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "streamd")
    log_level: str = "info"
    log_format: str = "json"
    server: ServerConfig = field(default_factory=ServerConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    mic: MicConfig = field(default_factory=MicConfig)

    def __post_init__(self) -> None:
        _check(_valid_session_id(self.node), "node", "letters, digits, - or _ (at most 64)")
        _check(
            self.log_level in ("debug", "info", "warning", "error"),
            "log_level",
            "one of debug, info, warning, error",
        )
        _check(self.log_format in ("json", "text"), "log_format", "json or text")


# Keys whose values are credentials: error messages name them, never show them.
SECRET_KEYS = frozenset({"server.tokens", "mqtt.password"})

SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "vad": VadConfig,
    "recognition": RecognitionConfig,
    "mqtt": MqttConfig,
    "mic": MicConfig,
}


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the field's type, or fail naming the key."""
    from_env = isinstance(value, str)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        items = [v for v in value.split(",") if v.strip()] if from_env else value
        if isinstance(items, (list, tuple)):
            return tuple(_coerce(key, item, v.strip() if isinstance(v, str) else v) for v in items)
    name = getattr(hint, "__name__", str(hint))
    if key in SECRET_KEYS:  # the message goes to stderr and logs: never the value
        raise ConfigError(key, f"expected {name}, got a {type(value).__name__}")
    raise ConfigError(key, f"expected {name}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(full, "unknown key")
        if key in SECTIONS and cls is Config:
            if not isinstance(value, Mapping):
                raise ConfigError(full, "expected a table")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = _coerce(full, hints[key], value)
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """STREAMD_SERVER_PORT=9000 -> {"server": {"port": "9000"}} (strings, coerced later)."""
    top = {f.name for f in dataclasses.fields(Config)} - set(SECTIONS)
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith("STREAMD_"):
            continue
        rest = name[len("STREAMD_") :].lower()
        section, _, key = rest.partition("_")
        if section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            out.setdefault(section, {})[key] = value
        elif rest in top:
            out[rest] = value
    return out


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from a TOML file, STREAMD_* variables and CLI overrides (nested dict)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    data = _merge(data, overrides or {})
    return _build(Config, data, "")
