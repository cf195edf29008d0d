"""systemd integration: the unit file, the install script, and the daemon as a real
process: sd_notify READY/WATCHDOG/STOPPING, SIGTERM mid-utterance, start-up failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.plugins import install_plugin
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "streamd.service"
VENV_STREAMD = Path(sys.executable).parent / "streamd"


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this venv's console script (verify checks it)."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/streamd/venv/bin/streamd serve" in text
    unit = tmp_path / "streamd.service"
    unit.write_text(text.replace("/opt/streamd/venv/bin/streamd", str(VENV_STREAMD)))
    return unit


@pytest.fixture
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    if not VENV_STREAMD.exists():
        pytest.skip(f"console script {VENV_STREAMD} missing (pip install -e .)")
    return path


def test_unit_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    result = subprocess.run([systemd_analyze, "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on some problems (e.g. an unparsable Type=) but always reports them.
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr and "streamd.service" not in result.stderr, result.stderr


def test_template_unit_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    """streamd@.service: one node of several (docs/scale-out.md), checked as an instance."""
    text = (REPO / "systemd" / "streamd@.service").read_text()
    unit = tmp_path / "streamd@node1.service"
    unit.write_text(text.replace("/opt/streamd/venv/bin/streamd", str(VENV_STREAMD)))
    result = subprocess.run([systemd_analyze, "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "streamd@" not in result.stderr, result.stderr
    assert "StateDirectory=streamd/%i" in text and "--node %i" in text


def test_unit_contract() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expect = {"Type": "notify", "Restart": "on-failure", "DynamicUser": "yes",
              "SupplementaryGroups": "audio", "ProtectSystem": "strict",
              "NoNewPrivileges": "yes", "PrivateTmp": "yes", "StateDirectory": "streamd",
              "CacheDirectory": "streamd"}
    for key, value in expect.items():
        assert settings.get(key) == [value], key
    assert "WatchdogSec" in settings and "RestrictAddressFamilies" in settings
    env = settings["Environment"]
    assert any(v.startswith("JAX_COMPILATION_CACHE_DIR=%C/streamd") for v in env)
    # XLA writes executable code: this would break JAX.
    assert "MemoryDenyWriteExecute" not in settings


def test_unit_security_exposure(systemd_analyze: str, tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    result = subprocess.run([systemd_analyze, "security", "--offline=yes", "--no-pager",
                             str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout[-500:]
    score = float(match.group(1))
    print(f"\nsystemd-analyze security exposure: {score} (0 locked down .. 10 exposed)")
    assert score <= 3.0


def test_install_script_stages(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = subprocess.run(
        ["bash", str(REPO / "systemd" / "install.sh"), "--root", str(root), "--no-venv",
         "--no-enable", "--prefix", "/srv/sd"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    unit = (root / "etc/systemd/system/streamd.service").read_text()
    assert "ExecStart=/srv/sd/venv/bin/streamd serve --config /etc/streamd/streamd.toml" in unit
    template = (root / "etc/systemd/system/streamd@.service").read_text()
    assert "ExecStart=/srv/sd/venv/bin/streamd serve --config /etc/streamd/%i.toml" in template
    config = root / "etc/streamd/streamd.toml"
    assert config.read_text() == (REPO / "streamd.example.toml").read_text()
    bad = subprocess.run(["bash", str(REPO / "systemd" / "install.sh"), "--bogus"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


# --- the daemon as a process --------------------------------------------------------


class NotifyListener:
    """A bound NOTIFY_SOCKET collecting sd_notify datagrams on a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, field: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if field in m.split("\n"):
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")

    def count(self, field: str) -> int:
        return sum(field in m.split("\n") for m in list(self.messages))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def _spawn(tmp_path: Path, *args: str, pythonpath: tuple[Path, ...] = (),
           **env: str) -> tuple[subprocess.Popen, NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    full_env.update(NOTIFY_SOCKET=str(listener.path), JAX_PLATFORMS="cpu",
                    PYTHONPATH=os.pathsep.join(map(str, [REPO, *pythonpath])), **env)
    proc = subprocess.Popen([sys.executable, "-m", "streamd.daemon", "--port", "0",
                             "--node", "proc", *args], cwd=tmp_path, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, listener


def _stop(proc: subprocess.Popen, listener: NotifyListener) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)
    listener.close()


def _mosquitto(tmp_path: Path) -> tuple[subprocess.Popen, int] | None:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                        if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


class _Subscriber:
    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, json.loads(m.payload)))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_sigterm_mid_utterance_delivers_final(tmp_path: Path, shared_audio_dir: Path) -> None:
    broker = _mosquitto(tmp_path)
    mqtt_args = ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker[1])] if broker else []
    sub = _Subscriber(broker[1], "streamd/#") if broker else None
    # slow-echo: a pipeline from another package (tests/plugins/), finals take 1 s.
    plugin = install_plugin(tmp_path, "streamd-slow-echo")
    proc, listener = _spawn(tmp_path, *mqtt_args, "--pipeline", "slow-echo",
                            pythonpath=(plugin,), WATCHDOG_USEC="200000")
    try:
        ready = listener.wait_for("READY=1", 60)
        port = int(re.search(r"serving on port (\d+)", ready).group(1))
        listener.wait_for("WATCHDOG=1", 5)
        audio, _ = sf.read(shared_audio_dir / "librispeech_61-70968-0002.wav", dtype="float32")
        pcm = (np.concatenate([np.zeros(8000, np.float32), audio[:24000]]) * 32767).astype("<i2")
        with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000,
                                "encoding": "pcm_s16le", "channels": 1, "session": "term"}))
            ready_event = json.loads(ws.recv(timeout=10))
            assert ready_event["type"] == "ready", ready_event
            ws.send(pcm.tobytes())  # 2 s in: the speaker is mid-sentence
            assert json.loads(ws.recv(timeout=10))["type"] == "speech_start"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    events.append(json.loads(ws.recv(timeout=15)))
        assert closed.value.rcvd.code == 1001  # going away, after the final
        finals = [e for e in events if e["type"] == "final"]
        assert len(finals) == 1 and finals[0]["segment"] == 0
        assert float(finals[0]["text"]) == pytest.approx(finals[0]["end"] - finals[0]["start"],
                                                         abs=0.011)
        assert events[-1] == {"type": "done", "session": "term", "segments": 1}
        rc = proc.wait(timeout=20)
        assert rc == 0
        assert time.monotonic() - t0 >= 1.0  # it waited for the (slow) final
        assert listener.count("STOPPING=1") == 1
        assert listener.count("WATCHDOG=1") >= 2
        _, stderr = proc.communicate(timeout=5)
        logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        assert any(r["msg"] == "ready" for r in logs) and any(r["msg"] == "stopped" for r in logs)
        if sub is not None:  # the final also reached MQTT before exit
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                    t == "streamd/term/final" for t, _ in sub.messages):
                time.sleep(0.05)
            got = [p for t, p in sub.messages if t == "streamd/term/final"]
            assert len(got) == 1
            assert got[0]["text"] == finals[0]["text"] and got[0]["node"] == "proc"
    finally:
        _stop(proc, listener)
        if sub is not None:
            sub.close()
        if broker is not None:
            broker[0].kill()
            broker[0].wait(5)


def test_pipeline_without_model_fails_clearly(tmp_path: Path) -> None:
    proc, listener = _spawn(tmp_path, "--pipeline", "two-pass")
    try:
        rc = proc.wait(timeout=60)
        _, stderr = proc.communicate(timeout=5)
        assert rc == 1
        assert "recognition.model" in stderr, stderr
        assert listener.count("READY=1") == 0
    finally:
        _stop(proc, listener)


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad]\naggressiveness = 7\n")
    for args, key in ((["--config", str(bad)], "vad.aggressiveness"),
                      (["--port", "70000"], "server.port")):
        proc, listener = _spawn(tmp_path, *args)
        try:
            rc = proc.wait(timeout=60)
            _, stderr = proc.communicate(timeout=5)
            assert rc == 2 and key in stderr, stderr
        finally:
            _stop(proc, listener)
            (tmp_path / "notify.sock").unlink(missing_ok=True)
