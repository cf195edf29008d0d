"""`streamd-listen` as a subprocess against a real mosquitto and a real `streamd serve`.

The daemon (test recognizer, see test_stream.py) publishes what `streamd-stream` sends
it; the listener must print the same finals the streaming client got over WebSocket,
survive a broker restart, and refuse bad credentials with a clear message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import soundfile as sf
from helpers.daemon import Daemon
from helpers.mosquitto import Mosquitto
from test_stream import (
    Final,
    check_against_reference,
    padded_utterance,
    run_client,
    run_daemon,
    script,
)

LINE_RE = re.compile(r"^(\S+)( ~)? \[(\d+):(\d\d\.\d\d) - (\d+):(\d\d\.\d\d)\] (.*)$")


class Listener:
    """A running streamd-listen whose output goes to files the test polls."""

    def __init__(self, workdir: Path, broker: Mosquitto, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.out_path = workdir / f"listen-{time.monotonic_ns()}.out"
        self.err_path = self.out_path.with_suffix(".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [script("streamd-listen"), "--host", broker.host, "--port", str(broker.port),
                 "--max-backoff", "1", *args],
                stdout=out, stderr=err, env={**os.environ, **(env or {})},
                # A run started in the background of a non-interactive shell inherits SIGINT
                # ignored, and Python then keeps it ignored: the listener would never see
                # the Ctrl-C that stop() sends.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, what: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
            time.sleep(0.05)

    def subscribed(self, times: int = 1) -> None:
        self.wait(lambda: self.stderr.count("subscribed on") >= times)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def listen_finals(stdout: str) -> tuple[list[tuple[str, Final]], list[str]]:
    """(session, Final) of the final lines, and the partial lines."""
    finals, partials = [], []
    for line in stdout.splitlines():
        m = LINE_RE.match(line)
        assert m, f"unexpected output line {line!r}"
        if m[2]:
            partials.append(line)
            continue
        start, end = int(m[3]) * 60 + float(m[4]), int(m[5]) * 60 + float(m[6])
        finals.append((m[1], Final(start, end, m[7])))
    return finals, partials


def stream_events(daemon: Daemon, path: Path, session: str) -> list[dict]:
    out = run_client(daemon, "--json", "--speed", "0", "--session", session, str(path))
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture
def broker(tmp_path: Path):
    with Mosquitto(tmp_path) as b:
        yield b


@pytest.fixture
def daemon(tmp_path: Path, broker: Mosquitto):
    with run_daemon(tmp_path, "--mqtt-host", broker.host, "--mqtt-port", str(broker.port)) as d:
        yield d


@pytest.fixture(scope="module")
def utterance(shared_manifest: list[dict], tmp_path_factory: pytest.TempPathFactory):
    """The 11.7 s LibriSpeech utterance after 0.5 s of silence: (path, reference span)."""
    entry = next(e for e in shared_manifest if e["audio"].startswith("librispeech_2412"))
    path = tmp_path_factory.mktemp("audio") / "utterance.wav"
    sf.write(path, padded_utterance(entry), 16000)
    return path, (0.5, 0.5 + entry["duration_s"])


def test_prints_the_finals_the_stream_client_got(tmp_path, broker, daemon, utterance):
    path, span = utterance
    listener = Listener(tmp_path, broker, "--partials", "--session", "listen-1")
    try:
        listener.subscribed()
        events = stream_events(daemon, path, "listen-1")
        sent = [e for e in events if e["type"] == "final"]
        listener.wait(lambda: len(listen_finals(listener.stdout)[0]) >= len(sent))
    finally:
        assert listener.stop() == 0, f"streamd-listen did not exit on SIGINT:\n{listener.stderr}"
    finals, partials = listen_finals(listener.stdout)
    assert finals == [("listen-1", Final(e["start"], e["end"], e["text"])) for e in sent]
    assert partials and all(p.startswith("listen-1 ~ [") for p in partials)
    check_against_reference([f for _, f in finals], [span])


def test_json_payloads_and_count(tmp_path, broker, daemon, shared_manifest):
    entry = next(e for e in shared_manifest if e["audio"].startswith("librispeech_61"))
    path = tmp_path / "short.wav"
    sf.write(path, padded_utterance(entry), 16000)
    listener = Listener(tmp_path, broker, "--json", "--count", "1")
    try:
        listener.subscribed()
        events = stream_events(daemon, path, "listen-json")
        assert listener.proc.wait(20) == 0  # --count 1: exits after the first final
    finally:
        listener.stop()
    sent = next(e for e in events if e["type"] == "final")
    (line,) = listener.stdout.splitlines()
    payload = json.loads(line)
    assert {k: payload[k] for k in sent} == sent  # the WebSocket event, plus MQTT fields
    assert payload["node"] == "clients-test"
    assert isinstance(payload["seq"], int) and abs(payload["ts"] - time.time()) < 60


def test_survives_a_broker_restart(tmp_path, broker, daemon, utterance):
    path, span = utterance
    listener = Listener(tmp_path, broker, "--session", "listen-2")
    try:
        listener.subscribed()
        broker.stop(kill=True)
        listener.wait(lambda: "unavailable" in listener.stderr)
        time.sleep(1.0)  # a few failed reconnects while the broker is down
        broker.start()
        listener.subscribed(times=2)
        events = stream_events(daemon, path, "listen-2")
        sent = [e for e in events if e["type"] == "final"]
        # The daemon may still be reconnecting; its outbox delivers the finals after.
        listener.wait(lambda: len(listen_finals(listener.stdout)[0]) >= len(sent))
    finally:
        assert listener.stop() == 0, f"streamd-listen did not exit on SIGINT:\n{listener.stderr}"
    finals, _ = listen_finals(listener.stdout)
    assert finals == [("listen-2", Final(e["start"], e["end"], e["text"])) for e in sent]
    check_against_reference([f for _, f in finals], [span])


def _publish_final(broker: Mosquitto, **tls: str) -> None:
    """One final published by a plain paho client, as a daemon would."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set("streamd", "s3cret")
    if tls:
        client.tls_set(ca_certs=tls["ca"])
    client.connect(broker.host, broker.port)
    client.loop_start()
    event = {"type": "final", "session": "tls", "segment": 0, "start": 1.25, "end": 2.5,
             "text": "over tls", "node": "n", "seq": 0, "ts": time.time()}
    client.publish("streamd/tls/final", json.dumps(event), qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def test_tls_and_password(tmp_path):
    with Mosquitto(tmp_path, tls=True, users={"streamd": "s3cret"}) as broker:
        assert broker.ca_file is not None
        listener = Listener(tmp_path, broker, "--cafile", str(broker.ca_file),
                            "--username", "streamd", "--password-env", "MQTT_PW", "--count", "1",
                            env={"MQTT_PW": "s3cret"})
        try:
            listener.subscribed()
            _publish_final(broker, ca=str(broker.ca_file))
            assert listener.proc.wait(20) == 0
        finally:
            listener.stop()
        assert listener.stdout == "tls [0:01.25 - 0:02.50] over tls\n"

        wrong = Listener(tmp_path, broker, "--cafile", str(broker.ca_file),
                         "--username", "streamd", "--password", "nope")
        try:
            assert wrong.proc.wait(20) == 1  # retrying cannot fix bad credentials
        finally:
            wrong.stop()
        assert "refused" in wrong.stderr


def test_bad_usage(tmp_path):
    out = subprocess.run([script("streamd-listen"), "--cafile", str(tmp_path / "missing.pem")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no such file" in out.stderr




def test_resent_events_print_once(tmp_path, broker):
    """After a reconnect the daemon re-sends unacknowledged finals with the same
    (node, session, seq); the listener prints each once."""
    listener = Listener(tmp_path, broker, "--status", "--count", "2")
    event = {"type": "final", "session": "s", "segment": 0, "start": 59.999, "end": 61.5,
             "text": " hello ", "node": "n", "seq": 3, "ts": 1.0}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    try:
        listener.subscribed()
        client.connect(broker.host, broker.port)
        client.loop_start()
        for payload in (event, event, {"state": "offline", "reason": "lost"},
                        {**event, "seq": 4, "text": "again"}):
            topic = "streamd/status/n" if "state" in payload else "streamd/s/final"
            client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(10)
        assert listener.proc.wait(20) == 0
    finally:
        client.loop_stop()
        listener.stop()
    assert listener.stdout.splitlines() == [
        "s [1:00.00 - 1:01.50] hello", "status n: offline (lost)",
        "s [1:00.00 - 1:01.50] again"]
