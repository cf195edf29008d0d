"""Property-based fuzzing of the WebSocket protocol against a real `streamd serve` (the fast
test pipeline), with Hypothesis.

Each example is a list of client actions (arbitrary text, JSON values, `start` messages with
valid and invalid fields, `stop`, `keepalive`, `finalize`, binary frames of sizes around
every limit, clean and abrupt disconnects). One connection carries many examples: it is
reopened only when the protocol ends it. A model written from docs/protocol.md (not from
streamd's code) says what each action must get back: `ready`, `finalized`, `done`, an
`error` with the documented code (and the documented close code), a 1009 close for frames
over 4x `max_frame_bytes`, or nothing.
Properties: every action gets what the contract says; the daemon never crashes; no session
or connection leaks (/metrics); a bystander streaming a known recording all along gets the
finals it gets alone.

Examples: 2,000 (Hypothesis profile `ci`, the default); `HYPOTHESIS_PROFILE=long` runs
50,000. A second test runs 300 examples of the traffic that never reaches a recognizer
against a daemon on the real tiny.en, with the bystander recognized by Whisper. A crash
it finds becomes a regression test of its own (test_abuse.py
test_oversized_json_is_bad_request is one).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import string
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import Daemon, serve, test_pipeline_env
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

RATE = 16000
LIMIT = 4096  # server.max_frame_bytes of the fuzzed daemon
PIPELINE = "echo"
CI_EXAMPLES = 2000
# Hypothesis profiles, picked by HYPOTHESIS_PROFILE. Health checks are off: examples
# include frames of 16 KiB and one Hypothesis call drives many connections, on purpose.
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None, database=None,
                          print_blob=True, suppress_health_check=list(HealthCheck))
settings.register_profile("long", settings.get_profile("ci"), max_examples=50_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
BYSTANDER = "bystander"
ENCODINGS = {"pcm_s16le": 2, "pcm_f32le": 4}
KNOWN_TYPES = ("start", "stop", "keepalive", "finalize")  # a tuple: any JSON type compares

# --- the daemon and the bystander ---------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    env = {**test_pipeline_env(), "STREAMD_SERVER_CONNECTION_RATE": "0",
           "STREAMD_SERVER_MAX_FRAME_BYTES": str(LIMIT), "STREAMD_SERVER_MAX_SESSIONS": "8",
           # One connection may see many examples before a `start` succeeds.
           "STREAMD_SERVER_HANDSHAKE_TIMEOUT_S": "3600"}
    with serve(tmp_path_factory.mktemp("fuzz"), env=env) as d:
        yield d


def speech_pcm(shared_audio_dir: Path) -> bytes:
    audio, rate = sf.read(shared_audio_dir / "librispeech_61-70968-0002.wav", dtype="float32")
    assert rate == RATE
    audio = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def run_session(url: str, data: bytes, session: str, pace: float) -> list[dict]:
    """Stream `data` in 100 ms frames (within the 4 KiB frame limit: 2 per message)."""
    with connect(url) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "session": session}))
        for i in range(0, len(data), 3200):
            ws.send(data[i : i + 3200])
            time.sleep(pace)
        ws.send(json.dumps({"type": "stop"}))
        events = []
        while not events or events[-1]["type"] != "done":
            events.append(json.loads(ws.recv(timeout=30)))
    return events


def finals(events: list[dict]) -> list[tuple]:
    return [(e["segment"], e["start"], e["end"], e["text"]) for e in events
            if e["type"] == "final"]


class Bystander(threading.Thread):
    """Streams the recording again and again (about 5x real time) until told to stop."""

    def __init__(self, url: str, data: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.data = url, data
        self.rounds: list[list[tuple]] = []
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.rounds.append(finals(run_session(self.url, self.data, BYSTANDER, 0.02)))
        except BaseException as exc:
            self.failure = exc


def metrics(daemon: Daemon) -> dict[str, float]:
    with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


# --- strategies ---------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.sampled_from([10**30, -(2**63), 2**64, 1e308, -0.0]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
ID_CHARS = string.ascii_letters + string.digits + "_-"
valid_ids = st.text(st.sampled_from(ID_CHARS), min_size=1, max_size=64).filter(
    lambda s: not s.startswith(BYSTANDER))
MISSING = object()  # a field left out of the message


def field_values(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly valid values, else anything: wrong types, huge numbers, nested objects."""
    return st.one_of(valid, valid, valid, st.just(MISSING), json_values)


