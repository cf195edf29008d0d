"""Test helpers that run real services (a mosquitto broker, a user-space PulseAudio).

Each helper is a context manager that always cleans up (no leaked processes), plus a
pytest fixture built on it. With `tests/` on sys.path (pytest puts it there for
`tests/conftest.py`) they import as `helpers.mosquitto` and `helpers.pulse`; to get the
fixtures (`mosquitto`, `pulse`) in a test module, write
`pytest_plugins = ["helpers.mosquitto"]` there (or list both in tests/conftest.py).
"""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

# Test modules import these helpers and also load them as plugins (for the fixtures):
# rewrite their asserts from the first import on, as pytest does for plugins.
pytest.register_assert_rewrite(f"{__name__}.mosquitto", f"{__name__}.pulse")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def terminate(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM a still-running process, SIGKILL it after `grace` seconds; wait for it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
