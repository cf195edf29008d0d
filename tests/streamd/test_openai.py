"""OpenAI-compatible `POST /v1/audio/transcriptions`: its form rules, decoding and response
formats as functions, and its errors through the real `openai` client against one
`streamd serve` on the test double (no model: every answer here is decided before
recognition). The real tiny.en answers in every format in tests/e2e/test_openai_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from helpers import free_port
from helpers.daemon import REPO, Daemon, serve, speech_audio, stream_session, test_pipeline_env
from helpers.haproxy import HAProxy
from test_server import running_daemon, test_config

from models.whisper.transcriber import Segment, Word
from streamd.daemon import Daemon as InProcessDaemon
from streamd.errors import ConfigError, InternalError
from streamd.openai_api import (
    ApiError,
    TranscriptionRequest,
    decode_audio,
    parse_fields,
    render,
)

TOKEN = "openai-test-token"
MAX_BYTES = 256 * 1024  # jfk.wav (352 KB) is over it
JFK = REPO / "streamd" / "data" / "jfk.wav"


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def encoded(audio: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


# --- the form, decoding and the formats, as functions --------------------------------


def test_fields_defaults_and_any_model_name() -> None:
    request = parse_fields({"model": ["whisper-1"]})
    assert request == TranscriptionRequest("whisper-1")
    assert request.granularities == {"segment"} and not request.words
    words = parse_fields({"model": ["tiny.en"], "response_format": ["verbose_json"],
                          "timestamp_granularities[]": ["word", "segment"],
                          "language": ["EN"], "prompt": ["Kennedy"], "temperature": ["0.2"]})
    assert words.words and words.granularities == {"word", "segment"}
    assert (words.language, words.prompt, words.temperature) == ("en", "Kennedy", 0.2)


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({}, "model", "missing_required_parameter"),
    ({"model": ["m"], "response_format": ["xml"]}, "response_format", "invalid_value"),
    ({"model": ["m"], "timestamp_granularities[]": ["word"]}, "timestamp_granularities[]",
     "invalid_value"),  # needs verbose_json
    ({"model": ["m"], "response_format": ["verbose_json"],
      "timestamp_granularities[]": ["sentence"]}, "timestamp_granularities[]", "invalid_value"),
    ({"model": ["m"], "language": ["de"]}, "language", "unsupported_language"),
    ({"model": ["m"], "prompt": ["x" * 501]}, "prompt", "invalid_value"),
    ({"model": ["m"], "temperature": ["1.5"]}, "temperature", "invalid_value"),
    ({"model": ["m"], "temperature": ["hot"]}, "temperature", "invalid_value"),
    ({"model": ["m"], "stream": ["true"]}, "stream", "unsupported_value"),
    ({"model": ["a", "b"]}, "model", None),
])
def test_fields_refused_naming_the_field(fields, param, code) -> None:
    with pytest.raises(ApiError) as caught:
        parse_fields(fields)
    error = caught.value.body()["error"]
    assert caught.value.status == 400
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param,
                                                              code)
    assert error["message"]


@pytest.mark.parametrize(("fmt", "subtype", "rate"), [
    ("WAV", "PCM_16", 44100), ("FLAC", "PCM_24", 22050), ("OGG", "VORBIS", 44100),
    ("OGG", "OPUS", 48000), ("MP3", "MPEG_LAYER_III", 44100),
])
def test_decode_any_container_to_16k_mono(fmt: str, subtype: str, rate: int) -> None:
    audio = decode_audio(encoded(tone(1.0, rate, channels=2), rate, fmt, subtype), 60)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(16000, abs=1200)  # lossy codecs pad a frame
    # Still the 440 Hz tone after the resampling.
    spectrum = np.abs(np.fft.rfft(audio[2000:14000]))
    assert np.argmax(spectrum) * 16000 / 12000 == pytest.approx(440, abs=5)


@pytest.mark.parametrize(("data", "code"), [
    (b"RIFF\x00\x00not audio at all", "invalid_value"),
    (b"", "invalid_value"),
    (encoded(tone(0.05, 16000), 16000, "WAV", "PCM_16"), "audio_too_short"),
    (encoded(tone(3.0, 8000), 8000, "WAV", "PCM_16"), "audio_too_long"),
])
def test_decode_refuses(data: bytes, code: str) -> None:
    with pytest.raises(ApiError) as caught:
        decode_audio(data, max_audio_s=2.0)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "file", code)


SEGMENTS = [
    Segment(0.0, 2.5, "Hello there.", (Word(" Hello", 0.0, 0.6, 0.9),
                                       Word(" there.", 0.7, 1.2, 0.8))),
    Segment(3725.25, 3727.0, "Bye.", (Word(" Bye.", 3725.3, 3726.0, 0.95),)),
]


def test_render_every_format() -> None:
    def body(fmt: str, *granularities: str):
        return render(TranscriptionRequest("m", fmt, frozenset(granularities or ("segment",))),
                      SEGMENTS, 3727.4)

    assert body("json") == ({"text": "Hello there. Bye.",
                             "usage": {"type": "duration", "seconds": 3728}},
                            "application/json")
    assert body("text") == ("Hello there. Bye.\n", "text/plain; charset=utf-8")
    assert body("srt")[0] == ("1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
                              "2\n01:02:05,250 --> 01:02:07,000\nBye.\n\n")
    assert body("vtt") == (("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
                           "01:02:05.250 --> 01:02:07.000\nBye.\n\n"), "text/vtt; charset=utf-8")
    verbose, _ = body("verbose_json")
    assert (verbose["task"], verbose["language"], verbose["duration"]) == (
        "transcribe", "english", 3727.4)
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [
        (0, 0.0, 2.5, "Hello there."), (1, 3725.25, 3727.0, "Bye.")]
    assert all(s["compression_ratio"] > 0 for s in verbose["segments"])
    assert "words" not in verbose
    words, _ = body("verbose_json", "word")
    assert "segments" not in words
    assert [(w["word"], w["start"], w["end"]) for w in words["words"]] == [
        ("Hello", 0.0, 0.6), ("there.", 0.7, 1.2), ("Bye.", 3725.3, 3726.0)]
    both, _ = body("verbose_json", "word", "segment")
    assert len(both["segments"]) == 2 and len(both["words"]) == 3


# --- errors through the real client, one daemon on the test double -------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    http_port = free_port()
    env = {**test_pipeline_env(), "STREAMD_SERVER_HTTP_MAX_BYTES": str(MAX_BYTES)}
    with serve(tmp_path_factory.mktemp("openai"), "--token", TOKEN,
               "--http-port", str(http_port), env=env) as running:
        yield running, http_port


def client(port: int, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)


SHORT_WAV = encoded(tone(1.0, 16000), 16000, "WAV", "PCM_16")


def refused(port: int, key: str = TOKEN, **kwargs) -> openai.APIStatusError:
    kwargs.setdefault("file", ("short.wav", SHORT_WAV))
    kwargs.setdefault("model", "whisper-1")
    with pytest.raises(openai.APIStatusError) as caught:
        client(port, key).audio.transcriptions.create(**kwargs)
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return caught.value


def test_wrong_or_missing_token(daemon) -> None:
    _, port = daemon
    error = refused(port, key="wrong")
    assert isinstance(error, openai.AuthenticationError) and error.status_code == 401
    assert error.code == "invalid_api_key"
    response = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions",
                          data={"model": "whisper-1"}, files={"file": SHORT_WAV})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_bad_response_format(daemon) -> None:
    error = refused(daemon[1], response_format="xml")
    assert isinstance(error, openai.BadRequestError)
    assert (error.status_code, error.param) == (400, "response_format")


def test_unsupported_language(daemon) -> None:
    error = refused(daemon[1], language="fr")
    assert (error.status_code, error.param, error.code) == (400, "language",
                                                            "unsupported_language")
    assert "English only" in error.message


def test_garbage_bytes(daemon) -> None:
    error = refused(daemon[1], file=("speech.mp3", b"\x00\xff garbage " * 64))
    assert (error.status_code, error.param) == (400, "file")
    assert "could not decode the audio file" in error.message


def test_too_large(daemon) -> None:
    error = refused(daemon[1], file=("jfk.wav", JFK.read_bytes()))
    assert (error.status_code, error.code) == (413, "request_too_large")
    assert str(MAX_BYTES) in error.message


def test_no_file_and_not_multipart(daemon) -> None:
    url = f"http://127.0.0.1:{daemon[1]}/v1/audio/transcriptions"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # A form without a file (multipart all the same: a dummy field forces it).
    response = httpx.post(url, headers=auth, data={"model": "whisper-1"},
                          files={"note": (None, b"no audio")})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"
    response = httpx.post(url, headers=auth, json={"model": "whisper-1"})
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["error"]["message"]
    response = httpx.get(f"http://127.0.0.1:{daemon[1]}/v1/models", headers=auth)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"


def test_pipeline_without_whisper_and_metrics(daemon) -> None:
    """A valid request reaches the pipeline: the test double has no Whisper, so it says
    so (param `model`); every answer above was counted by format and status."""
    running, port = daemon
    error = refused(port, response_format="srt")
    assert (error.status_code, error.param, error.code) == (400, "model",
                                                            "model_not_supported")
    with urllib.request.urlopen(f"{running.http}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'streamd_transcriptions_total{format="srt",status="400"}' in metrics
    assert 'streamd_queue_depth{queue="transcriptions"} 0.0' in metrics
    assert 'streamd_connections_rejected_total{reason="unauthorized"}' in metrics
    assert "listening (HTTP)" in running.log_text()


def test_one_address_behind_haproxy(daemon, tmp_path: Path) -> None:
    """deploy/haproxy/haproxy.cfg: /v1/audio/ goes to the node's HTTP port, the rest
    (here /healthz) to its WebSocket port, both through the frontend's one port."""
    running, http_port = daemon
    with HAProxy(tmp_path, [("a", running.port)], http_ports={"a": http_port}) as lb:
        url = f"http://127.0.0.1:{lb.port}"
        deadline = time.monotonic() + 15
        while True:  # the files backend's server is UP after its second health check
            response = httpx.post(f"{url}/v1/audio/transcriptions",
                                  headers={"Authorization": f"Bearer {TOKEN}"},
                                  data={"model": "whisper-1", "language": "de"},
                                  files={"file": SHORT_WAV})
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "language"
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            assert json.load(r)["status"] == "ok"


