"""Real headless Chromium driven over the DevTools protocol (no extra packages).

    with Chromium(tmp_path, fake_audio=wav) as browser:      # started, page target found
        async with DevTools.connect(browser.page_ws_url()) as page:
            await page.navigate("http://127.0.0.1:8765/?token=t")
            await page.evaluate("document.getElementById('toggle').click()", gesture=True)
            await page.wait_for("window.streamd.finals.length > 0", timeout=60)
            png = await page.screenshot()

The browser gets a fresh profile, the fake microphone plays `fake_audio` (a WAV file;
once, unless `loop_audio`), and the flags that stop it from calling home on a machine
without network. The process group is killed on exit, whatever happened.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from . import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUIET_FLAGS = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-default-apps",
    "--disable-extensions",
)


class Chromium:
    """One headless Chromium process with remote debugging on a free loopback port."""

    def __init__(
        self,
        workdir: Path,
        *,
        fake_audio: Path | None = None,
        loop_audio: bool = False,
        grant_microphone: bool = True,
        window: tuple[int, int] = (1000, 700),
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.profile = Path(workdir) / f"chromium-profile-{self.port}"
        self.log_path = Path(workdir) / f"chromium-{self.port}.log"
        args = [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            # Answer the microphone prompt: grant (fake UI) or deny.
            "--use-fake-ui-for-media-stream" if grant_microphone else "--deny-permission-prompts",
            "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required",
            *QUIET_FLAGS,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={self.port}",
            f"--window-size={window[0]},{window[1]}",
            *extra_args,
        ]
        if fake_audio is not None:
            suffix = "" if loop_audio else "%noloop"
            args.append(f"--use-file-for-fake-audio-capture={fake_audio}{suffix}")
        self.args = [*args, "about:blank"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 30.0) -> None:
        if not os.path.exists(CHROMIUM):
            pytest.skip("chromium is not installed (scripts/install-system-deps.sh)")
        self.profile.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: renderers die with it
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"chromium exited at start-up:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                if self._targets("page"):
                    return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"chromium DevTools not up on port {self.port}:\n{self.log_text()}")

    def _targets(self, kind: str) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
            return [t for t in json.load(r) if t.get("type") == kind]

    def page_ws_url(self) -> str:
        """DevTools WebSocket URL of the first page (tab)."""
        return str(self._targets("page")[0]["webSocketDebuggerUrl"])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            if proc is not None:
                # Helpers (zygote, renderers) share the group; make sure none outlive us.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DevToolsError(RuntimeError):
    pass


class DevTools:
    """Minimal DevTools protocol client for one page: commands, events, JS evaluation."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.console: list[str] = []  # console messages and uncaught exceptions of the page
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[DevTools]:
        from websockets.asyncio.client import connect

        async with connect(url, max_size=64 * 2**20, proxy=None) as ws:
            page = cls(ws)
            try:
                await page.call("Page.enable")
                await page.call("Runtime.enable")
                yield page
            finally:
                page._reader.cancel()

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg:
                future = self._waiting.pop(msg["id"], None)
                if future is not None and not future.done():
                    future.set_result(msg)
                continue
            method = msg.get("method", "")
            params = msg.get("params", {})
            if method == "Runtime.consoleAPICalled":
                args = params.get("args", [])
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                self.console.append(f"{params.get('type')}: {text}")
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                desc = details.get("exception", {}).get("description", details.get("text"))
                self.console.append(f"exception: {desc}")
            self.events.put_nowait(msg)

    async def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        await self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            while True:
                msg = await self.events.get()
                if msg.get("method") == method:
                    return dict(msg.get("params", {}))

        return await asyncio.wait_for(first(), timeout)

    async def navigate(self, url: str, timeout: float = 30.0) -> None:
        """Open `url` and wait for its load event."""
        while not self.events.empty():  # forget load events of earlier pages
            self.events.get_nowait()
        reply = await self.call("Page.navigate", url=url)
        if reply.get("errorText"):
            raise DevToolsError(f"navigate {url}: {reply['errorText']}")
        await self.wait_event("Page.loadEventFired", timeout)

    async def evaluate(self, expression: str, *, gesture: bool = False) -> Any:
        """Value of a JS expression (promises awaited); page exceptions raise DevToolsError."""
        reply = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True,
            awaitPromise=True, userGesture=gesture,
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            desc = details.get("exception", {}).get("description", details.get("text"))
            raise DevToolsError(f"JS error in {expression!r}: {desc}")
        return reply.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0, every: float = 0.2) -> Any:
        """Poll until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {expression!r}")
            await asyncio.sleep(every)

    async def screenshot(self) -> bytes:
        reply = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(reply["data"])
