"""`streamd serve` run as a user runs it (a subprocess with flags) against a real
Mosquitto with TLS listeners; the recognizer is the `echo` pipeline (text: the segment's
duration)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import free_port
from helpers.daemon import REPO, serve, stream_session
from helpers.mosquitto import Mosquitto, Subscriber, _make_certs

pytestmark = pytest.mark.timeout(180)

TEST_PIPELINE = {"STREAMD_RECOGNITION_PIPELINE": "echo"}
USERS = {"streamd": "s3cret"}


def _client_cert(broker: Mosquitto, name: str) -> tuple[Path, Path]:
    """A client certificate signed by the broker's throw-away CA."""
    folder = broker.workdir
    key, csr, cert = (folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    for cmd in (
        ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", folder / "ca.crt", "-CAkey", folder / "ca.key",
         "-CAcreateserial", "-days", "2", "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return cert, key


def _mutual_tls_broker(tmp_path: Path) -> tuple[Mosquitto, int]:
    """A TLS broker with passwords: its main listener (for the test subscriber) and a
    second one on the returned port that also requires a client certificate."""
    port, mtls_port = free_port(), free_port()
    folder = tmp_path / f"mosquitto-{port}"  # where Mosquitto puts its certificates
    broker = Mosquitto(tmp_path, port, tls=True, users=USERS, extra_config=(
        f"listener {mtls_port} 127.0.0.1",
        f"cafile {folder / 'ca.crt'}",
        f"certfile {folder / 'server.crt'}",
        f"keyfile {folder / 'server.key'}",
        "require_certificate true",
    ))
    return broker, mtls_port


def _wait_for_log(daemon, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := daemon.log_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the daemon's log:\n{log[-3000:]}")
        time.sleep(0.1)
    return log


def test_serve_publishes_finals_over_mutual_tls(tmp_path: Path, shared_audio_dir: Path) -> None:
    """`streamd serve --mqtt-tls --mqtt-ca --mqtt-cert --mqtt-key --mqtt-client-id
    --mqtt-username --mqtt-password-file`: a streamed segment's final reaches a TLS
    subscriber; the broker saw our client id, and refuses the same daemon without the
    client certificate."""
    audio, rate = sf.read(shared_audio_dir / "librispeech_61-70968-0002.wav", dtype="float32")
    assert rate == 16000
    # Silence around the utterance, so the VAD's endpoint fires.
    audio = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)])
    broker, mtls_port = _mutual_tls_broker(tmp_path)
    password = tmp_path / "mqtt-password"
    password.write_text(USERS["streamd"] + "\n")
    with broker:
        assert broker.ca_file is not None
        cert, key = _client_cert(broker, "streamd-client")
        args = ["--node", "tlsnode", "--mqtt-host", broker.host, "--mqtt-port", str(mtls_port),
                "--mqtt-tls", "--mqtt-ca", str(broker.ca_file), "--mqtt-cert", str(cert),
                "--mqtt-key", str(key), "--mqtt-client-id", "streamd-tls-test",
                "--mqtt-username", "streamd", "--mqtt-password-file", str(password)]

        async def run() -> tuple[list[dict], list[dict], list[dict]]:
            async with Subscriber(broker, ["streamd/#"]) as sub:
                with serve(tmp_path, *args, env=TEST_PIPELINE) as daemon:
                    await sub.wait_for(lambda _: bool(sub.payloads("streamd/status/tlsnode")))
                    events = await asyncio.to_thread(stream_session, daemon.port, audio,
                                                     message_s=0.2, speed=10)
                    session = events[0]["session"]
                    count = sum(e["type"] == "final" for e in events)
                    await sub.wait_for(
                        lambda _: len(sub.payloads(f"streamd/{session}/final")) >= count)
                return (events, sub.payloads(f"streamd/{session}/final"),
                        sub.payloads("streamd/status/tlsnode"))

        events, finals, status = asyncio.run(run())
        ws_finals = [e for e in events if e["type"] == "final"]
        assert ws_finals and [f["text"] for f in finals] == [f["text"] for f in ws_finals]
        assert {f["node"] for f in finals} == {"tlsnode"}
        assert status[0]["state"] == "online"
        assert "as streamd-tls-test" in broker.log_text()  # our client id

        # Without the client certificate the second listener refuses the handshake.
        no_cert = [a for a in args if a not in (str(cert), str(key), "--mqtt-cert",
                                                "--mqtt-key")]
        with serve(tmp_path, *no_cert, env=TEST_PIPELINE) as daemon:
            _wait_for_log(daemon, f"mqtt cannot connect to {broker.host}:{mtls_port}")


