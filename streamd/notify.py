"""systemd notify protocol (sd_notify) without libsystemd: READY, WATCHDOG, STOPPING, STATUS."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("streamd.notify")


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET; a no-op when the daemon is not run by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        valid = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # Ping at half the deadline, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval: float | None = int(usec) / 2e6 if valid else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:  # systemd gone or socket full: never fatal
            log.warning("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str = "serving") -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "shutting down") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
