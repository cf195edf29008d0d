"""The WebSocket server and HTTP endpoints, through real sockets on a free port.

The recognizer is the `echo` pipeline (streamd/pipelines/echo.py): its text is the
duration of the audio it was given, computed through the real Engine, so finals are
checkable exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from streamd.config import Config, load_config
from streamd.daemon import Daemon


class MemoryPublisher:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def publish(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))


# --- helpers ------------------------------------------------------------------------


@contextmanager
def running_daemon(config: Config, publisher: MemoryPublisher | None = None) -> Iterator[Daemon]:
    """A Daemon on its own event loop thread; always shut down on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    daemon = Daemon(config, publishers=[publisher] if publisher else None)
    asyncio.run_coroutine_threadsafe(daemon.startup(), loop).result(60)
    try:
        yield daemon
    finally:
        asyncio.run_coroutine_threadsafe(daemon.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def speech(shared_audio_dir, name: str = "librispeech_61-70968-0002.wav") -> np.ndarray:
    """An utterance with 0.5 s of silence before and 1 s after (so the endpoint fires)."""
    audio, rate = sf.read(shared_audio_dir / name, dtype="float32")
    assert rate == 16000
    return np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)])


def s16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def start_msg(**fields: Any) -> str:
    return json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le",
                       "channels": 1, **fields})


