"""`streamd-stream` as a subprocess (its console script) against a real `streamd serve`.

The daemon runs as a subprocess on a free port. Structure tests use the daemon's test
recognizer (`--pipeline echo`, streamd/pipelines/echo.py: a final's text is the length
of the audio it was given), so what the client prints is
checked against the reference segment spans of the shared stream recording, not against
itself. The word checks need the real Whisper pipeline and skip, saying so, until the
build has one.

`run_daemon` lives here and test_listen.py / test_browser.py import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from helpers import free_port
from helpers.client import StreamClient
from helpers.daemon import Daemon, serve
from helpers.mosquitto import Mosquitto, Subscriber
from helpers.relay import Relay
from helpers.text import normalize, wer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKEN = "client-test-token"
FINAL_RE = re.compile(r"^\[(\d+):(\d\d\.\d\d) - (\d+):(\d\d\.\d\d)\] (.*)$")
PAD_S = 0.75  # VAD start/end padding plus frame rounding around a reference span



def _has_whisper() -> bool:
    try:
        return importlib.util.find_spec("streamd.pipelines.whisper") is not None
    except ModuleNotFoundError:  # no streamd.pipelines package at all
        return False


HAS_WHISPER = _has_whisper()
NO_WHISPER = (
    "needs the real recognizer: streamd/pipelines/whisper.py (the default `whisper` "
    "pipeline of `streamd serve`) is not in this build yet"
)


def script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"console script {name} missing: run `pip install -e . --no-deps`")
    return str(path)


# --- a real daemon process ----------------------------------------------------------


@contextlib.contextmanager
def run_daemon(
    workdir: Path,
    *args: str,
    test_pipeline: bool = True,
    token: str | None = TOKEN,
    startup_timeout: float = 90.0,
) -> Iterator[Daemon]:
    """`streamd serve` (node `clients-test`, the test recognizer unless `test_pipeline`
    is false, `token` required when given), up once /healthz says ok; always ended."""
    env: dict[str, str] = {}
    if test_pipeline:
        env["STREAMD_RECOGNITION_PIPELINE"] = "echo"
    token_args = ["--token", token] if token else []
    with serve(workdir, "--node", "clients-test", *args, *token_args, env=env,
               startup_timeout=startup_timeout) as daemon:
        yield daemon


# --- parsing what the client prints -------------------------------------------------


@dataclass(frozen=True)
class Final:
    start: float
    end: float
    text: str


def parse_finals(stdout: str) -> list[Final]:
    """Every `[m:ss.cc - m:ss.cc] text` line; anything else on stdout is a defect."""
    finals = []
    for line in stdout.splitlines():
        m = FINAL_RE.match(line)
        assert m, f"unexpected output line {line!r}"
        start = int(m[1]) * 60 + float(m[2])
        end = int(m[3]) * 60 + float(m[4])
        finals.append(Final(start, end, m[5]))
    return finals


def check_against_reference(finals: list[Final], spans: list[tuple[float, float]],
                            text_is_duration: bool = True) -> None:
    """Finals are ordered, disjoint, each inside a reference utterance (plus padding),
    every utterance is heard, and (test recognizer) each final's text, the length of the
    audio it got, matches its printed times."""
    assert finals, "no finals printed"
    for a, b in zip(finals, finals[1:], strict=False):
        assert a.end <= b.start + 0.011, f"finals overlap or out of order: {a} {b}"
    for f in finals:
        assert f.end > f.start
        assert any(s - PAD_S <= f.start and f.end <= e + PAD_S for s, e in spans), (
            f"final {f} is not inside any reference utterance {spans}")
        if text_is_duration:
            assert abs(float(f.text) - (f.end - f.start)) <= 0.021, f
    for s, e in spans:
        heard = sum(max(0.0, min(e, f.end) - max(s, f.start)) for f in finals)
        assert heard >= 0.8 * (e - s), f"utterance {s:.2f}-{e:.2f} s mostly missed: {finals}"


@pytest.fixture(scope="module")
def stream_entry(shared_manifest: list[dict]) -> dict:
    return next(e for e in shared_manifest if e.get("segments"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_daemon(tmp_path_factory.mktemp("daemon"), "--max-sessions", "4") as d:
        yield d


def run_client(daemon: Daemon, *args: str, token: str | None = TOKEN,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [script("streamd-stream"), "--url", daemon.url, *args]
    if token:
        cmd += ["--token", token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "STREAMD_TOKEN"})


def padded_utterance(entry: dict, lead: float = 0.5, tail: float = 1.5) -> np.ndarray:
    audio, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16000
    return np.concatenate([np.zeros(int(lead * rate), np.float32), audio,
                           np.zeros(int(tail * rate), np.float32)])


# --- structure, against the daemon's test recognizer ---------------------------------


def test_file_finals_follow_the_reference_segments(daemon: Daemon, stream_entry: dict):
    out = run_client(daemon, "--speed", "0", str(stream_entry["path"]))
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout  # no live line when stdout is not a terminal
    spans = [(s["start_s"], s["end_s"]) for s in stream_entry["segments"]]
    check_against_reference(parse_finals(out.stdout), spans)


def test_json_prints_the_events_unchanged_and_in_order(daemon: Daemon,
                                                        stream_entry: dict):
    out = run_client(daemon, "--json", "--speed", "0", "--session", "json-check",
                     str(stream_entry["path"]))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    events = [json.loads(line) for line in lines]
    # Unchanged: the daemon's own compact encoding, not a re-serialization of ours.
    assert all(line == json.dumps(e, separators=(",", ":"), ensure_ascii=False)
               for line, e in zip(lines, events, strict=True))
    assert events[0]["type"] == "ready" and events[0]["session"] == "json-check"
    assert events[0]["protocol"] == 1
    assert events[-1] == {"type": "done", "session": "json-check",
                          "segments": sum(e["type"] == "final" for e in events)}
    finals = [e for e in events if e["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    started: set[int] = set()
    for e in events[1:-1]:
        assert e["session"] == "json-check"
        if e["type"] == "speech_start":
            started.add(e["segment"])
        elif e["type"] in ("partial", "final"):
            assert e["segment"] in started, f"{e} before its speech_start"
    assert any(e["type"] == "partial" for e in events)
    spans = [(s["start_s"], s["end_s"]) for s in stream_entry["segments"]]
    check_against_reference([Final(f["start"], f["end"], f["text"]) for f in finals], spans)


@pytest.mark.parametrize("rate,channels", [(44100, 2), (8000, 1), (96000, 1)])
def test_other_rates_and_channels(daemon: Daemon, shared_manifest: list[dict],
                                  tmp_path: Path, rate: int, channels: int):
    """44.1 kHz stereo and 8 kHz go out at their own rate (the daemon resamples);
    96 kHz is outside the protocol's range and is resampled to 16 kHz by the client."""
    entry = next(e for e in shared_manifest if e["audio"].startswith("librispeech_61"))
    audio = soxr.resample(padded_utterance(entry), 16000, rate)
    path = tmp_path / f"utt_{rate}.flac"
    sf.write(path, np.stack([audio] * channels, axis=1) if channels > 1 else audio, rate)
    out = run_client(daemon, "--speed", "0", str(path))
    assert out.returncode == 0, out.stderr
    check_against_reference(parse_finals(out.stdout), [(0.5, 0.5 + entry["duration_s"])])