start_fields = st.fixed_dictionaries({
    "sample_rate": field_values(st.sampled_from([8000, 16000, 44100, 48000, 7999, 48001])
                                | st.integers(0, 100_000)),
    "encoding": field_values(st.sampled_from([*ENCODINGS, "PCM_S16LE", "mp3", "", "pcm_s16le "])),
    "channels": field_values(st.sampled_from([1, 2, 8, 0, 9, -1]) | st.integers(-5, 20)),
    "session": field_values(valid_ids | st.just("a b") | st.text(min_size=60, max_size=70)),
    "pipeline": field_values(st.sampled_from([PIPELINE, "ctc", "whisper", ""])),
    "partials": field_values(st.booleans()),
    "resume": st.one_of(st.just(MISSING), st.just(MISSING), json_values, st.fixed_dictionaries(
        {"session": field_values(valid_ids), "offset": field_values(
            st.floats(0, 1e9) | st.integers(0, 10**6) | st.sampled_from([-1, 1e308])),
         "segment": field_values(st.integers(0, 1000) | st.just(-1))})),
    "endpoint_ms": st.one_of(st.just(MISSING), st.just(MISSING), json_values,
                             st.sampled_from([100, 510, 10000, 99, 10001, 500.0])),
    "utterance_end_ms": st.one_of(st.just(MISSING), st.just(MISSING), json_values,
                                  st.sampled_from([500, 1000, 30000, 499, 30001])),
    "extra": st.one_of(st.just(MISSING), json_values),  # unknown fields are ignored
})

# Frame sizes around every limit: whole and broken sample frames, the contract limit and
# the WebSocket layer's (4x).
frame_sizes = st.one_of(
    st.integers(0, 64),
    st.sampled_from([LIMIT - 8, LIMIT - 4, LIMIT - 3, LIMIT - 2, LIMIT - 1, LIMIT, LIMIT + 1,
                     LIMIT + 4, 4 * LIMIT - 4, 4 * LIMIT, 4 * LIMIT + 1, 4 * LIMIT + 4,
                     8 * LIMIT]),
    st.integers(0, 5 * LIMIT),
)


@st.composite
def binary_frames(draw) -> tuple[str, bytes]:
    """Content from a drawn seed (drawing thousands of bytes or floats one by one costs
    milliseconds and overruns Hypothesis' buffer); for float frames a non-finite value at a
    drawn place."""
    n = draw(frame_sizes)
    kind = draw(st.sampled_from(["zeros", "random", "f32", "nonfinite"]))
    if kind == "zeros" or n > LIMIT:  # big ones: content does not matter
        return ("binary", bytes(n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        return ("binary", rng.bytes(n))
    data = rng.uniform(-2, 2, n // 4).astype("<f4")
    if kind == "nonfinite" and len(data):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from([np.nan, np.inf,
                                                                           -np.inf]))
    return ("binary", data.tobytes() + bytes(n % 4))


def _present(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not MISSING}
    return value


def _start_text(fields: dict[str, Any]) -> str:
    return json.dumps({"type": "start", **_present(fields)})


actions = st.one_of(
    start_fields.map(lambda f: ("text", _start_text(f))),
    start_fields.map(lambda f: ("text", _start_text(f))),
    st.just(("text", json.dumps({"type": "stop"}))),
    st.sampled_from([("text", json.dumps({"type": "keepalive"})),
                     ("text", json.dumps({"type": "finalize"})),
                     ("text", json.dumps({"type": "finalize", "extra": [1]}))]),
    binary_frames(),
    binary_frames(),
    st.text(max_size=40).map(lambda t: ("text", t)),
    json_values.map(lambda v: ("text", json.dumps(v))),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3).map(
        lambda d: ("text", json.dumps({**d, "type": d.get("type", "pause")}))),
    st.sampled_from([("text", '{"type": "start", "sample_rate": ' + "9" * 5000 + "}"),
                     ("text", "[" * 8000 + "]" * 8000), ("text", "\ud7ff" * 100),
                     ("text", '{"type": "start", "sample_rate": 16000, "channels": 1e400}'),
                     ("text", '{"type": "start", "sample_rate": NaN}'),
                     ("text", "x" * (4 * LIMIT + 1))]),
    st.sampled_from([("disconnect", None), ("abort", None)]),
)

# --- the model (docs/protocol.md) ---------------------------------------------------

BAD, UNSUPPORTED = "bad_request", "unsupported"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid_id(v: Any) -> bool:
    return (isinstance(v, str) and 1 <= len(v) <= 64
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in v))