def test_serve_says_clearly_when_the_ca_does_not_match(tmp_path: Path) -> None:
    """A CA that did not sign the broker's certificate: the daemon serves WebSocket
    clients anyway and logs why MQTT cannot connect, naming the CA file."""
    other = tmp_path / "other-ca"
    other.mkdir()
    wrong_ca, _, _ = _make_certs(other, "127.0.0.1")
    with Mosquitto(tmp_path, tls=True) as broker:
        with serve(tmp_path, "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
                   "--mqtt-tls", "--mqtt-ca", str(wrong_ca), env=TEST_PIPELINE) as daemon:
            log = _wait_for_log(daemon, "certificate verify failed")
            with urllib.request.urlopen(f"{daemon.http}/healthz", timeout=5) as r:
                health = json.load(r)
    # The broker answered and the handshake failed: `refused`, not `unreachable`.
    assert health["status"] == "ok" and health["mqtt"]["state"] == "refused"
    assert health["mqtt"]["last_error"].startswith("tls: ")
    line = next(x for x in log.splitlines() if "certificate verify failed" in x)
    assert f"mqtt cannot connect to {broker.host}:{broker.port}" in line
    assert f"does not verify against mqtt.tls_ca_file '{wrong_ca}'" in line


def test_serve_refuses_tls_files_without_tls(tmp_path: Path) -> None:
    """A bad flag combination stops `streamd serve` at once (exit 2), naming the key."""
    (tmp_path / "ca.pem").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "streamd.cli", "serve", "--mqtt-host", "127.0.0.1",
         "--mqtt-ca", str(tmp_path / "ca.pem")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")})
    assert proc.returncode == 2
    assert "'mqtt.tls_ca_file': needs mqtt.tls = true (--mqtt-tls)" in proc.stderr


def test_tls_failure_hints(tmp_path: Path) -> None:
    """The log line of a failed connection says what TLS found, naming the setting."""
    import ssl

    from streamd.config import MqttConfig
    from streamd.mqtt import describe_failure

    def wrapped(cause: BaseException) -> Exception:
        try:
            try:
                raise cause
            except BaseException as inner:
                raise RuntimeError("connect failed") from inner
        except RuntimeError as exc:
            return exc

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = MqttConfig(host="b", port=8883, tls=True, tls_ca_file=str(ca))
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert f"does not verify against mqtt.tls_ca_file {str(ca)!r}" in \
        describe_failure(s, wrapped(verify))
    assert "the system CAs" in describe_failure(MqttConfig(host="b", tls=True),
                                                wrapped(verify))
    assert "TLS handshake failed" in describe_failure(s, wrapped(ssl.SSLError(1, "alert")))
    assert "is b:8883 a TLS listener?" in describe_failure(
        s, wrapped(ConnectionResetError(104, "reset")))
    assert "is c:1 a TLS listener?" in describe_failure(  # the broker tried, when given
        s, wrapped(ConnectionResetError(104, "reset")), ("c", 1))
    assert describe_failure(MqttConfig(host="b"), wrapped(ConnectionResetError())) == ""
    assert describe_failure(s, RuntimeError("timed out")) == ""