def test_ctrl_c_sends_stop_and_prints_the_last_final(daemon: Daemon,
                                                     stream_entry: dict, tmp_path: Path):
    """Interrupted inside the first utterance (real-time pace): the speech heard so far
    still comes back as a final, and the client exits 0 after `done`."""
    out_path = tmp_path / "events.jsonl"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [script("streamd-stream"), "--url", daemon.url, "--token", TOKEN, "--json",
             str(stream_entry["path"])], stdout=out, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt 1.5 s after the daemon heard speech start, whatever the machine load.
        deadline = time.monotonic() + 30
        while '"speech_start"' not in out_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "no speech_start"
            time.sleep(0.05)
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopping" in stderr
    events = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert events[-1]["type"] == "done"
    finals = [e for e in events if e["type"] == "final"]
    assert len(finals) == 1 == events[-1]["segments"], events
    (final,) = finals
    first = stream_entry["segments"][0]
    assert first["start_s"] - PAD_S <= final["start"]
    # Cut short: more than the 1.5 s heard, well before the utterance's own end.
    assert final["start"] + 1.0 < final["end"] < first["end_s"] - 3.0, final
    assert abs(float(final["text"]) - (final["end"] - final["start"])) <= 0.021


def test_live_partial_line_on_a_terminal(daemon: Daemon, shared_manifest: list[dict],
                                         tmp_path: Path):
    """On a TTY the partial is rewritten in place (CR + erase line); finals end lines."""
    entry = next(e for e in shared_manifest if e["audio"].startswith("librispeech_2412"))
    path = tmp_path / "utt.wav"
    sf.write(path, padded_utterance(entry), 16000)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [script("streamd-stream"), "--url", daemon.url, "--token", TOKEN, "--speed", "4",
         str(path)], stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    text = b"".join(chunks).decode()
    assert "\r\x1b[2K" in text  # the live line was drawn and cleared
    lines = [line.split("\r\x1b[2K")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    finals = parse_finals("\n".join(line for line in lines if line.strip()))
    check_against_reference(finals, [(0.5, 0.5 + entry["duration_s"])])


# --- refusals and failures: clear message, non-zero exit ------------------------------


def test_wrong_token_is_refused_with_401(daemon: Daemon, stream_entry: dict):
    out = run_client(daemon, "--speed", "0", str(stream_entry["path"]), token="wrong")
    assert out.returncode == 1
    assert "HTTP 401" in out.stderr and "token" in out.stderr
    assert out.stdout == ""


def test_session_limit_is_refused_with_503(tmp_path: Path, stream_entry: dict):
    from websockets.sync.client import connect

    with run_daemon(tmp_path, "--max-sessions", "1") as d:
        with connect(d.url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000,
                                "encoding": "pcm_s16le", "channels": 1}))
            assert json.loads(ws.recv(10))["type"] == "ready"  # the one slot is taken
            out = run_client(d, "--speed", "0", str(stream_entry["path"]))
    assert out.returncode == 1
    assert "HTTP 503" in out.stderr and "busy" in out.stderr


