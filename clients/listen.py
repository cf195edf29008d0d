"""streamd-listen: print the transcripts a streamd daemon publishes over MQTT.

    streamd-listen [--host H] [--port P] [--prefix streamd] [--session S] [--partials]
                   [--json] [--tls] [--cafile F] [--username U] [--password-env VAR]

Subscribes to `<prefix>/<session>/final` (QoS 1) and, with --partials,
`<prefix>/<session>/partial` (QoS 0); `--session` defaults to every session (`+`).
Finals print as `session [m:ss.cc - m:ss.cc] text`, partials as the same line with
`~` after the session; `--json` prints the payloads exactly as published, one per line.
Events the daemon re-sends after a reconnect (same node, session and `seq`) print once.
With `--status` the daemon's online/offline status messages are printed too.

Broker restarts and network failures are survived: the client reconnects with a
growing back-off (up to --max-backoff seconds) and resubscribes. Finals the daemon
publishes while we are away are kept by the daemon's outbox, not by us; with
`--client-id` the broker also keeps QoS 1 finals for us across our own disconnects
(persistent session), as long as the broker itself stays up.

Exit status: 0 on Ctrl+C or after --count finals; 1 when the broker refuses our
credentials (retrying cannot help); 2 on bad usage (missing TLS files).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
from collections import OrderedDict
from typing import Any, TextIO

from clients import format_span

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# CONNACK codes that retrying cannot fix: bad credentials, not authorized (3.1.1 and 5).
AUTH_REFUSALS = {4, 5, 134, 135}
SEEN_MAX = 10000  # (node, session, seq) keys remembered for de-duplication


class Printer:
    """Turns MQTT messages into output lines (pure formatting, testable without a broker)."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out, self.as_json = out, as_json
        self.finals = 0
        self.duplicates = 0
        self._seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()

    def _duplicate(self, event: dict[str, Any]) -> bool:
        """The daemon re-sends unacknowledged events after a reconnect with the same
        (session, seq); print each once. Bounded memory: oldest keys are forgotten."""
        seq = event.get("seq")
        if not isinstance(seq, int):
            return False
        key = (str(event.get("node", "")), str(event.get("session", "")), seq)
        if key in self._seen:
            self.duplicates += 1
            return True
        self._seen[key] = None
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        return False

    def message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        kind = parts[-1]
        is_status = len(parts) >= 2 and parts[-2] == "status"
        text = payload.decode("utf-8", "replace")
        try:
            event: dict[str, Any] = json.loads(text)
        except ValueError:
            print(f"streamd-listen: not JSON on {topic}: {text[:80]!r}", file=sys.stderr)
            return
        if not isinstance(event, dict) or (not is_status and self._duplicate(event)):
            return
        if self.as_json:
            self.out.write(text.replace("\n", " ") + "\n")
        else:
            if is_status:
                why = f" ({event['reason']})" if event.get("reason") else ""
                line = f"status {parts[-1]}: {event.get('state', '?')}{why}"
            else:
                session = event.get("session", parts[-2] if len(parts) >= 2 else "?")
                mark = " ~" if kind == "partial" else ""
                line = f"{session}{mark} {format_span(event)} {event.get('text', '').strip()}"
            self.out.write(line + "\n")
        self.out.flush()
        if kind == "final" and not is_status:
            self.finals += 1


Subscription = tuple[str, int]  # (topic filter, QoS)


def topics(prefix: str, session: str | None, partials: bool, status: bool) -> list[Subscription]:
    """(topic filter, QoS) pairs; finals at QoS 1 so the broker never drops them to us."""
    who = session or "+"
    subs = [(f"{prefix}/{who}/final", 1)]
    if partials:
        subs.append((f"{prefix}/{who}/partial", 0))
    if status:
        subs.append((f"{prefix}/status/+", 1))
    return subs


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not _wants_tls(args):
        return None
    context = ssl.create_default_context(cafile=args.cafile)
    if args.certfile:
        context.load_cert_chain(args.certfile, args.keyfile)
    if args.insecure:  # self-signed test brokers only
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _wants_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.cafile or args.certfile or args.insecure)


