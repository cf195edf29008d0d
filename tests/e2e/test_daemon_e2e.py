"""`streamd serve` end to end: the real tiny.en, a real Mosquitto, real WebSocket clients.

One daemon process (default `whisper` pipeline) serves the whole module; the last test
stops it with SIGTERM. Audio is the shared recordings, streamed faster than real time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import RATE, REPO, Daemon, daemon_env, serve
from helpers.mosquitto import Mosquitto
from helpers.text import wer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.e2e

STREAM = "stream_shared_01.wav"


def run_daemon(workdir: Path, *args: str) -> contextlib.AbstractContextManager[Daemon]:
    """`streamd serve` with the default pipeline, node `e2e`, JSON logs."""
    # tiny.en loads and compiles every bucket before /healthz says ok.
    return serve(workdir, "--node", "e2e", *args, log_format="json", startup_timeout=400)


def json_logs(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.log_text().splitlines()
            if line.startswith("{")]


class MqttCollector:
    """paho client on its own thread; persistent session so a broker restart loses
    nothing queued for it (the broker runs with persistence)."""

    def __init__(self, port: int, topic: str = "streamd/#") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-collector",
                                  clean_session=False)
        self.client.on_message = lambda c, u, m: self.messages.append(
            (m.topic, json.loads(m.payload)))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def finals(self, session: str) -> list[dict]:
        """Finals of a session in arrival order, redeliveries (same seq) removed."""
        out, seen = [], set()
        for topic, payload in list(self.messages):
            if topic == f"streamd/{session}/final" and payload["seq"] not in seen:
                seen.add(payload["seq"])
                out.append(payload)
        return out

    def wait_finals(self, session: str, n: int, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.finals(session)) < n:
            time.sleep(0.05)
        return self.finals(session)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def load(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == RATE
    return audio


def s16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def stream(port: int, session: str, audio: np.ndarray, speed: float,
           during: Any = None, chunk_ms: int = 100, **start: Any) -> list[dict]:
    """Streams at `speed` x real time, then stop; returns every event up to `done`.
    `during(seconds_sent)` is called after each chunk (test actions mid-stream); a text
    message it returns is sent. `start`: more fields of the start message."""
    chunk = RATE * chunk_ms // 1000
    events: list[dict] = []
    with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le",
                            "channels": 1, "session": session, **start}))

        def receive() -> None:
            try:
                while True:
                    event = json.loads(ws.recv(timeout=120))
                    event["_t"] = time.monotonic()
                    events.append(event)
                    if event["type"] == "done":
                        return
            except (ConnectionClosed, TimeoutError):
                return

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        t0 = time.monotonic()
        for i in range(0, len(audio), chunk):
            ws.send(s16(audio[i : i + chunk]))
            sent = (i + chunk) / RATE
            if during is not None and (message := during(sent)) is not None:
                ws.send(message)
            time.sleep(max(0.0, t0 + sent / speed - time.monotonic()))
        ws.send(json.dumps({"type": "stop"}))
        reader.join(180)
    assert events and events[-1]["type"] == "done", events[-3:]
    return events


def check_order(events: list[dict], session: str) -> list[dict]:
    """Contract order per segment; every event names this session. Returns the finals."""
    assert events[0]["type"] == "ready"
    assert all(e.get("session") == session for e in events)
    finals = [e for e in events if e["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    current = None
    for e in events[1:-1]:
        if e["type"] == "speech_start":
            assert current is None
            current = e["segment"]
        elif e["type"] in ("partial", "final"):
            assert e["segment"] == current
            if e["type"] == "final":
                current = None
    return finals


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def manifest(shared_manifest) -> dict[str, dict]:
    return {e["audio"]: e for e in shared_manifest}


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("broker"), persistence=True) as b:
        yield b


@pytest.fixture(scope="module")
def collector(broker) -> Iterator[MqttCollector]:
    c = MqttCollector(broker.port)
    yield c
    c.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, broker, collector) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("daemon")
    # Batch sizes 1, 2, 4: enough for these tests, fewer shapes to warm up.
    (workdir / "streamd.toml").write_text("[recognition]\nbatch_sizes = [1, 2, 4]\n")
    # Every XLA compile is logged (JAX_LOG_COMPILES): test_nothing_compiled_while_serving.
    with serve(workdir, "--node", "e2e", "--config", str(workdir / "streamd.toml"),
               "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
               log_format="json", startup_timeout=400, env={"JAX_LOG_COMPILES": "1"}) as d:
        yield d


@pytest.fixture(scope="module")
def offline_text(shared_audio_dir) -> str:
    """`streamd transcribe` on the whole stream file (the offline reference)."""
    out = subprocess.run(
        [sys.executable, "-m", "streamd.cli", "transcribe", "--json",
         str(shared_audio_dir / STREAM)],
        env=daemon_env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])["text"]


# --------------------------------------------------------------------------- tests


def test_stream_wer_partials_mqtt_and_two_sessions(
    daemon, collector, manifest, shared_audio_dir, offline_text
) -> None:
    entry = manifest[STREAM]
    other = manifest["jfk_inaugural_1961.wav"]
    results: dict[str, list[dict]] = {}

    def run(session: str, path: Path, speed: float) -> None:
        results[session] = stream(daemon.port, session, load(path), speed)

    side = threading.Thread(target=run, args=("side", other["path"], 2.0))
    side.start()
    run("main", entry["path"], 2.0)
    side.join(300)
    Path(os.environ.get("STREAMD_E2E_DUMP", "/dev/null")).write_text(json.dumps(results))

    finals = check_order(results["main"], "main")
    side_finals = check_order(results["side"], "side")
    refs = [s["text"] for s in entry["segments"]]
    # Finals and the manifest's utterances overlap both ways: no utterance is missed and
    # no final comes from the noise between them (the VAD may split one at a pause).
    def overlaps(f: dict, seg: dict) -> bool:
        return f["start"] < seg["end_s"] and seg["start_s"] < f["end"]

    for seg in entry["segments"]:
        assert any(overlaps(f, seg) for f in finals), seg
    for f in finals:
        assert any(overlaps(f, seg) for seg in entry["segments"]), f
    stream_wer = wer(refs, [f["text"] for f in finals])
    offline_wer = wer(refs, [offline_text])
    print(f"\nWER streaming {stream_wer:.4f} offline (streamd transcribe) {offline_wer:.4f}")
    assert stream_wer <= offline_wer + 0.02

    # Partials (with a stable prefix of their text that later partials and the final
    # keep) arrive before the finals. They are best effort (skipped while the engine has
    # a request waiting, docs/protocol.md): on a loaded machine, with two sessions at
    # twice real time, a short segment may get its final alone (seen in one suite run).
    with_partials = 0
    for f in finals:
        partials = [e for e in results["main"]
                    if e["type"] == "partial" and e["segment"] == f["segment"]]
        if not partials:
            continue
        with_partials += 1
        assert partials[0]["_t"] < f["_t"]
        for p in partials:
            assert p["text"].startswith(p.get("stable") or "")
        stable = [p["stable"] for p in partials if p.get("stable")]
        assert all(b.startswith(a) for a, b in zip(stable, stable[1:], strict=False))
        assert f["text"].startswith(stable[-1] if stable else ""), (f, stable)
    assert with_partials >= 0.75 * len(finals), (with_partials, len(finals))

    # The concurrent session got its own speech, not the other's.
    # (Mixed audio or events would add words to one of the two WERs, and times past the
    # side file's end would show the main stream's segments.)
    assert wer([other["text"]], [f["text"] for f in side_finals]) < 0.3
    assert all(f["end"] <= other["duration_s"] + 0.05 for f in side_finals)

    # MQTT carried the same finals, in order, for both sessions.
    for session, ws_finals in (("main", finals), ("side", side_finals)):
        got = collector.wait_finals(session, len(ws_finals))
        assert [(g["segment"], g["text"]) for g in got] == [
            (f["segment"], f["text"]) for f in ws_finals]
        assert all(g["node"] == "e2e" for g in got)


def test_beam_size_from_config_decodes_finals(tmp_path, manifest) -> None:
    """`recognition.beam_size = 3` reaches the whisper pipeline: every final runs in a
    beam kind of a >= 10 s window, partials stay greedy, and the finals are good text."""
    (tmp_path / "streamd.toml").write_text("[recognition]\nbatch_sizes = [1]\nbeam_size = 3\n")
    with run_daemon(tmp_path, "--config", str(tmp_path / "streamd.toml")) as daemon:
        entry = manifest["jfk_inaugural_1961.wav"]
        finals = check_order(stream(daemon.port, "beam", load(entry["path"]), 2.0), "beam")
        with urllib.request.urlopen(f"{daemon.http}/metrics") as r:
            metrics = r.read().decode()
    runs = {m[1]: float(m[2]) for m in re.finditer(
        r'streamd_engine_batch_fill_count\{kind="([^"]+)"\} ([0-9.e+]+)', metrics)}
    beam = {k: v for k, v in runs.items() if k.endswith("/beam3")}
    assert beam and all(float(k.split("/")[1][:-1]) >= 10 for k in beam), runs
    # One beam decode per final, two for a final whose fresh decode contradicted the
    # stable prefix (decoded again with it forced).
    redone = re.search(r"^streamd_finals_restabilized_total ([0-9.e+]+)$", metrics, re.M)
    assert redone, metrics[-2000:]
    assert sum(beam.values()) == len(finals) + float(redone[1])
    assert sum(v for k, v in runs.items() if "beam" not in k) > 0  # greedy partials
    # Finals were decoded at the speech pause and reused at the endpoint.
    early = re.search(r"^streamd_finals_early_total ([0-9.e+]+)$", metrics, re.M)
    assert early and float(early[1]) >= 1, metrics[-2000:]
    assert wer([entry["text"]], [f["text"] for f in finals]) < 0.2


def test_broker_killed_and_restarted_mid_stream(daemon, broker, collector, manifest) -> None:
    entry = manifest[STREAM]
    audio = load(entry["path"])[: int(entry["segments"][4]["end_s"] * RATE) + RATE]
    kill_at, back_at = entry["segments"][1]["start_s"], entry["segments"][3]["start_s"]
    state = {"killed": False, "back": False}

    def during(sent: float) -> None:
        if sent >= kill_at and not state["killed"]:
            broker.stop(kill=True)
            state["killed"] = time.monotonic()
        if sent >= back_at and not state["back"]:
            broker.start()
            state["back"] = time.monotonic()

    events = stream(daemon.port, "brk", audio, 2.0, during)
    assert state["killed"] and state["back"]
    finals = check_order(events, "brk")
    assert len(finals) >= 5  # five utterances (the VAD may split one at a pause)
    # Some finals were made while the broker was down: they waited in the outbox.
    assert [f for f in finals if state["killed"] < f["_t"] < state["back"]], finals
    got = collector.wait_finals("brk", len(finals), timeout=60)
    # Every final, in order, exactly the WebSocket ones (redeliveries removed by seq).
    assert [(g["segment"], g["text"]) for g in got] == [(f["segment"], f["text"]) for f in finals]
    assert [g["seq"] for g in got] == sorted(g["seq"] for g in got)


def noise(kind: str, seconds: float, dbfs: float, seed: int) -> np.ndarray:
    """Loud noise that webrtcvad takes for speech at times: white, or white noise
    modulated at 4 Hz (a syllable rate)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(seconds * RATE))
    if kind == "modulated":
        x *= 1 + np.sin(2 * np.pi * 4 * np.arange(len(x)) / RATE)
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def test_loud_noise_publishes_nothing(daemon, collector) -> None:
    """Noise loud enough for the VAD to open segments: recognition finds no words in
    them, so no event but `done` (no speech_start, no empty final) reaches the client or
    MQTT; the metrics show the VAD did open segments that were dropped."""
    def dropped() -> float:
        with urllib.request.urlopen(f"{daemon.http}/metrics") as r:
            m = re.search(r"^streamd_noise_segments_total ([0-9.e+]+)$", r.read().decode(), re.M)
        assert m
        return float(m[1])

    before = dropped()
    gap = np.zeros(RATE, np.float32)
    audio = np.concatenate([gap, noise("white", 3, -20, 0), gap,
                            noise("modulated", 4, -30, 1), gap])
    events = stream(daemon.port, "noise", audio, 4.0)
    assert [e["type"] for e in events] == ["ready", "done"], events
    assert events[-1]["segments"] == 0
    assert dropped() - before >= 1, "the VAD should have taken some of it for speech"
    time.sleep(0.5)
    assert [t for t, _ in collector.messages if t.startswith("streamd/noise/")] == [
        "streamd/noise/done"]