def test_error_event_exits_non_zero(daemon: Daemon, stream_entry: dict):
    out = run_client(daemon, "--pipeline", "no-such-pipeline", str(stream_entry["path"]))
    assert out.returncode == 1
    assert "daemon error (unsupported)" in out.stderr


def test_unreachable_daemon(stream_entry: dict):
    port = free_port()  # nothing listens there
    out = subprocess.run(
        [script("streamd-stream"), "--url", f"ws://127.0.0.1:{port}/v1/stream",
         str(stream_entry["path"])], capture_output=True, text=True, timeout=30)
    assert out.returncode == 3
    assert "cannot reach the daemon" in out.stderr


def test_unreadable_file(daemon: Daemon, tmp_path: Path):
    bad = tmp_path / "not-audio.wav"
    bad.write_text("hello")
    out = run_client(daemon, str(bad))
    assert out.returncode == 2
    assert "cannot read" in out.stderr


# --- resuming a broken session ---------------------------------------------------------


def test_resume_keeps_the_audio_since_the_last_final():
    from clients.stream import Resume

    r = Resume(rate=8000, limit_s=2.0)
    assert r.start_resume() is None  # no `ready` yet: start afresh, all audio again
    r.add(np.arange(8000, dtype="<i2").tobytes())  # 1 s
    r.event({"type": "ready", "session": "s", "sample_rate": 16000})
    assert r.start_resume() == {"session": "s", "offset": 0.0, "segment": 0}
    r.event({"type": "final", "session": "s", "segment": 0, "start": 0.1, "end": 0.25,
             "text": "x"})
    assert r.start_resume() == {"session": "s", "offset": 0.25, "segment": 1}
    assert r.audio_from(0, 10) == np.arange(2000, 2010, dtype="<i2").tobytes()
    assert r.audio_from(7995, 10) == np.arange(7995, 8000, dtype="<i2").tobytes()
    r.event({"type": "partial", "session": "s", "segment": 1, "start": 0.3, "end": 0.9,
             "text": "y"})
    assert r.start_resume()["offset"] == 0.25  # partials keep everything
    r.add(np.zeros(16000, "<i2").tobytes())  # 2 s more: over the 2 s limit, 0.75 s dropped
    assert r.dropped_s == pytest.approx(0.75) and r.kept_start == 8000
    r.event({"type": "done", "session": "s", "segments": 3})  # ended early by the daemon
    assert r.start_resume() == {"session": "s", "offset": 1.0, "segment": 3}


