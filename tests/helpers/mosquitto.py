"""A real `mosquitto` broker on a free loopback port, for tests.

    with Mosquitto(tmp_path) as broker:        # started and accepting connections
        ... broker.port ...
        broker.stop(kill=True)                 # SIGKILL: clients see the socket drop
        broker.start()                         # same port, same config

Options: `tls=True` (a throw-away CA signs the broker's certificate; `broker.ca_file`),
`users={"name": "password"}` (anonymous access then refused); `pause()`/`resume()`
(SIGSTOP/SIGCONT: a hung broker with its connections still open).

`Subscriber` (async context manager) collects what a test client receives and
reconnects by itself when the broker restarts.

`persistence=True` keeps subscriptions and queued QoS 1 messages of persistent
(clean_session=False) subscribers across a restart: saved on every change and on a
graceful stop. The fixture `mosquitto` gives a started broker per test: put
`pytest_plugins = ["helpers.mosquitto"]` in the test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _make_certs(folder: Path, host: str) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for `host` (an IP: subjectAltName)."""
    ca_key, ca, key, csr, cert, ext = (folder / n for n in (
        "ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "san.ext"))
    ext.write_text(f"subjectAltName=IP:{host}\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["req", "-x509", *ec, "-days", "2", "-subj", "/CN=streamd-test-ca",
         "-keyout", ca_key, "-out", ca],
        ["req", "-new", *ec, "-subj", f"/CN={host}", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "2", "-extfile", ext, "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return ca, cert, key


class Mosquitto:
    """One broker process at a time, restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = False,
        tls: bool = False,
        users: dict[str, str] | None = None,
        extra_config: tuple[str, ...] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.workdir = Path(workdir) / f"mosquitto-{self.port}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.ca_file: Path | None = None  # with tls: the CA that signed the broker's cert
        self.users = dict(users or {})
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.users else 'true'}",
            # Started as root, mosquitto would switch to user `mosquitto`, which cannot
            # write our private folder; naming the current user keeps it as is.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "log_dest stderr",
            "log_type all",
        ]
        if persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                # Save after every change, so even a SIGKILL keeps subscriptions.
                "autosave_on_changes true",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if tls:
            self.ca_file, cert, key = _make_certs(self.workdir, self.host)
            lines += [f"cafile {self.ca_file}", f"certfile {cert}", f"keyfile {key}"]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.touch(mode=0o600)
            for name, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), name, password],
                               check=True, capture_output=True)
            lines.append(f"password_file {passwd}")
        self.config_path.write_text("\n".join([*lines, *extra_config]) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the listener accepts TCP connections."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        if not os.path.exists(MOSQUITTO):
            pytest.skip("mosquitto is not installed (scripts/install-system-deps.sh)")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C of the test run is ours to forward, not its
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mosquitto exited at start-up:\n{self.log_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop(kill=True)
        raise TimeoutError(f"mosquitto not accepting on port {self.port}:\n{self.log_text()}")

    def stop(self, *, kill: bool = False, timeout: float = 5.0) -> None:
        """SIGTERM (graceful: saves persistence) or SIGKILL; always reaps the process."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                if kill:
                    proc.send_signal(signal.SIGKILL)  # works on a paused broker too
                else:
                    proc.send_signal(signal.SIGCONT)  # a paused broker cannot act on TERM
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung broker)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(kill=True)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started broker on a free loopback port (no persistence); killed afterwards."""
    broker = Mosquitto(tmp_path)
    with broker:
        yield broker


class Subscriber:
    """A test MQTT client that records every message on `topics` (QoS 1).

        async with Subscriber(broker, ["streamd/#"]) as sub:
            ...
            await sub.wait_for(lambda msgs: len(msgs) >= 3)

    It uses the broker's CA and its first user when the broker has them.
    With `persistent=True` it uses a fixed client id and clean_session=False, so a broker
    with persistence queues what arrives while this client is away (broker restarts).
    `messages` holds aiomqtt `Message`s in arrival order, duplicates included; `arrived`
    their arrival times (Unix).
    """

    def __init__(self, broker: Mosquitto, topics: list[str] | tuple[str, ...] = ("#",), *,
                 persistent: bool = False, client_id: str | None = None) -> None:
        import aiomqtt  # only tests that use MQTT need it

        self._aiomqtt = aiomqtt
        self.broker = broker
        self.topics = list(topics)
        self.persistent = persistent
        self.client_id = client_id or f"test-sub-{os.getpid()}-{id(self):x}"
        self.messages: list[Any] = []
        self.arrived: list[float] = []  # time.time() of each message's arrival
        self.connects = 0
        self._changed = asyncio.Condition()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        aiomqtt = self._aiomqtt
        while True:
            try:
                user = next(iter(self.broker.users.items()), (None, None))
                tls = (aiomqtt.TLSParameters(ca_certs=str(self.broker.ca_file))
                       if self.broker.ca_file else None)
                async with aiomqtt.Client(self.broker.host, self.broker.port,
                                          identifier=self.client_id,
                                          clean_session=not self.persistent,
                                          username=user[0], password=user[1],
                                          tls_params=tls, timeout=5) as client:
                    await client.subscribe([(t, 1) for t in self.topics])
                    self.connects += 1
                    self._subscribed.set()
                    async for message in client.messages:
                        self.messages.append(message)
                        self.arrived.append(time.time())
                        async with self._changed:
                            self._changed.notify_all()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)  # broker away: try again soon

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._subscribed.wait(), 10)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for(self, predicate: Callable[[list[Any]], bool],
                       timeout: float = 30.0) -> list[Any]:
        """Wait until `predicate(messages)` holds; TimeoutError (with what came) if not."""
        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.messages))

        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            got = [(str(m.topic), m.payload[:80]) for m in self.messages[-10:]]
            raise TimeoutError(f"{len(self.messages)} messages, last: {got}") from None
        return self.messages

    def payloads(self, wildcard: str) -> list[dict]:
        """Decoded JSON payloads of the messages whose topic matches `wildcard`."""
        return [json.loads(m.payload) for m in self.messages if m.topic.matches(wildcard)]


def first_seen(payloads: list[dict]) -> list[dict]:
    """Drop at-least-once duplicates (same session and seq), keeping arrival order."""
    seen, out = set(), []
    for p in payloads:
        if (p["session"], p["seq"]) not in seen:
            seen.add((p["session"], p["seq"]))
            out.append(p)
    return out
