"""`/v1/listen` on the real tiny.en: the `deepgram-sdk` client's finals for jfk.wav are
streamd's own `/v1/stream` finals for the same audio (one daemon, one engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import REPO, serve
from helpers.deepgram_sdk import RATE, Listener, s16
from helpers.text import normalize
from websockets.sync.client import connect

pytestmark = pytest.mark.e2e


def native_finals(port: int, audio: np.ndarray) -> list[dict]:
    chunk = RATE // 10
    with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le",
                            "partials": False}))
        for i in range(0, len(audio), chunk):
            ws.send(s16(audio[i : i + chunk]))
        ws.send(json.dumps({"type": "stop"}))
        events = []
        while not events or events[-1]["type"] != "done":
            events.append(json.loads(ws.recv(timeout=120)))
    return [e for e in events if e["type"] == "final"]


def test_sdk_finals_equal_stream_finals(tmp_path: Path) -> None:
    audio, rate = sf.read(REPO / "streamd" / "data" / "jfk.wav", dtype="float32")
    assert rate == RATE
    audio = np.concatenate([audio, np.zeros(RATE, np.float32)])
    with serve(tmp_path, startup_timeout=400) as daemon:
        ours = native_finals(daemon.port, audio)
        dg = Listener(daemon.port, "unused", interim_results=True, punctuate=True)
        assert dg.start()
        dg.send(audio, pace=0.02)
        dg.close_stream(timeout=120)
    assert ours and not dg.of("error")
    finals = dg.finals()
    theirs = " ".join(r.channel.alternatives[0].transcript for r in finals)
    native = " ".join(f["text"] for f in ours)
    assert normalize(theirs) == normalize(native)
    assert "ask not what your country can do for you" in normalize(theirs)
    assert [(r.start, round(r.start + r.duration, 3)) for r in finals] == [
        (f["start"], f["end"]) for f in ours]
    (meta,) = dg.of("metadata")
    assert meta.duration == pytest.approx(len(audio) / RATE, abs=0.01)
