"""`/v1/listen` on the real tiny.en, one daemon for the module: the `deepgram-sdk`
client's finals for jfk.wav are streamd's own `/v1/stream` finals for the same audio (one
daemon, one engine); LiveKit Agents' Deepgram STT plugin (`livekit-plugins-deepgram`),
pointed at streamd by `base_url`, transcribes it. The daemon times words
(`recognition.word_timestamps`): the finals' `words` and Deepgram's `words[]` come from
the cross-attention alignment, checked here through both wire formats."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import REPO, Daemon, serve
from helpers.deepgram_sdk import RATE, Listener, s16
from helpers.text import normalize
from websockets.sync.client import connect

pytestmark = pytest.mark.e2e

JFK_WORDS = "ask not what your country can do for you ask what you can do for your country"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serve(tmp_path_factory.mktemp("deepgram-e2e"), startup_timeout=400,
               env={"STREAMD_RECOGNITION_WORD_TIMESTAMPS": "true"}) as running:
        yield running


def jfk(pad_s: float = 1.0) -> np.ndarray:
    """The bundled recording, 16 kHz float32, then `pad_s` of silence."""
    audio, rate = sf.read(REPO / "streamd" / "data" / "jfk.wav", dtype="float32")
    assert rate == RATE
    return np.concatenate([audio, np.zeros(round(pad_s * RATE), np.float32)])


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


def test_sdk_finals_equal_stream_finals(daemon: Daemon) -> None:
    audio = jfk()
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
    # Word timings on the native finals: each final's words spell its text, in order,
    # inside the final's span; Deepgram's words[] carry the same times.
    for final, result in zip(ours, finals, strict=True):
        words = final["words"]
        assert normalize(" ".join(w["word"] for w in words)) == normalize(final["text"])
        starts = [w["start"] for w in words]
        assert starts == sorted(starts)
        assert all(final["start"] - 0.01 <= w["start"] <= w["end"] <= final["end"] + 0.01
                   and 0 < w["confidence"] <= 1 for w in words)
        dg_words = result.channel.alternatives[0].words
        assert [t for w in dg_words for t in (w.start, w.end)] == pytest.approx(
            [t for w in words for t in (w["start"], w["end"])], abs=0.002)
    (meta,) = dg.of("metadata")
    assert meta.duration == pytest.approx(len(audio) / RATE, abs=0.01)


async def livekit_events(port: int, audio: np.ndarray) -> list:
    """LiveKit Agents' Deepgram STT stream, without a LiveKit server or room: 100 ms
    frames pushed at 5x real time, then `end_input` (the plugin sends `Finalize` and
    `CloseStream`); every SpeechEvent until the stream ends."""
    import aiohttp
    from livekit import rtc
    from livekit.plugins import deepgram

    pcm = s16(audio)
    step = RATE // 10  # samples per frame
    async with aiohttp.ClientSession() as http:
        stt = deepgram.STT(base_url=f"http://127.0.0.1:{port}/v1/listen", api_key="unused",
                           http_session=http, sample_rate=RATE)
        stream = stt.stream()

        async def feed() -> None:
            for i in range(0, len(audio), step):
                chunk = pcm[2 * i : 2 * (i + step)]
                stream.push_frame(rtc.AudioFrame(chunk, RATE, 1, len(chunk) // 2))
                await asyncio.sleep(0.02)
            stream.end_input()

        feeding = asyncio.create_task(feed())
        events = [event async for event in stream]
        await feeding
        await stream.aclose()
    return events


def test_livekit_deepgram_plugin_transcribes(daemon: Daemon) -> None:
    from livekit.agents.stt import SpeechEventType as Kind

    events = asyncio.run(asyncio.wait_for(livekit_events(daemon.port, jfk()), 180))
    kinds = [e.type for e in events]
    finals = [e.alternatives[0] for e in events if e.type == Kind.FINAL_TRANSCRIPT]
    assert Kind.INTERIM_TRANSCRIPT in kinds and Kind.START_OF_SPEECH in kinds
    assert kinds.count(Kind.START_OF_SPEECH) == kinds.count(Kind.END_OF_SPEECH) >= 1
    assert JFK_WORDS in normalize(" ".join(f.text for f in finals))
    # Word times from streamd's finals, in order, inside the 12 s of audio.
    times = [(w.start_time, w.end_time) for f in finals for w in f.words or []]
    assert len(times) >= len(JFK_WORDS.split())
    assert all(0 <= a <= b <= 12.0 for a, b in times)
    assert [a for a, _ in times] == sorted(a for a, _ in times)
