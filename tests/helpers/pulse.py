"""A user-space PulseAudio whose `virtmic` source is fed from a WAV at real-time pace.

PortAudio (through ALSA's pulse plugin) then sees a real capture device named `pulse`:

    with PulseAudio(tmp_path) as pa:         # server up, this process pointed at it
        feeder = pa.play(wav_path)           # thread writing 16 kHz s16le at real time
        ... record from sounddevice device "pulse" ...

Everything is torn down in `stop()`/`__exit__` (feeder thread, server by its pid), and
the environment of this process is restored. As root pulseaudio only warns. The
fixture `pulse` gives a started server per test (`pytest_plugins = ["helpers.pulse"]`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from . import terminate

PULSEAUDIO = shutil.which("pulseaudio") or "/usr/bin/pulseaudio"
PACTL = shutil.which("pactl") or "/usr/bin/pactl"


def refresh_portaudio() -> None:
    """Re-enumerate devices: PortAudio lists them once, at initialization."""
    import sounddevice as sd

    sd._terminate()  # noqa: SLF001 - sounddevice's own way to rescan
    sd._initialize()  # noqa: SLF001


class Feeder:
    """Writes int16 samples into the pipe source's FIFO at real-time pace, then keeps the
    source alive with silence until `stop()` (a pipe source with no writer delivers
    nothing, which would stall capture)."""

    def __init__(self, fifo: Path, samples: np.ndarray, rate: int, block_ms: int = 20) -> None:
        self.samples = np.ascontiguousarray(samples, dtype="<i2")
        self.rate = rate
        self.block = rate * block_ms // 1000
        self.started_at: float | None = None  # time.monotonic() of the first write
        self.finished = threading.Event()  # the whole signal has been written
        self._stop = threading.Event()
        self._fifo = fifo
        self._thread = threading.Thread(target=self._run, name="pulse-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        silence = np.zeros(self.block, "<i2").tobytes()
        with contextlib.suppress(OSError), open(self._fifo, "wb", buffering=0) as fifo:
            t0 = self.started_at = time.monotonic()
            written = 0
            while not self._stop.is_set():
                if written < len(self.samples):
                    chunk = self.samples[written:written + self.block].tobytes()
                else:
                    self.finished.set()
                    chunk = silence
                fifo.write(chunk)
                written += len(chunk) // 2
                delay = t0 + written / self.rate - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class PulseAudio:
    """One pulseaudio process (not daemonized: we own its pid) with a pipe source."""

    def __init__(self, workdir: Path, rate: int = 16000, source: str = "virtmic") -> None:
        self.rate = rate
        self.source = source
        # A short private (0700) folder: unix socket paths are limited to 107 bytes.
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="streamd-pa-"))
        self.fifo = self.runtime_dir / source
        self.log_path = Path(workdir) / "pulseaudio.log"
        self.server = f"unix:{self.runtime_dir}/pulse/native"
        self._proc: subprocess.Popen[bytes] | None = None
        self._feeders: list[Feeder] = []
        self._saved_env: dict[str, str | None] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for a child process that should use this server."""
        return {**os.environ, "PULSE_SERVER": self.server,
                "XDG_RUNTIME_DIR": str(self.runtime_dir)}

    def _pactl(self, *args: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PACTL, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, timeout: float = 15.0) -> None:
        if not (os.path.exists(PULSEAUDIO) and os.path.exists(PACTL)):
            pytest.skip("pulseaudio/pactl not installed (scripts/install-system-deps.sh)")
        env = {**self.env, "HOME": str(self.runtime_dir)}  # cookie and state stay here
        env.pop("PULSE_SERVER")
        cmd = [PULSEAUDIO, "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit",
               "-n", "--log-target=file:" + str(self.log_path),
               "-L", "module-native-protocol-unix auth-anonymous=1",
               "-L", (f"module-pipe-source source_name={self.source} file={self.fifo} "
                     f"format=s16le rate={self.rate} channels=1"),
               "-L", "module-null-sink"]
        self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while self._pactl("info", timeout=2).returncode != 0:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pulseaudio did not start:\n{self.log_text()[-2000:]}")
                time.sleep(0.05)
            result = self._pactl("set-default-source", self.source)
            if result.returncode != 0:
                raise RuntimeError(f"pactl set-default-source: {result.stderr}")
            for key in ("PULSE_SERVER", "XDG_RUNTIME_DIR"):  # for PortAudio in this process
                self._saved_env[key] = os.environ.get(key)
                os.environ[key] = self.env[key]
            refresh_portaudio()
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def play(self, audio: Path | np.ndarray) -> Feeder:
        """Feed a WAV file (or int16 samples at `rate`) into the source at real time."""
        if isinstance(audio, np.ndarray):
            samples = audio
        else:
            import soundfile as sf

            samples, rate = sf.read(str(audio), dtype="int16", always_2d=True)
            if rate != self.rate:
                raise ValueError(f"{audio} is {rate} Hz, the source runs at {self.rate} Hz")
            samples = samples.mean(axis=1).astype(np.int16)
        feeder = Feeder(self.fifo, samples, self.rate)
        self._feeders.append(feeder)
        return feeder

    def stop(self) -> None:
        """Stop feeders, then the server (SIGTERM, SIGKILL after 5 s); restore the env."""
        for feeder in self._feeders:
            feeder.stop()
        self._feeders.clear()
        proc, self._proc = self._proc, None
        try:
            terminate(proc, 5)
        finally:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if self._saved_env:
                self._saved_env.clear()
                refresh_portaudio()  # forget the device that is gone
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> PulseAudio:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def pulse(tmp_path: Path) -> Iterator[PulseAudio]:
    """A started user-space PulseAudio with the `virtmic` pipe source (16 kHz mono)."""
    with PulseAudio(tmp_path) as server:
        yield server