def test_a_cut_connection_is_resumed(tmp_path: Path, stream_entry: dict):
    """The network between client and daemon breaks (no close frame) in the middle of
    the 3rd utterance: the client reconnects, resumes the session and re-sends the audio
    since its last final; it prints a final for every utterance, each segment number
    once. On MQTT the daemon also published the cut segment's final (the client never
    saw it): that segment number comes twice, and the later `ts` is the whole segment."""
    spans = [(s["start_s"], s["end_s"]) for s in stream_entry["segments"]]
    session = "cut-1"

    async def main() -> tuple[list[tuple[float, dict]], list[dict], str, int]:
        with Mosquitto(tmp_path) as broker:
            async with Subscriber(broker, [f"streamd/{session}/final"]) as sub:
                with run_daemon(tmp_path, "--mqtt-host", broker.host, "--mqtt-port",
                                str(broker.port)) as d, Relay(d.port) as relay:
                    with StreamClient(f"ws://127.0.0.1:{relay.port}/v1/stream",
                                      stream_entry["path"], "--speed", "4", "--session",
                                      session, "--token", TOKEN, workdir=tmp_path) as client:
                        await asyncio.to_thread(
                            client.wait_for, lambda e: e["type"] == "partial"
                            and spans[2][0] - 1 < e["start"] < spans[2][1]
                            and e["end"] - e["start"] > 2.0, 60)
                        assert relay.cut() == 1
                        rc = await asyncio.to_thread(client.wait, 120)
                        assert rc == 0, client.stderr_text()
                    want = {e["segment"] for _, e in client.events if e["type"] == "final"}
                    await sub.wait_for(lambda m: want <= {
                        p["segment"] for p in sub.payloads(f"streamd/{session}/final")},
                        timeout=20)
                    return (client.events, sub.payloads(f"streamd/{session}/final"),
                            client.stderr_text(), relay.connections)

    events, published, stderr, connections = asyncio.run(main())
    assert f"resuming session {session}" in stderr and connections >= 2
    readies = [(t, e) for t, e in events if e["type"] == "ready"]
    assert len(readies) == 2
    t_ready, resumed = readies[1]
    before = [e for t, e in events if e["type"] == "final" and t < t_ready]
    assert resumed["resume"] == {"offset": before[-1]["end"], "segment": len(before)}
    finals = [e for _, e in events if e["type"] == "final"]
    assert [f["segment"] for f in finals] == list(range(len(finals)))
    assert events[-1][1] == {"type": "done", "session": session, "segments": len(finals)}
    check_against_reference([Final(f["start"], f["end"], f["text"]) for f in finals], spans)

    groups: dict[int, list[dict]] = {}
    for p in published:
        groups.setdefault(p["segment"], []).append(p)
    assert set(groups) == {f["segment"] for f in finals}
    latest = [max(g, key=lambda p: p["ts"]) for _, g in sorted(groups.items())]
    assert [(p["start"], p["end"], p["text"]) for p in latest] == [
        (f["start"], f["end"], f["text"]) for f in finals]  # what the client printed
    cut = groups[len(before)]
    assert len(cut) == 2  # the daemon finalized the cut segment on the drop
    early, late = sorted(cut, key=lambda p: p["ts"])
    assert early["start"] == pytest.approx(late["start"], abs=0.061)
    assert early["end"] < late["end"]
    assert all(len(g) == 1 for k, g in groups.items() if k != len(before))


