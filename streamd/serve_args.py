"""Flags of `streamd serve` and the config they make, apart from the daemon so that the
CLI builds its parser without importing the daemon's stack (aiohttp, JAX, websockets):
`streamd transcribe` pays only for what it runs."""

from __future__ import annotations

import argparse
from typing import Any

from streamd.config import Config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `streamd serve`; each overrides the config file and STREAMD_* variables."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8765)")
    parser.add_argument("--token", action="append", metavar="TOKEN",
                        help="accepted client token (repeatable); enables auth")
    parser.add_argument("--max-sessions", type=int, help="concurrent session limit")
    parser.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                        help="browser Origin allowed (repeatable); others get 403")
    parser.add_argument("--connection-rate", type=float, metavar="N",
                        help="new connections per second per client address (0: no limit)")
    parser.add_argument("--idle-timeout", type=float, metavar="S",
                        help="end a connection silent for S seconds as by stop (0: never)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="port of the OpenAI-compatible POST /v1/audio/transcriptions "
                             "(default: --port + 1; 0: off)")
    parser.add_argument("--agent-port", type=int, metavar="PORT",
                        help="HAProxy agent-check port: weight and maxconn (default 0: off)")
    parser.add_argument("--node", help="daemon name in MQTT payloads and status topic")
    parser.add_argument("--model", help="model folder or name for the pipeline")
    parser.add_argument("--pipeline",
                        help="whisper (default), ctc, conformer, two-pass, echo (no model: "
                             "the text is each segment's duration, for testing clients), "
                             "or one another package registers (docs/pipelines.md)")
    parser.add_argument("--final-model",
                        help="two-pass: Whisper model of the finals (default tiny.en)")
    parser.add_argument("--workers", type=int, help="engine threads (default 2)")
    parser.add_argument("--mqtt-host", help="MQTT broker host (enables MQTT)")
    parser.add_argument("--mqtt-port", type=int, help="MQTT broker port (default 1883)")
    parser.add_argument("--mqtt-prefix", help="MQTT topic prefix (default streamd)")
    parser.add_argument("--mqtt-hosts", metavar="H:P,H:P",
                        help="more MQTT brokers, tried in turn when one is lost")
    parser.add_argument("--mqtt-journal", metavar="FILE|off",
                        help="on-disk MQTT outbox (default: under the state directory)")
    parser.add_argument("--mqtt-tls", action="store_true", default=None,
                        help="connect to the broker over TLS (the port is usually 8883)")
    parser.add_argument("--mqtt-ca", metavar="FILE",
                        help="CA certificate(s) (PEM) the broker's certificate must chain "
                             "to (default: the system CAs)")
    parser.add_argument("--mqtt-cert", metavar="FILE", help="client certificate (PEM)")
    parser.add_argument("--mqtt-key", metavar="FILE",
                        help="client certificate's key (PEM; default: in --mqtt-cert)")
    parser.add_argument("--mqtt-client-id", metavar="ID",
                        help="MQTT client id (default streamd-<node>-<random>)")
    parser.add_argument("--mqtt-username", metavar="NAME", help="MQTT user name")
    parser.add_argument("--mqtt-password-file", metavar="FILE",
                        help="file whose first line is the MQTT password (or set "
                             "STREAMD_MQTT_PASSWORD; no flag takes the password itself, "
                             "it would show in ps)")
    parser.add_argument("--mic", nargs="?", const="", metavar="DEVICE",
                        help="also transcribe a microphone as session 'mic' (default device)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("json", "text"))


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    over: dict[str, Any] = {}

    def put(section: str | None, key: str, value: Any) -> None:
        if value is not None:
            (over.setdefault(section, {}) if section else over)[key] = value

    put("server", "host", args.host)
    put("server", "port", args.port)
    put("server", "tokens", args.token)
    put("server", "max_sessions", args.max_sessions)
    put("server", "allowed_origins", args.allowed_origin)
    put("server", "connection_rate", args.connection_rate)
    put("server", "idle_timeout_s", args.idle_timeout)
    put("server", "http_port", args.http_port)
    put("server", "agent_port", args.agent_port)
    put(None, "node", args.node)
    put("recognition", "model", args.model)
    put("recognition", "pipeline", args.pipeline)
    put("recognition", "final_model", args.final_model)
    put("recognition", "workers", args.workers)
    put("mqtt", "host", args.mqtt_host)
    put("mqtt", "port", args.mqtt_port)
    put("mqtt", "prefix", args.mqtt_prefix)
    if args.mqtt_hosts is not None:
        put("mqtt", "hosts", [h for h in args.mqtt_hosts.split(",") if h.strip()])
    put("mqtt", "journal", args.mqtt_journal)
    put("mqtt", "tls", args.mqtt_tls)
    put("mqtt", "tls_ca_file", args.mqtt_ca)
    put("mqtt", "tls_cert_file", args.mqtt_cert)
    put("mqtt", "tls_key_file", args.mqtt_key)
    put("mqtt", "client_id", args.mqtt_client_id)
    put("mqtt", "username", args.mqtt_username)
    if args.mqtt_password_file is not None:  # beats a password from the file or env
        put("mqtt", "password", "")
        put("mqtt", "password_file", args.mqtt_password_file)
    if args.mic is not None:
        put("mic", "enabled", True)
        put("mic", "device", args.mic)
    put(None, "log_level", args.log_level)
    put(None, "log_format", args.log_format)
    return load_config(args.config, environ, over)