def start_problems(msg: dict[str, Any]) -> tuple[set[str], dict[str, Any]]:
    """The codes a `start` deserves (empty: valid), and what a valid one declares."""
    codes: set[str] = set()
    rate = msg.get("sample_rate")
    if not _is_int(rate):
        codes.add(BAD)
    elif not 8000 <= rate <= 48000:
        codes.add(UNSUPPORTED)
    channels = msg.get("channels", 1)
    if not _is_int(channels):
        codes.add(BAD)
    elif not 1 <= channels <= 8:
        codes.add(UNSUPPORTED)
    encoding = msg.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str):
        codes.add(BAD)
    elif encoding not in ENCODINGS:
        codes.add(UNSUPPORTED)
    session = msg.get("session")
    if session is not None and not _valid_id(session):
        codes.add(BAD)
    pipeline = msg.get("pipeline")
    if pipeline is not None and not isinstance(pipeline, str):
        codes.add(BAD)
    elif pipeline is not None and pipeline != PIPELINE:
        codes.add(UNSUPPORTED)
    if not isinstance(msg.get("partials", True), bool):
        codes.add(BAD)
    for key, low, high in (("endpoint_ms", 100, 10000), ("utterance_end_ms", 500, 30000)):
        value = msg.get(key)
        if value is not None and (not _is_int(value) or not low <= value <= high):
            codes.add(BAD)
    resume = msg.get("resume")
    if resume is not None:
        if not isinstance(resume, dict) or not _valid_id(resume.get("session")):
            codes.add(BAD)
        else:
            if session is not None and session != resume["session"]:
                codes.add(BAD)
            offset = resume.get("offset")
            if (isinstance(offset, bool) or not isinstance(offset, (int, float))
                    or not 0 <= offset < math.inf):
                codes.add(BAD)
            segment = resume.get("segment")
            if segment is not None and (not _is_int(segment) or segment < 0):
                codes.add(BAD)
            session = resume["session"]
    frame = (ENCODINGS.get(encoding, 0) if isinstance(encoding, str) else 0) * (
        channels if _is_int(channels) else 0)
    return codes, {"session": session, "frame": frame, "encoding": encoding,
                   "resume": resume}


@dataclass
class Expect:
    """One acceptable answer: an event type ("ready", "done", "error" with `code`), or none
    (`kind` None), and the close code that follows (None: the stream goes on)."""

    kind: str | None
    code: str | None = None
    close: int | None = None