def recv_event(ws, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def stream_session(
    url: str, data: bytes, chunk: int = 6400, pace: float = 0.0, **start: Any
) -> list[dict]:
    """Run a whole healthy session; return every event up to `done`.

    `pace` sleeps between chunks, so partials are not all coalesced into one.
    """
    with connect(url) as ws:
        ws.send(start_msg(**start))
        for i in range(0, len(data), chunk):
            ws.send(data[i : i + chunk])
            time.sleep(pace)
        ws.send(json.dumps({"type": "stop"}))
        events = []
        while True:
            event = recv_event(ws)
            events.append(event)
            if event["type"] == "done":
                break
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1000
    return events


def check_segments(events: list[dict]) -> list[dict]:
    """Contract invariants; returns the finals."""
    finals = [e for e in events if e["type"] == "final"]
    starts = [e for e in events if e["type"] == "speech_start"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    assert [s["segment"] for s in starts] == list(range(len(finals)))
    for f in finals:
        # Double's text is the duration of the audio the recognizer got.
        assert float(f["text"]) == pytest.approx(f["end"] - f["start"], abs=0.011)
    done = events[-1]
    assert done == {"type": "done", "session": events[0]["session"], "segments": len(finals)}
    return finals


def test_config(**over: Any) -> Config:
    base = {"server": {"port": 0, "max_sessions": 4}, "recognition": {"pipeline": "echo"},
            "node": "testnode"}
    for key, value in over.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.update(
            {key: value})
    return load_config(environ={}, overrides=base)


test_config.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def publisher() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture(scope="module")
def daemon(publisher: MemoryPublisher) -> Iterator[Daemon]:
    with running_daemon(test_config(server={"max_frame_bytes": 65536}), publisher) as d:
        yield d


@pytest.fixture(scope="module")
def url(daemon: Daemon) -> str:
    return f"ws://127.0.0.1:{daemon.server.port}/v1/stream"


def http_get(daemon: Daemon, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.server.port}{path}", timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --- tests --------------------------------------------------------------------------


def test_healthy_session_events(url: str, shared_audio_dir, publisher: MemoryPublisher) -> None:
    audio = speech(shared_audio_dir)
    events = stream_session(url, s16(audio), chunk=3200, pace=0.02, session="healthy-1")
    assert events[0] == {"type": "ready", "session": "healthy-1", "pipeline": "echo",
                         "sample_rate": 16000, "protocol": 1}
    finals = check_segments(events)
    assert len(finals) == 1
    # The utterance sits at 0.5..3.47 s; padding keeps the segment near it.
    assert 0.1 <= finals[0]["start"] <= 0.8 and 3.2 <= finals[0]["end"] <= 3.9
    partials = [e for e in events if e["type"] == "partial"]
    assert len(partials) >= 2  # one per 400 ms of a ~3 s segment; late ones are coalesced
    assert events.index(partials[-1]) < events.index(finals[0])
    for p in partials:
        assert p["segment"] == 0 and float(p["text"]) == pytest.approx(p["end"] - p["start"],
                                                                       abs=0.011)
    # speech_start, partials, the final and done also went to the publisher, unchanged
    # and in order (`ready` concerns the client only).
    published = [e for e in publisher.events if e.get("session") == "healthy-1"]
    assert finals[0] in published
    assert [e for e in published if e["type"] != "partial"] == [
        e for e in events if e["type"] in ("speech_start", "final", "done")]
    assert {e["type"] for e in published} == {"speech_start", "partial", "final", "done"}


@pytest.mark.parametrize("rate,encoding,channels", [(8000, "pcm_s16le", 1),
                                                    (44100, "pcm_f32le", 2)])
def test_resampled_input_matches(url, shared_audio_dir, rate, encoding, channels) -> None:
    import soxr

    audio = speech(shared_audio_dir)
    ref = check_segments(stream_session(url, s16(audio)))
    resampled = soxr.resample(audio, 16000, rate).astype(np.float32)
    inter = np.repeat(resampled[:, None], channels, axis=1).reshape(-1)
    data = s16(inter) if encoding == "pcm_s16le" else inter.astype("<f4").tobytes()
    got = check_segments(stream_session(url, data, sample_rate=rate, encoding=encoding,
                                        channels=channels, chunk=4000 * channels))
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert abs(a["start"] - b["start"]) <= 0.1 and abs(a["end"] - b["end"]) <= 0.1


class Bystander(threading.Thread):
    """A healthy session streaming real speech (paced) on its own thread.

    `midway` is set once a third of the audio is sent (mid-utterance: the segment is
    open); the last chunk waits for `may_finish`, so the session is still streaming
    whatever the test does in between. Then `stop`; `events` holds everything up to
    `done`, and `close_code` the server's close code.
    """

    def __init__(self, url: str, data: bytes, session: str, chunk: int = 3200,
                 pace: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.url, self.data, self.session = url, data, session
        self.chunk, self.pace = chunk, pace
        self.midway = threading.Event()
        self.may_finish = threading.Event()
        self.events: list[dict] = []
        self.close_code: int | None = None
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.url) as ws:
                ws.send(start_msg(session=self.session))
                self.events.append(recv_event(ws))
                chunks = [self.data[i : i + self.chunk]
                          for i in range(0, len(self.data), self.chunk)]
                for i, chunk in enumerate(chunks):
                    if i == len(chunks) // 3:
                        self.midway.set()
                    if i == len(chunks) - 1:
                        assert self.may_finish.wait(30), "the test never let the bystander end"
                    ws.send(chunk)
                    time.sleep(self.pace)
                ws.send(json.dumps({"type": "stop"}))
                while self.events[-1]["type"] != "done":
                    self.events.append(recv_event(ws))
                try:
                    ws.recv(timeout=5)
                except ConnectionClosed as closed:
                    self.close_code = closed.rcvd.code if closed.rcvd else None
        except BaseException as exc:  # reported by finish()
            self.failure = exc
        finally:
            self.midway.set()

    def finish(self) -> list[dict]:
        """Let it end; wait for it; return its events (raises what went wrong in it)."""
        self.may_finish.set()
        self.join(30)
        assert not self.is_alive(), "bystander session did not end"
        if self.failure is not None:
            raise self.failure
        return self.events


@pytest.fixture(scope="module")
def reference_final(url: str, shared_audio_dir) -> dict:
    """The final of `speech()` streamed alone on an idle daemon."""
    finals = check_segments(stream_session(url, s16(speech(shared_audio_dir)),
                                           session="reference"))
    assert len(finals) == 1
    return finals[0]


def check_bystander(events: list[dict], close_code: int | None, session: str,
                    reference: dict) -> None:
    """The healthy session got exactly what it gets alone: one final, no error."""
    assert events[0] == {"type": "ready", "session": session, "pipeline": "echo",
                         "sample_rate": 16000, "protocol": 1}
    assert not [e for e in events if e["type"] == "error"]
    finals = check_segments(events)
    assert len(finals) == 1
    assert finals[0] == {**reference, "session": session}
    assert close_code == 1000


# (name, messages, error code, close code or None: the stream goes on, message pattern)
BAD_INPUTS = [
    ("not json", ["{nope"], "bad_request", None, "not JSON"),
    ("start as array", [json.dumps([json.loads(start_msg())])], "bad_request", None,
     "must be a JSON object"),
    ("start as string", [json.dumps("start")], "bad_request", None, "must be a JSON object"),
    ("unknown type", [json.dumps({"type": "pause"})], "bad_request", None,
     "unknown message type 'pause'"),
    ("stop before start", [json.dumps({"type": "stop"})], "bad_request", None,
     "stop before start"),
    ("audio before start", [b"\0\0" * 160], "bad_request", None, "audio before start"),
    ("odd byte count", [start_msg(), b"\0" * 321], "bad_request", None,
     r"321 bytes is not a multiple of 2 \(pcm_s16le, 1 channel"),
    ("odd byte count f32", [start_msg(encoding="pcm_f32le"), b"\0" * 6], "bad_request", None,
     r"6 bytes is not a multiple of 4 \(pcm_f32le, 1 channel"),
    ("partial frame 2ch s16", [start_msg(channels=2), b"\0" * 6], "bad_request", None,
     r"6 bytes is not a multiple of 4 \(pcm_s16le, 2 channel"),
    ("nan samples", [start_msg(encoding="pcm_f32le"),
                     np.array([0.0, np.nan, 0.1], "<f4").tobytes()], "bad_request", None,
     "NaN or infinite"),
    ("inf samples", [start_msg(encoding="pcm_f32le"),
                     np.array([np.inf] * 4, "<f4").tobytes()], "bad_request", None,
     "NaN or infinite"),
    ("unsupported encoding", [start_msg(encoding="mp3")], "unsupported", 1008,
     "encoding 'mp3' not supported"),
    ("unsupported rate", [start_msg(sample_rate=96000)], "unsupported", 1008,
     "sample_rate 96000 outside 8000..48000"),
    ("rate below 8000", [start_msg(sample_rate=4000)], "unsupported", 1008,
     "sample_rate 4000 outside 8000..48000"),
    ("zero channels", [start_msg(channels=0)], "unsupported", 1008, r"channels 0 outside 1\.\.8"),
    ("nine channels", [start_msg(channels=9)], "unsupported", 1008, r"channels 9 outside 1\.\.8"),
    ("unsupported pipeline", [start_msg(pipeline="ctc")], "unsupported", 1008,
     "pipeline 'ctc' is not served here"),
    ("frame over limit", [start_msg(), b"\0\0" * 40000], "bad_request", 1008,
     "80000 bytes over the limit of 65536"),
    ("second start", [start_msg(), start_msg()], "bad_request", None, "already started"),
    ("second start, unsupported", [start_msg(), start_msg(sample_rate=96000)], "bad_request",
     None, "already started"),
    ("bad session id", [start_msg(session="a b")], "bad_request", None, "start.session"),
]


def run_bad_client(url: str, name: str, messages: list, code: str, close_code: int | None,
                   message: str) -> None:
    with connect(url) as bad:
        for m in messages:
            bad.send(m)
        events = []
        while True:
            event = recv_event(bad)
            if event["type"] == "error":
                break
            events.append(event)
        assert event["code"] == code, name
        assert event["message"], name
        assert re.search(message, event["message"]), (name, event["message"])
        ready = [e for e in events if e["type"] == "ready"]
        # The error names the session once it exists.
        assert event.get("session") == (ready[0]["session"] if ready else None), name
        if close_code is not None:  # the stream cannot go on
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    bad.recv(timeout=5)
            assert closed.value.rcvd.code == close_code, name
        else:  # the connection is still usable: start (if needed), stop, done
            if not ready:
                bad.send(start_msg())
                ready = [recv_event(bad)]
                assert ready[0]["type"] == "ready", name
            bad.send(json.dumps({"type": "stop"}))
            assert recv_event(bad) == {"type": "done", "session": ready[0]["session"],
                                       "segments": 0}, name
            with pytest.raises(ConnectionClosed) as closed:
                bad.recv(timeout=5)
            assert closed.value.rcvd.code == 1000, name


@pytest.mark.parametrize("name,messages,code,close_code,message", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_leaves_other_sessions_alone(url, daemon, shared_audio_dir, reference_final,
                                               name, messages, code, close_code,
                                               message) -> None:
    session = "bystander-" + re.sub(r"[^A-Za-z0-9]+", "-", name)
    bystander = Bystander(url, s16(speech(shared_audio_dir)), session)
    bystander.start()
    try:
        assert bystander.midway.wait(10)
        # The bystander is mid-utterance and still sending while this client misbehaves.
        run_bad_client(url, name, messages, code, close_code, message)
    finally:
        events = bystander.finish()
    check_bystander(events, bystander.close_code, session, reference_final)


def test_token_auth_and_session_limit(shared_audio_dir) -> None:
    cfg = test_config(server={"tokens": ["s3cret"], "max_sessions": 2})
    with running_daemon(cfg) as d:
        base = f"ws://127.0.0.1:{d.server.port}/v1/stream"
        for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}):
            with pytest.raises(InvalidStatus) as refused:
                connect(base, **kwargs)
            assert refused.value.response.status_code == 401
            assert json.loads(refused.value.response.body)["code"] == "unauthorized"
        with pytest.raises(InvalidStatus) as refused:
            connect(base + "?token=wrong")
        assert refused.value.response.status_code == 401
        with (
            connect(base, additional_headers={"Authorization": "Bearer s3cret"}) as a,
            connect(base + "?token=s3cret") as b,
        ):
            for i, ws in enumerate((a, b)):
                ws.send(start_msg(session=f"held-{i}"))
                assert recv_event(ws)["type"] == "ready"
            with pytest.raises(InvalidStatus) as full:
                connect(base + "?token=s3cret")
            assert full.value.response.status_code == 503
            assert json.loads(full.value.response.body)["code"] == "overloaded"
        # Slots free up once sessions end.
        deadline = time.monotonic() + 5
        while d.server.session_count and time.monotonic() < deadline:
            time.sleep(0.05)
        events = stream_session(base + "?token=s3cret", s16(speech(shared_audio_dir)))
        assert len(check_segments(events)) == 1


def test_remote_listen_needs_token() -> None:
    from streamd.errors import ConfigError

    with pytest.raises(ConfigError, match="server.host"):
        test_config(server={"host": "0.0.0.0"})


def test_healthz_and_metrics(url, daemon, shared_audio_dir) -> None:
    status, headers, body = http_get(daemon, "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and health["node"] == "testnode"
    # The load a load balancer reads (docs/scale-out.md, *Overload*): nothing open yet.
    assert health["sessions"] == 0 and health["max_sessions"] == 4
    assert health["engine"] == {"queue": 0, "busy": health["engine"]["busy"], "workers": 2,
                                "shed": 0}
    assert 0 <= health["engine"]["busy"] < 0.5 and health["load"] == health["engine"]["busy"]
    stream_session(url, s16(speech(shared_audio_dir)))
    status, headers, body = http_get(daemon, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["streamd_ready"] == 1
    assert values["streamd_sessions_active"] == 0
    assert values['streamd_sessions_total{source="websocket"}'] >= 1
    assert values["streamd_audio_seconds_total"] >= 4.4
    assert values["streamd_final_latency_seconds_count"] >= 1
    assert values["streamd_partial_latency_seconds_count"] >= 1
    assert values['streamd_real_time_factor_count{kind="final"}'] >= 1
    assert 'streamd_queue_depth{queue="engine"}' in values
    assert 0 <= values["streamd_engine_busy"] <= 1 and values["streamd_engine_shed_total"] == 0
    assert values["streamd_engine_busy_seconds_total"] > 0
    assert values['streamd_engine_batch_fill_count{kind="duration"}'] >= 2
    assert "streamd_drops_total" in text and "streamd_mqtt_reconnects_total" in text
    # The pipeline's own counters (whisper: partials skipped, finals decoded early).
    assert values["streamd_echo_batches_total"] >= 2
    status, _, _ = http_get(daemon, "/nope")
    assert status == 404


def test_static_page_served(daemon) -> None:
    from streamd.server import STATIC_DIR

    if not (STATIC_DIR / "index.html").is_file():
        pytest.skip("streamd/static/index.html not present yet")
    status, headers, body = http_get(daemon, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body == (STATIC_DIR / "index.html").read_bytes()
    status, _, _ = http_get(daemon, "/../pyproject.toml")
    assert status == 404


def test_vanished_client_still_publishes_final(url, shared_audio_dir, reference_final,
                                                tmp_path) -> None:
    """A client drops its TCP connection mid-segment (no WebSocket close, no stop): its
    final still reaches a real broker, and a healthy session alongside is unaffected."""
    from helpers.mosquitto import Mosquitto, Subscriber

    audio = speech(shared_audio_dir)
    mid = s16(audio[: 16000 * 2])  # 2 s: the utterance is still going

    def vanish(base: str) -> None:
        with connect(base) as ws:
            ws.send(start_msg(session="vanisher"))
            assert recv_event(ws)["type"] == "ready"
            ws.send(mid)
            assert recv_event(ws)["type"] == "speech_start"
            ws.socket.shutdown(socket.SHUT_RDWR)  # gone: no close frame, no stop
            with pytest.raises(ConnectionClosed) as gone:
                while True:
                    ws.recv(timeout=5)
            # No closing handshake either way (leaving `with` sends nothing now).
            assert gone.value.sent is None and gone.value.rcvd is None

    publisher = MemoryPublisher()
    with Mosquitto(tmp_path) as broker:
        cfg = test_config(mqtt={"host": broker.host, "port": broker.port})
        with running_daemon(cfg, publisher) as d:
            base = f"ws://127.0.0.1:{d.server.port}/v1/stream"

            async def main() -> tuple[list[dict], list[dict], list[dict]]:
                async with Subscriber(broker, ["streamd/#"]) as sub:
                    bystander = Bystander(base, s16(audio), "bystander-mqtt")
                    bystander.start()
                    try:
                        assert await asyncio.to_thread(bystander.midway.wait, 10)
                        await asyncio.to_thread(vanish, base)
                        # Published while the bystander is still streaming, not at shutdown.
                        await sub.wait_for(lambda _: sub.payloads("streamd/vanisher/final"),
                                           timeout=10)
                    finally:
                        events = await asyncio.to_thread(bystander.finish)
                    check_bystander(events, bystander.close_code, "bystander-mqtt",
                                    reference_final)
                    await sub.wait_for(lambda _: sub.payloads("streamd/bystander-mqtt/final"),
                                       timeout=10)
                    return (sub.payloads("streamd/vanisher/final"),
                            sub.payloads("streamd/bystander-mqtt/final"), events)

            vanished, healthy, events = asyncio.run(main())
    finals = [e for e in publisher.events
              if e.get("session") == "vanisher" and e["type"] == "final"]
    assert len(finals) == 1
    assert finals[0]["end"] <= 2.0 + 1e-6
    assert float(finals[0]["text"]) == pytest.approx(finals[0]["end"] - finals[0]["start"],
                                                     abs=0.011)
    # The broker got that final: the WebSocket event plus node, seq and ts.
    assert len(vanished) == 1
    assert {k: v for k, v in vanished[0].items() if k not in ("node", "seq", "ts")} == finals[0]
    assert vanished[0]["node"] == "testnode"
    assert len(healthy) == 1
    assert {k: v for k, v in healthy[0].items() if k not in ("node", "seq", "ts")} == [
        e for e in events if e["type"] == "final"][0]


def test_session_events_reach_mqtt_in_order(tmp_path, shared_audio_dir) -> None:
    """A WebSocket session on a daemon publishing to a real Mosquitto: the subscriber gets
    its speech_start, final (one per utterance) and done, at QoS 1, in the WebSocket's
    order and with the same fields, each with a greater `seq` than the one before."""
    from helpers.daemon import speech_audio
    from helpers.mosquitto import Mosquitto, Subscriber

    audio = speech_audio(shared_audio_dir)  # 3 utterances
    published_kinds = ("speech_start", "final", "done")
    with Mosquitto(tmp_path) as broker:
        cfg = test_config(mqtt={"host": broker.host, "port": broker.port})
        with running_daemon(cfg) as d:
            url = f"ws://127.0.0.1:{d.server.port}/v1/stream"

            async def main() -> tuple[list[dict], list]:
                async with Subscriber(broker, ["streamd/order-1/+"]) as sub:
                    events = await asyncio.to_thread(stream_session, url, s16(audio),
                                                     pace=0.002, session="order-1")
                    await sub.wait_for(lambda _: sub.payloads("streamd/order-1/done"))
                return events, list(sub.messages)

            events, messages = asyncio.run(main())
    expected = [e for e in events if e["type"] in published_kinds]
    assert [e["type"] for e in expected] == ["speech_start", "final"] * 3 + ["done"]
    payloads = [json.loads(m.payload) for m in messages]
    assert all(str(m.topic) == f"streamd/order-1/{p['type']}"
               for m, p in zip(messages, payloads, strict=True))
    assert all(m.qos == (0 if p["type"] == "partial" else 1)
               for m, p in zip(messages, payloads, strict=True))
    seqs = [p["seq"] for p in payloads]  # partials included: one counter per session
    assert seqs == sorted(set(seqs)), seqs
    got = [p for p in payloads if p["type"] in published_kinds]
    assert [{k: v for k, v in p.items() if k not in ("node", "seq", "ts")} for p in got] == \
        expected
    assert {p["node"] for p in got} == {"testnode"}


def test_silence_and_noise_give_no_final(url) -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 3) * 1e-4).astype(np.float32)  # -80 dBFS
    events = stream_session(url, s16(np.concatenate([np.zeros(16000), noise])))
    assert [e["type"] for e in events] == ["ready", "done"]
    assert events[-1]["segments"] == 0


def test_engine_batches_concurrent_sessions(url, daemon, shared_audio_dir) -> None:
    audio = s16(speech(shared_audio_dir))
    pipeline = daemon.pipeline
    pipeline.batch_sizes_seen.clear()
    results: list[list[dict]] = []

    def run(i: int) -> None:
        results.append(stream_session(url, audio, chunk=32000, session=f"conc-{i}"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4
    for events in results:
        assert len(check_segments(events)) == 1
    # Only compiled bucket sizes ever reach the batch function.
    assert set(pipeline.batch_sizes_seen) <= set(daemon.engine.batch_sizes)


@pytest.mark.parametrize("pipeline", ["ctc", "conformer", "two-pass"])
def test_pipeline_without_its_model_refused_clearly(pipeline: str) -> None:
    """Pipelines that need a model folder fail at start-up naming the key, not faked."""
    from streamd.errors import ConfigError

    cfg = test_config(recognition={"pipeline": pipeline})
    daemon = Daemon(cfg)
    with pytest.raises(ConfigError, match="recognition.model"):
        asyncio.run(daemon.startup())


class FakeMic:
    """Stands in for streamd.mic.MicSource (PortAudio is tested with the mic module):
    plays given audio through `on_frames` in 20 ms blocks on the event loop."""

    audio = np.zeros(0, np.float32)

    def __init__(self, device, sample_rate, on_frames) -> None:
        self.device, self.sample_rate, self.on_frames = device, sample_rate, on_frames
        self.task: asyncio.Task | None = None
        self.dropped_blocks = 0

    async def start(self) -> None:
        async def play() -> None:
            for i in range(0, len(self.audio), 320):
                self.on_frames(self.audio[i : i + 320])
                await asyncio.sleep(0)
        self.task = asyncio.create_task(play())

    async def stop(self) -> None:
        if self.task is not None:
            await self.task


def test_mic_session_publishes_and_finishes_on_shutdown(monkeypatch, shared_audio_dir) -> None:
    import streamd.mic

    one = speech(shared_audio_dir)
    # A whole utterance (endpointed), then a second one cut off mid-sentence.
    FakeMic.audio = np.concatenate([one, one[: 16000 * 2]])
    monkeypatch.setattr(streamd.mic, "MicSource", FakeMic)
    publisher = MemoryPublisher()
    cfg = test_config(mic={"enabled": True, "device": "3"})
    with running_daemon(cfg, publisher) as d:
        assert d._mic.source.device == "3" and d._mic.source.sample_rate == 16000
        status, _, body = http_get(d, "/healthz")
        assert json.loads(body)["sessions"] == 1
        with connect(f"ws://127.0.0.1:{d.server.port}/v1/stream") as ws:
            ws.send(start_msg(session="mic"))  # the mic's id is taken
            event = recv_event(ws)
            assert event["code"] == "bad_request" and "already open" in event["message"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                e["type"] == "final" for e in publisher.events):
            time.sleep(0.02)
    finals = [e for e in publisher.events if e["type"] == "final"]
    assert [f["session"] for f in finals] == ["mic", "mic"]
    # Like a WebSocket session: announced segments, and `done` once the daemon stopped.
    assert [e["type"] for e in publisher.events if e["type"] != "partial"] == [
        "speech_start", "final", "speech_start", "final", "done"]
    assert publisher.events[-1] == {"type": "done", "session": "mic", "segments": 2}
    assert [f["segment"] for f in finals] == [0, 1]
    assert finals[1]["end"] <= len(FakeMic.audio) / 16000 + 1e-6
    for f in finals:
        assert float(f["text"]) == pytest.approx(f["end"] - f["start"], abs=0.011)


def test_port_in_use_fails_clearly() -> None:
    import socket

    from streamd.errors import InternalError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = test_config(server={"port": taken.getsockname()[1]})

        async def main() -> None:
            daemon = Daemon(cfg)
            try:
                with pytest.raises(InternalError, match="cannot listen on 127.0.0.1"):
                    await daemon.startup()
            finally:
                await daemon.shutdown()

        asyncio.run(main())


# --- keepalive, finalize, utterance_end, per-session endpoint (protocol additions) ---


def recv_until(ws, kind: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Events up to and including the first of type `kind`."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] != kind:
        events.append(recv_event(ws, timeout))
    return events


def context_clears(daemon: Daemon) -> float:
    """The test pipeline's count of `clear_context` calls, read from /metrics."""
    body = http_get(daemon, "/metrics")[2].decode()
    return float(re.search(r"^streamd_echo_context_clears_total (\S+)$", body, re.M)[1])


def test_keepalive_and_finalize(url: str, daemon, shared_audio_dir, publisher) -> None:
    """keepalive gets no reply (before start too); finalize mid-utterance ends the segment
    at once with its final, then `finalized`; the stream goes on into a new segment.
    With no speech open, finalize sends `finalized` only. Each finalize clears the
    session's previous text (the pipeline's `clear_context`) before `finalized` comes."""
    audio = s16(speech(shared_audio_dir))
    clears = context_clears(daemon)
    cut = 2 * (8000 + 24000)  # bytes: 0.5 s silence + 1.5 s of the utterance
    with connect(url) as ws:
        ws.send(json.dumps({"type": "keepalive"}))
        ws.send(json.dumps({"type": "finalize"}))
        error = recv_event(ws)
        assert error["code"] == "bad_request" and "finalize before start" in error["message"]
        ws.send(start_msg(session="fin-1"))
        assert recv_event(ws)["type"] == "ready"  # nothing came for the keepalive
        ws.send(json.dumps({"type": "finalize"}))  # no speech yet
        assert recv_event(ws) == {"type": "finalized", "session": "fin-1", "segments": 0}
        assert context_clears(daemon) == clears + 1
        for i in range(0, cut, 3200):
            ws.send(audio[i : min(i + 3200, cut)])
            ws.send(json.dumps({"type": "keepalive"}))
        ws.send(json.dumps({"type": "finalize"}))
        first = recv_until(ws, "finalized")
        assert [e["type"] for e in first if e["type"] != "partial"] == [
            "speech_start", "final", "finalized"]
        final = first[-2]
        assert final["segment"] == 0 and final["end"] <= cut / 2 / 16000
        assert float(final["text"]) == pytest.approx(final["end"] - final["start"], abs=0.011)
        assert first[-1] == {"type": "finalized", "session": "fin-1", "segments": 1}
        assert context_clears(daemon) == clears + 2
        for i in range(cut, len(audio), 3200):
            ws.send(audio[i : i + 3200])
        ws.send(json.dumps({"type": "stop"}))
        rest = recv_until(ws, "done")
    assert [e["segment"] for e in rest if e["type"] == "final"] == [1]
    assert rest[-1] == {"type": "done", "session": "fin-1", "segments": 2}
    assert context_clears(daemon) == clears + 2  # only finalize calls the hook
    published = [e for e in publisher.events if e.get("session") == "fin-1"]
    assert final in published  # a finalized final is a final like any other


def test_utterance_end_after_the_final(url: str, shared_audio_dir) -> None:
    audio = speech(shared_audio_dir)  # 1 s of silence after the utterance
    events = stream_session(url, s16(audio), chunk=3200, session="utt-1", utterance_end_ms=800)
    kinds = [e["type"] for e in events if e["type"] != "partial"]
    assert kinds == ["ready", "speech_start", "final", "utterance_end", "done"]
    final, end = events[-3], events[-2]
    assert end == {"type": "utterance_end", "session": "utt-1", "segment": 0,
                   "last_speech_end": pytest.approx(final["end"] - 0.3, abs=0.001)}
    # Asked for a longer silence than the stream has: none (done ends the stream).
    events = stream_session(url, s16(audio), session="utt-2", utterance_end_ms=5000)
    assert "utterance_end" not in [e["type"] for e in events]


def test_endpoint_ms_per_session(url: str, shared_audio_dir) -> None:
    one = speech(shared_audio_dir)
    two = s16(np.concatenate([one, one]))  # 1.5 s of silence between the utterances
    assert len(check_segments(stream_session(url, two))) == 2
    assert len(check_segments(stream_session(url, two, endpoint_ms=2500))) == 1
    short = check_segments(stream_session(url, two, endpoint_ms=200))
    assert len(short) >= 2
    assert all(a["end"] <= b["start"] for a, b in zip(short, short[1:], strict=False))


@pytest.mark.parametrize("fields,pattern", [
    ({"endpoint_ms": 50}, r"start\.endpoint_ms must be an integer 100\.\.10000"),
    ({"endpoint_ms": "500"}, r"start\.endpoint_ms must be an integer"),
    ({"utterance_end_ms": 40000}, r"start\.utterance_end_ms must be an integer 500\.\.30000"),
])
def test_bad_session_timing_is_a_bad_request(url: str, fields: dict, pattern: str) -> None:
    """A bad value is refused with `bad_request`; no session starts and the stream goes
    on (a good start then works)."""
    run_bad_client(url, str(fields), [start_msg(**fields)], "bad_request", None, pattern)


def test_idle_timeout_ends_quiet_connections_keepalive_holds_them(shared_audio_dir) -> None:
    """With server.idle_timeout_s, a connection that sends nothing is ended as by `stop`
    (the speech in flight gets its final, then done, close 1000 "idle timeout");
    keepalives (or audio) keep it open."""
    audio = s16(speech(shared_audio_dir))[: 2 * 32000]  # 0.5 s silence + 1.5 s of speech
    with running_daemon(test_config(server={"idle_timeout_s": 0.6})) as d:
        url = f"ws://127.0.0.1:{d.server.port}/v1/stream"
        with connect(url) as ws:
            ws.send(start_msg(session="idle-1"))
            assert recv_event(ws)["type"] == "ready"
            for i in range(0, len(audio), 3200):
                ws.send(audio[i : i + 3200])
            quiet_from = time.monotonic()
            for _ in range(8):  # 1.6 s of keepalives 0.2 s apart: longer than the timeout
                time.sleep(0.2)
                ws.send(json.dumps({"type": "keepalive"}))
            kept = time.monotonic() - quiet_from
            events = recv_until(ws, "done")
            ended = time.monotonic() - quiet_from
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
    assert kept > 1.5 and ended > kept + 0.5  # the keepalives held it open past 0.6 s
    assert closed.value.rcvd.code == 1000 and closed.value.rcvd.reason == "idle timeout"
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 1 and finals[0]["end"] <= 2.0  # the speech in flight, finalized
    assert events[-1] == {"type": "done", "session": "idle-1", "segments": 1}