def test_finalize_and_utterance_end_with_whisper(daemon, manifest) -> None:
    """A `finalize` mid-sentence ends the segment at once with the real model: its final
    keeps the stable promise, `finalized` follows it, and the rest of the speech is a new
    segment; with `utterance_end_ms` every utterance_end follows its segment's final."""
    entry = manifest["jfk_inaugural_1961.wav"]
    audio = np.concatenate([load(entry["path"]), np.zeros(RATE * 3 // 2, np.float32)])
    cut = 2.0  # seconds: within "And so, my fellow Americans"
    asked: list[float] = []

    def finalize_once(sent: float) -> str | None:
        if sent >= cut and not asked:
            asked.append(sent)
            return json.dumps({"type": "finalize"})
        return None

    events = stream(daemon.port, "fin", audio, 2.0, finalize_once, utterance_end_ms=1000)
    finals = check_order(events, "fin")
    done = [e["type"] for e in events].index("finalized")
    assert events[done]["segments"] == 1
    first = [e for e in events[:done] if e["type"] == "final"]
    assert [f["segment"] for f in first] == [0] and first[0]["text"]
    assert first[0]["end"] <= asked[0] + 0.001  # ended at the audio heard, not later
    stable = [e["stable"] for e in events if e["type"] == "partial" and e["segment"] == 0
              and e.get("stable")]
    assert first[0]["text"].startswith(stable[-1] if stable else "")
    assert len(finals) >= 2  # speech after the finalize: new segments
    assert wer([entry["text"]], [" ".join(f["text"] for f in finals)]) < 0.35
    ends = [(i, e) for i, e in enumerate(events) if e["type"] == "utterance_end"]
    assert ends and ends[-1][1]["segment"] == finals[-1]["segment"]  # 1.5 s of silence
    for i, end in ends:
        final = next(e for e in events[:i][::-1] if e["type"] == "final")
        assert final["segment"] == end["segment"]
        assert end["last_speech_end"] <= final["end"]


def test_nothing_compiled_while_serving(daemon) -> None:
    """Every shape the whisper pipeline issues was compiled before READY: after it, the
    log (JAX_LOG_COMPILES) shows no compile, after every test above served sessions."""
    logs = json_logs(daemon)
    ready = next(i for i, r in enumerate(logs) if r["msg"] == "ready")
    assert any("Compiling" in r["msg"] for r in logs[:ready]), "compiles are logged at warm-up"
    late = [r["msg"][:200] for r in logs[ready:] if "Compiling" in r["msg"]]
    assert not late, late


def test_sigterm_mid_utterance_publishes_final(daemon, collector, manifest) -> None:
    entry = manifest["ljspeech_LJ001-0030.wav"]
    audio = load(entry["path"])
    head = np.concatenate([np.zeros(RATE // 2, np.float32), audio[: 3 * RATE]])
    events: list[dict] = []
    with connect(f"ws://127.0.0.1:{daemon.port}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le",
                            "channels": 1, "session": "term"}))
        chunk = RATE // 10
        for i in range(0, len(head), chunk):  # real time: the speaker is mid-sentence
            ws.send(s16(head[i : i + chunk]))
            time.sleep(0.1)
        deadline = time.monotonic() + 20
        while not any(e["type"] == "partial" for e in events) and time.monotonic() < deadline:
            events.append(json.loads(ws.recv(timeout=20)))
        assert any(e["type"] == "partial" for e in events)
        daemon.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(ws.recv(timeout=30)))
    assert closed.value.rcvd.code == 1001
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 1 and finals[0]["segment"] == 0
    words = re.findall(r"[a-z]+", finals[0]["text"].lower())
    assert {"few", "years"} <= set(words), finals[0]
    assert events[-1] == {"type": "done", "session": "term", "segments": 1}
    assert daemon.proc.wait(30) == 0
    logs = json_logs(daemon)
    assert any(r["msg"] == "stopped" for r in logs)
    # Published to MQTT before the process exited.
    got = collector.wait_finals("term", 1, timeout=5)
    assert [g["text"] for g in got] == [finals[0]["text"]]