@dataclass
class Client:
    """The fuzzing connection and what the model knows of it."""

    url: str
    ws: ClientConnection | None = None
    started: dict[str, Any] | None = None
    used_ids: set[str] = field(default_factory=set)
    actions: int = 0
    connections: int = 0

    def expectations(self, action: tuple[str, Any]) -> list[Expect]:
        kind, payload = action
        if kind == "binary":
            n = len(payload)
            if n > 4 * LIMIT:
                return [Expect(None, close=1009)]
            if n > LIMIT:
                return [Expect("error", BAD, close=1008)]
            if self.started is None:
                return [Expect("error", BAD)]
            if n % self.started["frame"]:
                return [Expect("error", BAD)]
            if self.started["encoding"] == "pcm_f32le" and not np.isfinite(
                    np.frombuffer(payload, "<f4")).all():
                return [Expect("error", BAD)]
            return [Expect(None)]
        if len(payload.encode()) > 4 * LIMIT:
            return [Expect(None, close=1009)]
        try:
            msg = json.loads(payload)
        except (ValueError, RecursionError):
            return [Expect("error", BAD)]
        if not isinstance(msg, dict) or msg.get("type") not in KNOWN_TYPES:
            return [Expect("error", BAD)]
        if msg["type"] == "keepalive":
            return [Expect(None)]
        if msg["type"] == "finalize":
            return [Expect("finalized")] if self.started else [Expect("error", BAD)]
        if msg["type"] == "stop":
            return [Expect("done", close=1000)] if self.started else [Expect("error", BAD)]
        if self.started is not None:
            return [Expect("error", BAD)]  # a second start, whatever its fields
        codes, declared = start_problems(msg)
        if codes:
            return [Expect("error", c, close=1008 if c == UNSUPPORTED else None)
                    for c in sorted(codes)]
        out = [Expect("ready")]
        sid, resume = declared["session"], declared["resume"]
        if resume is not None and resume.get("segment") is None:
            # Unknown here unless it ended here before (the daemon remembers 4096).
            out.append(Expect("error", BAD, close=1008))
        if sid in self.used_ids:  # its earlier connection may still be closing
            out.append(Expect("error", BAD, close=1008))
        return out

    def run(self, action: tuple[str, Any]) -> None:
        self.actions += 1
        if action[0] in ("disconnect", "abort"):
            if self.ws is not None:
                if action[0] == "abort":  # the TCP connection drops, no close handshake
                    with contextlib.suppress(OSError):
                        self.ws.socket.shutdown(socket.SHUT_RDWR)
                self.ws.close()
                self.ws, self.started = None, None
            return
        if self.ws is None:
            self.ws = connect(self.url, max_size=None).__enter__()
            self.connections += 1
        options = self.expectations(action)
        self.ws.send(action[1])
        if options == [Expect(None)]:
            return
        got, closed = self._answer()
        if options[0].kind is None:  # 1009: the WebSocket layer refused it
            assert got is None and closed == 1009, (action[1][:80], got, closed)
            self.ws, self.started = None, None
            return
        assert got is not None, (action[1][:200], options, closed)
        match = [o for o in options if o.kind == got["type"] and o.code == got.get("code")]
        assert match, (action[1][:200], got, options)
        if got["type"] == "finalized":
            assert got["session"] == self.started["id"] and got["segments"] >= 0, got
        if got["type"] == "error":
            assert got["message"]
            assert got.get("session") == (self.started or {}).get("id"), got
        if got["type"] == "ready":
            assert got["pipeline"] == PIPELINE and got["protocol"] == 1
            msg = json.loads(action[1])
            declared = start_problems(msg)[1]
            if declared["session"] is not None:
                assert got["session"] == declared["session"]
            self.started = {**declared, "id": got["session"]}
            self.used_ids.add(got["session"])
        if match[0].close is not None:
            if closed is None:
                closed = self._closed()
            assert closed == match[0].close, (action[1][:200], got, closed)
            self.ws, self.started = None, None
        elif got["type"] == "done":
            raise AssertionError("done without close")

    def _answer(self) -> tuple[dict | None, int | None]:
        """The next event that is not recognition output (checked and skipped), or the
        close code if the server closed first."""
        assert self.ws is not None
        while True:
            try:
                event = json.loads(self.ws.recv(timeout=10))
            except ConnectionClosed as exc:
                return None, exc.rcvd.code if exc.rcvd else None
            if event["type"] in ("speech_start", "partial", "final", "utterance_end"):
                assert self.started and event["session"] == self.started["id"], event
                assert event["segment"] >= 0 and isinstance(event.get("start"), (int, float))
                continue
            return event, None

    def _closed(self) -> int | None:
        assert self.ws is not None
        try:
            while True:
                self.ws.recv(timeout=10)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None


# --- the test -----------------------------------------------------------------------


def play(client: Client, daemon: Daemon, steps: list[tuple[str, Any]]) -> None:
    """One example: each action checked against the model, then the daemon still up."""
    for action in steps:
        client.run(action)
    assert daemon.proc.poll() is None, "the daemon exited"