async def listen(args: argparse.Namespace, printer: Printer) -> int:
    """Subscribe and print until --count finals arrived; reconnect on any broker failure."""
    import aiomqtt
    from aiomqtt.exceptions import MqttConnectError

    subs = topics(args.prefix, args.session, args.partials, args.status)
    tls = _tls_context(args)
    password = os.environ.get(args.password_env) if args.password_env else args.password
    backoff = 0.5
    while True:
        try:
            client = aiomqtt.Client(
                args.host,
                args.port,
                username=args.username,
                password=password,
                identifier=args.client_id,
                clean_session=False if args.client_id else None,
                tls_context=tls,
                keepalive=args.keepalive,
                logger=_quiet_logger(),
            )
            async with client:
                await client.subscribe(subs)
                print(f"streamd-listen: subscribed on {args.host}:{args.port}: "
                      + ", ".join(t for t, _ in subs), file=sys.stderr, flush=True)
                backoff = 0.5
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, str):
                        payload = payload.encode()
                    elif not isinstance(payload, bytes | bytearray):
                        payload = str(payload).encode()
                    printer.message(str(message.topic), bytes(payload))
                    if args.count and printer.finals >= args.count:
                        return EXIT_OK
        except MqttConnectError as exc:
            if getattr(exc.rc, "value", exc.rc) in AUTH_REFUSALS:
                print(f"streamd-listen: broker refused us: {exc}", file=sys.stderr)
                return EXIT_REFUSED
            await _wait_before_retry(args, exc, backoff)
            backoff = min(args.max_backoff, backoff * 2)
        except aiomqtt.MqttError as exc:
            await _wait_before_retry(args, exc, backoff)
            backoff = min(args.max_backoff, backoff * 2)


def _quiet_logger() -> logging.Logger:
    # paho warns on every lost connection; we report those ourselves, once, readably.
    logger = logging.getLogger("streamd-listen.mqtt")
    logger.setLevel(logging.ERROR)
    return logger


async def _wait_before_retry(args: argparse.Namespace, exc: Exception, delay: float) -> None:
    print(f"streamd-listen: broker {args.host}:{args.port} unavailable ({exc}); "
          f"retrying in {delay:.1f} s", file=sys.stderr, flush=True)
    await asyncio.sleep(delay)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamd-listen",
        description="Print the transcripts a streamd daemon publishes over MQTT.",
    )
    p.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="broker port (1883, 8883 with TLS)")
    p.add_argument("--prefix", default="streamd", help="topic prefix (default streamd)")
    p.add_argument("--session", help="only this session (default: all)")
    p.add_argument("--partials", action="store_true", help="print partials too")
    p.add_argument("--status", action="store_true", help="print daemon online/offline status")
    p.add_argument("--json", action="store_true", help="print payloads as JSON lines, unchanged")
    p.add_argument("--count", type=int, default=0, help="exit after this many finals")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    p.add_argument("--cafile", help="CA bundle for the broker's certificate (implies --tls)")
    p.add_argument("--certfile", help="client certificate (implies --tls)")
    p.add_argument("--keyfile", help="client key for --certfile")
    p.add_argument("--insecure", action="store_true",
                   help="TLS without certificate checks (implies --tls)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password (visible in ps; prefer --password-env)")
    p.add_argument("--password-env", metavar="VAR", help="read the password from this variable")
    p.add_argument("--client-id", help="fixed client id: broker keeps our QoS 1 finals for us")
    p.add_argument("--keepalive", type=int, default=30, help="MQTT keepalive seconds")
    p.add_argument("--max-backoff", type=float, default=10.0, help="longest reconnect wait")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port is None:
        args.port = 8883 if _wants_tls(args) else 1883
    for name in ("cafile", "certfile", "keyfile"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.error(f"--{name} {path}: no such file")
    if args.password_env and args.password_env not in os.environ:
        parser.error(f"--password-env {args.password_env}: variable not set")
    try:
        return asyncio.run(listen(args, Printer(sys.stdout, args.json)))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
