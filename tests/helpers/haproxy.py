"""A real HAProxy running deploy/haproxy/haproxy.cfg in front of test daemons.

    with HAProxy(tmp_path, [("a", port_a), ("b", port_b)]) as lb:   # every server UP
        ... lb.port (the frontend) ... lb.status("a") -> "UP" / "NOLB" / "DOWN" ...

The config is the deploy file with its frontend `bind`, its stats `bind` and its
`server` lines rewritten to free loopback ports (`render`); nothing else changes.
`http_ports` (server name -> its `--http-port`) fills the `streamd_files` backend
(POST /v1/audio/...); without it that backend has no servers. `agent_ports` (server name
-> its `--agent-port`) keeps the agent-check of those servers (dropped otherwise).
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from . import free_port, terminate

REPO = Path(__file__).resolve().parents[2]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def render(text: str, port: int, stats_port: int, servers: list[tuple[str, int]],
           http_ports: dict[str, int] | None = None,
           agent_ports: dict[str, int] | None = None) -> str:
    """The deploy config with its ports and servers replaced (see the module docstring)."""
    out, seen_server, binds, backend, seen_files = [], False, 0, "", False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("backend "):
            backend = stripped.split()[1]
        if stripped.startswith("bind "):
            out.append(f"    bind 127.0.0.1:{port if binds == 0 else stats_port}")
            binds += 1
        elif stripped.startswith("server ") and backend == "streamd_files":
            if not seen_files:  # health from the node's /healthz on its WebSocket port
                out += [f"    server {name} 127.0.0.1:{http_ports[name]} check port {p}"
                        for name, p in servers if name in (http_ports or {})]
                seen_files = True
        elif stripped.startswith("server "):
            if not seen_server:
                agents = agent_ports or {}
                out += [f"    server {name} 127.0.0.1:{p}" + (
                    f" agent-check agent-port {agents[name]}" if name in agents else "")
                    for name, p in servers]
                seen_server = True
        else:
            out.append(line)
    assert binds == 2 and seen_server, "deploy/haproxy/haproxy.cfg lost its bind/server lines"
    return "\n".join(out) + "\n"


class HAProxy:
    def __init__(self, workdir: Path, servers: list[tuple[str, int]],
                 http_ports: dict[str, int] | None = None,
                 agent_ports: dict[str, int] | None = None) -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.servers = servers
        self.config_path = Path(workdir) / f"haproxy-{self.port}.cfg"
        self.config_path.write_text(render(HAPROXY_CFG.read_text(), self.port,
                                           self.stats_port, servers, http_ports,
                                           agent_ports))
        self.log_path = Path(workdir) / f"haproxy-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self) -> dict[str, dict[str, str]]:
        """The stats page's CSV rows of backend servers, by server name."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=2) as r:
            text = r.read().decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] == "streamd_nodes"}

    def status(self, server: str) -> str:
        return re.split(r"[ (]", self.stats()[server]["status"])[0]

    def wait_status(self, server: str, want: str, timeout: float = 15.0) -> float:
        """Seconds until `server`'s check status is `want` (UP, NOLB, DOWN)."""
        t0 = time.monotonic()
        while (got := self.status(server)) != want:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{server} is {got}, not {want}:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def start(self) -> None:
        if not Path(HAPROXY).exists():
            pytest.skip("haproxy is not installed (scripts/install-system-deps.sh)")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)],
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log_text()[-2000:]}")
            try:
                self.stats()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for name, _ in self.servers:
            self.wait_status(name, "UP")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc, 5)

    def __enter__(self) -> HAProxy:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