@pytest.mark.slow
@pytest.mark.timeout(0.3 * settings.default.max_examples)  # 600 s for the ci profile
def test_protocol_fuzz(daemon: Daemon, shared_audio_dir: Path) -> None:
    data = speech_pcm(shared_audio_dir)
    solo = finals(run_session(daemon.url, data, BYSTANDER, 0.0))
    assert len(solo) == 1
    bystander = Bystander(daemon.url, data)
    bystander.start()
    client = Client(daemon.url)
    examples = 0

    @given(st.lists(actions, min_size=1, max_size=8))
    # A type that is no string (found once by the bystander fuzz: the model's own set
    # lookup failed; the daemon answered bad_request as it should).
    @example([("text", '{"type": []}')])
    def one_example(steps: list[tuple[str, Any]]) -> None:
        nonlocal examples
        examples += 1
        play(client, daemon, steps)
        if examples % 200 == 0:
            m = metrics(daemon)
            # This client's session and the bystander's, plus ones still closing.
            assert m["streamd_sessions_active"] <= 2 + 3, m["streamd_sessions_active"]

    t0 = time.monotonic()
    try:
        one_example()
    finally:
        client.close()
        bystander.stop.set()
        bystander.join(60)
    seconds = time.monotonic() - t0
    m = metrics(daemon)
    deadline = time.monotonic() + 20
    while (m["streamd_sessions_active"] or m["streamd_connections_open"]) and (
            time.monotonic() < deadline):
        time.sleep(0.1)
        m = metrics(daemon)
    errors = {k: v for k, v in m.items() if k.startswith("streamd_errors_total")}
    print(f"\nfuzz: {examples} examples, {client.actions} actions on {client.connections} "
          f"connections in {seconds:.1f} s; bystander {len(bystander.rounds)} rounds; {errors}")
    assert bystander.failure is None, bystander.failure
    assert bystander.rounds and all(r == solo for r in bystander.rounds)
    assert examples >= max(CI_EXAMPLES, settings.default.max_examples)
    assert m["streamd_sessions_active"] == 0 and m["streamd_connections_open"] == 0
    assert 'streamd_errors_total{code="internal"}' not in m
    assert daemon.proc.poll() is None


# --- the same fuzz beside a real-model bystander -------------------------------------

REAL_MODEL_EXAMPLES = 300


def _never_starts(action: tuple[str, Any]) -> bool:
    """True unless `action` is a `start` the daemon could accept, or one that names a
    pipeline: the model's answer to those depends on the daemon's pipeline (`echo` above).
    Everything else (bad starts, frames, stray messages, disconnects) is refused before
    any recognition, so a tiny.en daemon answers exactly as the model says."""
    if action[0] != "text":
        return True
    try:
        msg = json.loads(action[1])
    except (ValueError, RecursionError):
        return True
    if not isinstance(msg, dict) or msg.get("type") != "start":
        return True
    return "pipeline" not in msg and bool(start_problems(msg)[0])


@pytest.fixture(scope="module")
def whisper_daemon(tmp_path_factory) -> Iterator[Daemon]:
    env = {"STREAMD_RECOGNITION_PIPELINE": "whisper", "STREAMD_SERVER_CONNECTION_RATE": "0",
           "STREAMD_RECOGNITION_BATCH_SIZES": "1",  # one session recognizes: batch 1 only
           "STREAMD_SERVER_MAX_FRAME_BYTES": str(LIMIT),
           "STREAMD_SERVER_HANDSHAKE_TIMEOUT_S": "3600"}
    with serve(tmp_path_factory.mktemp("fuzz-whisper"), env=env, startup_timeout=400) as d:
        yield d


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_protocol_fuzz_beside_a_real_model_bystander(whisper_daemon: Daemon,
                                                      shared_audio_dir: Path) -> None:
    """The hostile traffic of the fuzz above that never reaches a recognizer, against a
    `streamd serve` on the real tiny.en, while a bystander streams a recording through
    Whisper again and again: every answer is the documented one, and the bystander's
    finals (text and times) are those it gets alone."""
    daemon = whisper_daemon
    data = speech_pcm(shared_audio_dir)
    solo = finals(run_session(daemon.url, data, BYSTANDER, 0.0))
    assert len(solo) == 1 and "golden fortune" in solo[0][3].lower(), solo
    bystander = Bystander(daemon.url, data)
    bystander.start()
    client = Client(daemon.url)
    examples = 0

    @settings(max_examples=REAL_MODEL_EXAMPLES)
    @given(st.lists(actions.filter(_never_starts), min_size=1, max_size=8))
    def one_example(steps: list[tuple[str, Any]]) -> None:
        nonlocal examples
        examples += 1
        play(client, daemon, steps)

    try:
        one_example()
        while len(bystander.rounds) < 2 and bystander.failure is None:
            time.sleep(0.2)  # at least two whole rounds under the fuzz
    finally:
        client.close()
        bystander.stop.set()
        bystander.join(60)
    m = metrics(daemon)
    print(f"\nfuzz beside tiny.en: {examples} examples, {client.actions} actions on "
          f"{client.connections} connections; bystander {len(bystander.rounds)} rounds")
    assert bystander.failure is None, bystander.failure
    assert all(r == solo for r in bystander.rounds), (solo, bystander.rounds)
    assert examples >= REAL_MODEL_EXAMPLES
    assert 'streamd_errors_total{code="internal"}' not in m
    assert daemon.proc.poll() is None