# --- the HTTP port --------------------------------------------------------------------


def port_below_a_taken_one() -> tuple[int, socket.socket]:
    """A free port P whose P + 1 is held by the returned listening socket."""
    for _ in range(100):
        port = free_port()
        blocker = socket.socket()
        try:
            blocker.bind(("127.0.0.1", port + 1))
            blocker.listen()
            return port, blocker
        except OSError:
            blocker.close()
    raise RuntimeError("no free port with a free neighbour")


def test_http_port_settings() -> None:
    with pytest.raises(ConfigError, match="server.http_port"):
        test_config(server={"port": 9000, "http_port": 9000})
    with pytest.raises(ConfigError, match="server.http_port"):
        test_config(server={"http_port": -2})
    port, blocker = port_below_a_taken_one()
    with blocker:
        # The default (port + 1) taken: the daemon serves its WebSocket port without it.
        with running_daemon(test_config(server={"port": port})) as daemon:
            assert daemon.server.port == port and daemon.http.port is None
        # The same port asked for explicitly: the start fails, naming the setting.
        loop = asyncio.new_event_loop()
        daemon = InProcessDaemon(test_config(server={"port": port, "http_port": port + 1}))
        try:
            with pytest.raises(InternalError, match="server.http_port"):
                loop.run_until_complete(daemon.startup())
        finally:
            loop.run_until_complete(daemon.shutdown())
            loop.close()
    with running_daemon(test_config(server={"http_port": 0})) as daemon:
        assert daemon.http.port is None  # off


