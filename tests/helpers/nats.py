"""A real 3-node NATS cluster (JetStream + MQTT) on free loopback ports, for tests.

    with NatsCluster(tmp_path) as cluster:     # every node answers MQTT CONNECT
        node = cluster.nodes[0]                # .host, .port (MQTT), .name, .kill()
        async with Subscriber(cluster.nodes[2], ["streamd/#"]) as sub: ...
        cluster.nodes[0].kill()                # SIGKILL one node

Every node runs deploy/nats/node.conf, configured through its environment (as
scripts/cluster.sh does), with its own store directory under `workdir`. A node quacks
like `helpers.mosquitto.Mosquitto` for `Subscriber` (`host`, `port`, `users`,
`ca_file`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from . import free_port, terminate

REPO = Path(__file__).resolve().parents[2]
NATS_CONF = REPO / "deploy" / "nats" / "node.conf"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
# A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 10 s, client id "probe").
_PROBE = bytes([0x10, 17, 0, 4, *b"MQTT", 4, 2, 0, 10, 0, 5, *b"probe"])


class NatsNode:
    def __init__(self, workdir: Path, index: int) -> None:
        self.name = f"nats-{index + 1}"
        self.host = "127.0.0.1"
        self.port = free_port()  # MQTT
        self.client_port, self.cluster_port, self.http_port = (free_port() for _ in range(3))
        self.store_dir = workdir / self.name
        self.log_path = workdir / f"{self.name}.log"
        self.users: dict[str, str] = {}
        self.ca_file = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """`host:port` of the MQTT listener, the form of `mqtt.hosts`."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self, routes: list[str]) -> dict[str, str]:
        h = self.host
        return {
            "NATS_NAME": self.name, "NATS_LISTEN": f"{h}:{self.client_port}",
            "NATS_HTTP": f"{h}:{self.http_port}", "NATS_STORE_DIR": str(self.store_dir),
            "NATS_CLUSTER_LISTEN": f"{h}:{self.cluster_port}",
            "NATS_MQTT_LISTEN": f"{h}:{self.port}",
            **{f"NATS_ROUTE_{i + 1}": r for i, r in enumerate(routes)},
        }

    def start(self, routes: list[str]) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(NATS_CONF)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env(routes)})

    def kill(self) -> None:
        """SIGKILL (no goodbye to clients or routes); reaped."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc, 10)

    def mqtt_ready(self) -> bool:
        """True when the node accepts an MQTT connection (CONNACK 0): JetStream is up."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.settimeout(3)
                sock.sendall(_PROBE)
                ack = sock.recv(4)
                with contextlib.suppress(OSError):
                    sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
                return ack == bytes([0x20, 2, 0, 0])
        except OSError:
            return False

    def varz(self) -> dict:
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/varz",
                                    timeout=2) as r:
            return json.load(r)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class _PortTaken(RuntimeError):
    """A node could not listen: another process (a parallel test worker) took one of the
    free ports between our choosing it and the node binding it."""


class NatsCluster:
    def __init__(self, workdir: Path, size: int = 3) -> None:
        if size != 3:
            raise ValueError("deploy/nats/node.conf routes three nodes")
        self.workdir = Path(workdir) / "nats"
        self._place(self.workdir)

    def _place(self, workdir: Path) -> None:
        """Nodes on newly chosen free ports, their stores and logs under `workdir`."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = [NatsNode(workdir, i) for i in range(3)]
        self.routes = [f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes]

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Starts the three nodes; on a port taken meanwhile, again on other ports."""
        if not os.path.exists(NATS_SERVER):
            pytest.skip("nats-server is not installed (scripts/install-system-deps.sh)")
        for attempt in range(attempts):
            for node in self.nodes:
                node.start(self.routes)
            try:
                self.wait_ready(self.nodes, timeout)
                return
            except _PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise
                self._place(self.workdir / f"retry-{attempt + 1}")

    def wait_ready(self, nodes: list[NatsNode], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                if not node.running:
                    log = node.log_text()
                    kind = _PortTaken if "address already in use" in log else RuntimeError
                    raise kind(f"{node.name} exited:\n{log[-2000:]}")
                if node.mqtt_ready():
                    waiting.remove(node)
            if time.monotonic() > deadline:
                logs = "\n".join(n.log_text()[-1500:] for n in waiting)
                raise TimeoutError(f"NATS MQTT not ready in {timeout} s:\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
