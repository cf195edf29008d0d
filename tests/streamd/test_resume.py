"""Session resume (`start.resume`): a session goes on from a stream offset on a new
connection, its segment numbers and MQTT `seq` continuing, on a real daemon and broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.daemon import speech_audio
from helpers.mosquitto import Mosquitto, Subscriber
from test_server import (
    MemoryPublisher,
    recv_event,
    running_daemon,
    s16,
    start_msg,
    stream_session,
    test_config,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(120)
RATE = 16000


def _events(url: str, data: bytes, **start) -> list[dict]:
    return stream_session(url, data, pace=0.002, **start)


def test_resume_continues_times_segments_and_seq(tmp_path: Path,
                                                 shared_audio_dir: Path) -> None:
    audio = speech_audio(shared_audio_dir)  # 3 utterances, 1 s of silence around each
    publisher = MemoryPublisher()
    with Mosquitto(tmp_path) as broker:
        cfg = test_config(mqtt={"host": broker.host, "port": broker.port})
        with running_daemon(cfg, publisher) as d:
            url = f"ws://127.0.0.1:{d.server.port}/v1/stream"

            async def main() -> tuple[list[dict], list[dict], list[dict], list[dict]]:
                async with Subscriber(broker, [f"streamd/r1/{kind}" for kind in
                                               ("speech_start", "final", "done")]) as sub:
                    whole = await asyncio.to_thread(_events, url, s16(audio), session="w1")
                    # The same audio as two connections: into the silence after the 2nd
                    # utterance, then the rest, resumed at that offset.
                    cut = cut_samples(whole)
                    first = await asyncio.to_thread(_events, url, s16(audio[:cut]),
                                                    session="r1")
                    second = await asyncio.to_thread(
                        _events, url, s16(audio[cut:]),
                        resume={"session": "r1", "offset": cut / RATE})
                    await sub.wait_for(lambda m: len(sub.payloads("streamd/r1/done")) >= 2)
                return whole, first, second, sub.payloads("streamd/r1/+")

            whole, first, second, published = asyncio.run(main())

            # Resume of an id this daemon never saw, without resume.segment: refused.
            with connect(url) as ws:
                ws.send(start_msg(resume={"session": "nobody", "offset": 1.0}))
                error = recv_event(ws)
                assert error["type"] == "error" and error["code"] == "bad_request"
                assert "resume.segment" in error["message"]
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=5)
                assert closed.value.rcvd.code == 1008
            # With resume.segment, any id goes on from there (e.g. from another node).
            other = _events(url, s16(audio[cut_samples(whole):]),
                            resume={"session": "elsewhere", "offset": 50.0, "segment": 7})

    whole_finals = [e for e in whole if e["type"] == "final"]
    first_finals = [e for e in first if e["type"] == "final"]
    second_finals = [e for e in second if e["type"] == "final"]
    assert len(whole_finals) == 3 and len(first_finals) == 2 and len(second_finals) == 1
    assert second[0] == {"type": "ready", "session": "r1", "pipeline": "echo",
                         "sample_rate": 16000, "protocol": 1,
                         "resume": {"offset": round(cut_samples(whole) / RATE, 3),
                                    "segment": 2}}
    # Numbering and times go on: as if the stream had been one connection.
    assert [f["segment"] for f in first_finals + second_finals] == [0, 1, 2]
    starts = [e for e in second if e["type"] == "speech_start"]
    assert [s["segment"] for s in starts] == [2]
    # Same times as the whole stream's, up to two VAD frames: the resumed connection's
    # VAD starts without the history (webrtcvad's adaptation) the whole stream had.
    for resumed, reference in zip(second_finals, whole_finals[2:], strict=True):
        assert resumed["start"] == pytest.approx(reference["start"], abs=0.061)
        assert resumed["end"] == pytest.approx(reference["end"], abs=0.061)
        assert float(resumed["text"]) == pytest.approx(resumed["end"] - resumed["start"],
                                                       abs=0.011)
    assert second[-1] == {"type": "done", "session": "r1", "segments": 3}
    # MQTT: each connection's events and its done; the session's seq increases across
    # the two connections (the first one's `done` does not restart it).
    assert [p["type"] for p in published] == ["speech_start", "final"] * 2 + ["done"] + [
        "speech_start", "final", "done"]
    assert [p["segment"] for p in published if p["type"] == "final"] == [0, 1, 2]
    assert [p["segments"] for p in published if p["type"] == "done"] == [2, 3]
    seqs = [p["seq"] for p in published]
    assert seqs == sorted(set(seqs))
    assert [e["segment"] for e in other if e["type"] == "final"] == [7]
    assert other[-1]["segments"] == 8
    assert all(e["start"] >= 50.0 for e in other if e["type"] == "final")


def cut_samples(whole: list[dict]) -> int:
    """0.2 s after the 2nd final's end, on the VAD's 30 ms frame grid (so that the resumed
    connection cuts the same frames as the whole stream did)."""
    ends = [e["end"] for e in whole if e["type"] == "final"]
    frame = RATE * 30 // 1000
    return round((ends[1] + 0.2) * RATE / frame) * frame


def test_resume_of_an_open_session_is_refused(shared_audio_dir: Path) -> None:
    with running_daemon(test_config()) as d:
        url = f"ws://127.0.0.1:{d.server.port}/v1/stream"
        with connect(url) as first:
            first.send(start_msg(session="busy"))
            assert recv_event(first)["type"] == "ready"
            with connect(url) as second:
                second.send(start_msg(resume={"session": "busy", "offset": 0.0,
                                              "segment": 0}))
                error = recv_event(second)
                assert error["code"] == "bad_request" and "already open" in error["message"]
            first.send(s16(np.zeros(RATE, np.float32)))
            first.send(json.dumps({"type": "stop"}))
            assert recv_event(first)["type"] == "done"