def test_draining_refuses_files() -> None:
    with running_daemon(test_config()) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}/v1/audio/transcriptions"
        daemon.server.begin_drain()
        response = httpx.post(url, data={"model": "whisper-1"}, files={"file": SHORT_WAV})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "unavailable"


class HeldFiles:
    """A file transcriber double that holds each request until `release` is set."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def transcribe(self, audio: np.ndarray, request: TranscriptionRequest) -> list[Segment]:
        self.started.set()
        assert self.release.wait(60)
        return [Segment(0.0, len(audio) / 16000, f"{len(audio)} samples")]


def test_live_session_goes_on_while_a_file_is_transcribed(shared_audio_dir: Path) -> None:
    """A file in recognition holds a thread, not the event loop: a WebSocket session
    streams and gets its finals meanwhile; then the file's answer comes."""
    with running_daemon(test_config()) as daemon:
        held = HeldFiles()
        daemon.http.files = held
        url = f"http://127.0.0.1:{daemon.http.port}/v1/audio/transcriptions"
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, url, timeout=60, files={"file": SHORT_WAV},
                                 data={"model": "whisper-1", "response_format": "srt"})
            assert held.started.wait(30)
            events = stream_session(daemon.server.port, speech_audio(shared_audio_dir),
                                    message_s=0.2, speed=20)
            assert not answer.done() and daemon.http.pending == 1
            held.release.set()
            response = answer.result(30)
    assert [e["type"] for e in events if e["type"] == "final"] == ["final"] * 3
    assert response.status_code == 200
    assert response.text == "1\n00:00:00,000 --> 00:00:01,000\n16000 samples\n\n"


def test_trickled_body_times_out() -> None:
    with running_daemon(test_config(server={"http_body_timeout_s": 0.5})) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.http.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")  # and then nothing
            reply = sock.recv(65536).decode()
    status, _, rest = reply.partition("\r\n")
    assert status == "HTTP/1.1 408 Request Timeout"
    assert '"code": "request_timeout"' in rest
