"""`streamd-stream --json` as a subprocess, its events recorded with their arrival times.

    with StreamClient(url, wav_path, "--speed", "4", "--session", "s1") as client:
        client.wait_for(lambda e: e["type"] == "partial", timeout=30)   # the event
        ... kill a daemon ...
        rc = client.wait(120)
    client.events   # [(time.time() at arrival, event), ...]; client.stderr_text()

The client runs as `python -m clients.stream` from the repository (no console script
needed); stderr goes to a file in `workdir`. Used by tests/streamd/test_scale_out.py and
bench/cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


class StreamClient:
    def __init__(self, url: str, path: Path | str, *args: str,
                 workdir: Path | str | None = None) -> None:
        self.cmd = [sys.executable, "-m", "clients.stream", "--json", "--url", url,
                    *args, str(path)]
        workdir = Path(workdir) if workdir is not None else Path.cwd()
        self.stderr_path = workdir / f"client-{os.getpid()}-{id(self):x}.err"
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("STREAMD_URL", "STREAMD_TOKEN")}
        env["PYTHONPATH"] = str(REPO)
        with open(self.stderr_path, "w") as err:
            self._proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=err, text=True,
                                          cwd=REPO, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.time()
            event = json.loads(line)
            with self._cond:
                self.events.append((now, event))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float) -> tuple[float, dict[str, Any]]:
        """The first event (arrival time, event) for which `predicate` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.events:
                    if predicate(item[1]):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or (self._proc is not None and self._proc.poll() is not None
                                 and not (self._reader and self._reader.is_alive())):
                    raise TimeoutError(f"no such event; client stderr:\n{self.stderr_text()}")
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout: float) -> int:
        assert self._proc is not None
        rc = self._proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> StreamClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.stop()