def test_gives_up_resuming_after_resume_s(tmp_path: Path, stream_entry: dict):
    """The only daemon dies and stays dead: the client tries for --resume-s, then exits 3."""
    with run_daemon(tmp_path) as d, StreamClient(
            d.url, stream_entry["path"], "--resume-s", "2", "--token", TOKEN,
            workdir=tmp_path) as client:
        client.wait_for(lambda e: e["type"] == "ready", 30)
        os.killpg(d.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        rc = client.wait(30)
        waited = time.monotonic() - t_kill
    assert rc == 3, client.stderr_text()
    assert "resuming session" in client.stderr_text()
    assert "could not resume within 2 s" in client.stderr_text()
    assert 1.0 < waited < 10, waited


# --- the real recognizer --------------------------------------------------------------


def assert_words(reference: str, texts: list[str], max_wer: float) -> float:
    """The finals say the reference's words: WER after Whisper's English normalizer."""
    hypothesis, error = normalize(" ".join(texts)), wer([reference], texts)
    print(f"WER {error:.3f} over {len(texts)} finals: {hypothesis!r}")
    assert error <= max_wer, (error, hypothesis)
    return error


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not HAS_WHISPER, reason=NO_WHISPER)
def test_real_words_from_the_stream_recording(tmp_path: Path, stream_entry: dict):
    with run_daemon(tmp_path, test_pipeline=False, startup_timeout=600) as d:
        out = run_client(d, "--speed", "0", str(stream_entry["path"]), timeout=600)
    assert out.returncode == 0, out.stderr
    finals = parse_finals(out.stdout)
    spans = [(s["start_s"], s["end_s"]) for s in stream_entry["segments"]]
    check_against_reference(finals, spans, text_is_duration=False)
    assert_words(stream_entry["text"], [f.text for f in finals], max_wer=0.25)


def test_microphone_through_pulseaudio(daemon: Daemon, shared_manifest: list[dict],
                                       tmp_path: Path):
    """`--mic pulse`: real PortAudio capture from a PulseAudio pipe source fed with the
    utterance at real-time pace; Ctrl+C ends it and the finals come back."""
    from helpers.pulse import PulseAudio

    entry = next(e for e in shared_manifest if e["audio"].startswith("librispeech_61"))
    samples = (padded_utterance(entry, 0.5, 1.5) * 32767).astype(np.int16)
    out_path = tmp_path / "mic.out"
    with PulseAudio(tmp_path) as pa, open(out_path, "w") as out:
        proc = subprocess.Popen(
            [script("streamd-stream"), "--url", daemon.url, "--token", TOKEN, "--json",
             "--mic", "pulse"], stdout=out, stderr=subprocess.PIPE, text=True, env=pa.env)
        try:
            deadline = time.monotonic() + 30
            while '"ready"' not in out_path.read_text():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "no ready event"
                time.sleep(0.05)
            feeder = pa.play(samples)
            assert feeder.finished.wait(30)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert events[0]["type"] == "ready" and events[-1]["type"] == "done"
    finals = [Final(e["start"], e["end"], e["text"]) for e in events if e["type"] == "final"]
    assert finals, events
    for f in finals:
        assert abs(float(f.text) - (f.end - f.start)) <= 0.021, f
    heard = sum(f.end - f.start for f in finals)
    assert 0.8 * entry["duration_s"] <= heard <= entry["duration_s"] + 1.5, (heard, finals)
