"""The Deepgram dialect (`/v1/listen`): the real `deepgram-sdk` client against a real
`streamd serve` subprocess on the fast test pipeline (text = the segment's duration),
plus the pure query parsing and message translation of streamd/deepgram.py.

The end-to-end comparison with `/v1/stream` on the real tiny.en is in
tests/e2e/test_deepgram_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from deepgram.clients.listen.v1.websocket.response import (
    LiveResultResponse,
    MetadataResponse,
    SpeechStartedResponse,
    UtteranceEndResponse,
)
from helpers.daemon import Daemon, serve, speech_audio, test_pipeline_env
from helpers.deepgram_sdk import Listener
from helpers.mosquitto import Mosquitto, Subscriber
from test_server import running_daemon, test_config
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from streamd import deepgram, protocol
from streamd.errors import BadRequest, Unsupported

TOKEN = "dg-s3cret"
RATE = 16000


# --- the pure part -----------------------------------------------------------------


def test_parse_query_maps_deepgram_options() -> None:
    p = deepgram.parse_query("encoding=linear16&sample_rate=8000&channels=2&interim_results=true"
                             "&endpointing=300&utterance_end_ms=1000&vad_events=true"
                             "&punctuate=true&smart_format=true&model=nova-2&tier=x&foo=bar")
    assert p == deepgram.ListenParams(8000, 2, True, 300, True, 1000, True)
    start = p.start("abc")
    assert (start.encoding, start.partials, start.endpoint_ms, start.utterance_end_ms) == (
        "pcm_s16le", True, 300, 1000)
    # Deepgram's defaults: no interim results; endpointing clamped into streamd's bounds.
    p = deepgram.parse_query("encoding=linear16&sample_rate=16000&endpointing=10")
    assert (p.interim_results, p.endpoint_ms, p.speech_final, p.vad_events) == (
        False, protocol.ENDPOINT_MS[0], True, False)
    p = deepgram.parse_query("encoding=linear16&sample_rate=16000&endpointing=false")
    assert (p.endpoint_ms, p.speech_final) == (None, False)


@pytest.mark.parametrize(("query", "error", "needle"), [
    ("sample_rate=16000", Unsupported, "encoding is required"),
    ("encoding=mulaw&sample_rate=16000", Unsupported, "encoding='mulaw' not supported"),
    ("encoding=linear16", Unsupported, "sample_rate is required"),
    ("encoding=linear16&sample_rate=96000", Unsupported, "sample_rate=96000 outside"),
    ("encoding=linear16&sample_rate=16000&channels=9", Unsupported, "channels=9"),
    ("encoding=linear16&sample_rate=16000&channels=0", Unsupported, "channels=0"),
    ("encoding=linear16&sample_rate=16000&multichannel=true", Unsupported, "multichannel"),
    ("encoding=linear16&sample_rate=abc", BadRequest, "expected an integer"),
    ("encoding=linear16&sample_rate=16000&interim_results=maybe", BadRequest, "true or false"),
    ("encoding=linear16&sample_rate=16000&utterance_end_ms=100", BadRequest, "utterance_end_ms"),
    ("encoding=linear16&sample_rate=16000&endpointing=-5", BadRequest, "endpointing"),
])
def test_parse_query_refuses(query: str, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        deepgram.parse_query(query)


def test_parse_control() -> None:
    assert deepgram.parse_control('{"type": "KeepAlive"}') == protocol.Keepalive()
    assert deepgram.parse_control('{"type": "Finalize"}') == protocol.Finalize()
    assert deepgram.parse_control('{"type": "CloseStream"}') == protocol.Stop()
    for bad in ('{"type": "stop"}', "[]", "not json"):
        with pytest.raises(BadRequest):
            deepgram.parse_control(bad)


def test_approximate_words_spread_by_length() -> None:
    words = deepgram.approximate_words("ask not, what", 1.0, 3.4)
    assert [w["word"] for w in words] == ["ask", "not,", "what"]
    assert words[0]["start"] == 1.0 and words[-1]["end"] == pytest.approx(3.4)
    assert words[0]["end"] - words[0]["start"] == pytest.approx(2.4 * 3 / 11)
    assert all(a["end"] == b["start"] for a, b in zip(words, words[1:], strict=False))


def test_translator_messages_parse_in_the_sdk() -> None:
    params = deepgram.parse_query("encoding=linear16&sample_rate=16000&vad_events=true")
    tr = deepgram.Translator(params, "req-1", "whisper")
    final = protocol.final_event("req-1", 0, 0.5, 2.5, "Ask not, what.")
    (msg,) = tr.translate(final)
    res = LiveResultResponse.from_json(json.dumps(msg))
    alt = res.channel.alternatives[0]
    assert (res.is_final, res.speech_final, res.from_finalize) == (True, True, False)
    assert (res.start, res.duration, alt.transcript) == (0.5, 2.0, "Ask not, what.")
    assert [(w.word, w.punctuated_word) for w in alt.words] == [
        ("ask", "Ask"), ("not", "not,"), ("what", "what.")]
    assert res.metadata.request_id == "req-1" and res.channel_index == [0, 1]
    (ss,) = tr.translate(protocol.speech_start_event("req-1", 0, 0.48))
    assert SpeechStartedResponse.from_json(json.dumps(ss)).timestamp == 0.48
    (ue,) = tr.translate(protocol.utterance_end_event("req-1", 0, 2.1))
    assert UtteranceEndResponse.from_json(json.dumps(ue)).last_word_end == 2.1
    (md,) = tr.translate(protocol.done_event("req-1", 1), audio_s=3.25)
    meta = MetadataResponse.from_json(json.dumps(md))
    assert (meta.request_id, meta.duration, meta.channels) == ("req-1", 3.25, 1)
    assert tr.translate(protocol.ready_event("req-1", "whisper")) == []
    # Words with times and confidence (CTC finals) are kept; confidence is their mean.
    ctc = protocol.final_event("req-1", 1, 3.0, 4.0, "HI YOU", [
        {"word": "HI", "start": 3.1, "end": 3.3, "confidence": 0.5},
        {"word": "YOU", "start": 3.4, "end": 3.8, "confidence": 1.0}])
    (msg,) = tr.translate(ctc)
    alt = msg["channel"]["alternatives"][0]
    assert alt["confidence"] == 0.75 and alt["words"][1] == {
        "word": "you", "start": 3.4, "end": 3.8, "confidence": 1.0, "punctuated_word": "YOU"}


def test_translator_from_finalize() -> None:
    params = deepgram.parse_query("encoding=linear16&sample_rate=16000")
    tr = deepgram.Translator(params, "r", "whisper")
    tr.finalize_requested([1.2345])
    (msg,) = tr.translate(protocol.final_event("r", 0, 1.2345, 2.0, "yes"))
    assert (msg["from_finalize"], msg["speech_final"], msg["is_final"]) == (True, False, True)
    assert tr.translate(protocol.finalized_event("r", 1)) == []  # already answered
    tr.finalize_requested([])  # nothing in flight: one empty from_finalize Results
    (msg,) = tr.translate(protocol.finalized_event("r", 1))
    assert msg["from_finalize"] and msg["channel"]["alternatives"][0]["transcript"] == ""
    assert msg["start"] == 2.0


# --- the SDK against a real daemon -------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    env = {**test_pipeline_env(), "STREAMD_SERVER_CONNECTION_RATE": "0",
           "STREAMD_SERVER_IDLE_TIMEOUT_S": "1.5"}
    with serve(tmp_path_factory.mktemp("deepgram"), "--token", TOKEN, env=env) as d:
        yield d


@pytest.fixture(scope="module")
def audio(shared_audio_dir: Path) -> np.ndarray:
    """Three utterances, each after 1 s of silence, then 1 s more: three segments."""
    return speech_audio(shared_audio_dir)


def test_sdk_streams_interim_and_final_results(daemon: Daemon, audio: np.ndarray) -> None:
    dg = Listener(daemon.port, TOKEN, interim_results=True, vad_events=True, utterance_end_ms=1000,
                  punctuate=True, smart_format=True, model="nova-2", unknown_option="x")
    assert dg.start()
    dg.send(audio)
    dg.close_stream()
    assert not dg.of("error"), dg.of("error")
    results = dg.of("result")
    finals = dg.finals()
    interims = [r for r in results if not r.is_final]
    assert len(finals) == 3 and interims
    request_id = finals[0].metadata.request_id
    for r in finals:
        alt = r.channel.alternatives[0]
        # The test pipeline's text is the duration of the segment's audio.
        assert float(alt.transcript) == pytest.approx(r.duration, abs=0.011)
        assert r.speech_final and r.from_finalize is False
        assert alt.words[0].start == r.start
        assert alt.words[-1].end == pytest.approx(r.start + r.duration, abs=0.002)
        assert r.metadata.request_id == request_id
    for r in interims:
        assert not r.speech_final and r.from_finalize is None
    # Per segment: SpeechStarted before its results; UtteranceEnd after its final.
    order = [k if k != "result" else ("final" if v.is_final else "interim")
             for k, v in dg.events if k in ("result", "speech_started", "utterance_end")]
    segments = " ".join(order).split("speech_started")[1:]
    assert len(segments) == 3
    for seg in segments:
        kinds = seg.split()
        assert kinds[-2:] == ["final", "utterance_end"] and "interim" in kinds
    starts = [s.timestamp for s in dg.of("speech_started")]
    assert starts == [r.start for r in finals]
    ends = [u.last_word_end for u in dg.of("utterance_end")]
    assert all(f.start < e <= f.start + f.duration for f, e in zip(finals, ends, strict=True))
    (meta,) = dg.of("metadata")
    assert meta.request_id == request_id
    assert meta.duration == pytest.approx(len(audio) / RATE, abs=0.01)
    assert meta.channels == 1
    assert dg.events[-1][0] in ("metadata", "close")


def test_sdk_defaults_no_interims_no_vad_events(daemon: Daemon, audio: np.ndarray) -> None:
    dg = Listener(daemon.port, TOKEN)
    assert dg.start()
    dg.send(audio[: RATE * 5], pace=0.002)
    dg.close_stream()
    assert dg.of("result") and all(r.is_final for r in dg.of("result"))
    assert not dg.of("speech_started") and not dg.of("utterance_end")


def test_sdk_finalize(daemon: Daemon, audio: np.ndarray) -> None:
    """Finalize ends the segment in flight: its final carries from_finalize; with nothing
    in flight the answer is an empty from_finalize final."""
    dg = Listener(daemon.port, TOKEN, interim_results=True)
    assert dg.start()
    dg.send(np.zeros(RATE // 2, np.float32))
    assert dg.conn.finalize()  # nothing heard yet
    dg.wait(lambda: dg.finals())
    (empty,) = dg.finals()
    assert empty.from_finalize and empty.channel.alternatives[0].transcript == ""
    speech = audio[RATE : RATE * 3]  # speech, no pause after it: the segment stays open
    dg.send(speech)
    dg.wait(lambda: [r for r in dg.of("result") if not r.is_final])
    assert len(dg.finals()) == 1
    assert dg.conn.finalize()
    dg.wait(lambda: len(dg.finals()) == 2)
    final = dg.finals()[1]
    assert final.from_finalize is True and not final.speech_final
    assert float(final.channel.alternatives[0].transcript) == pytest.approx(final.duration,
                                                                            abs=0.011)
    dg.close_stream()
    assert len(dg.finals()) == 2 and not dg.of("error")


def test_sdk_keepalive_holds_an_idle_stream(daemon: Daemon, audio: np.ndarray) -> None:
    """The daemon ends connections silent for 1.5 s (idle_timeout_s); KeepAlive every
    0.5 s holds one for 3 s, and the session then goes on."""
    dg = Listener(daemon.port, TOKEN)
    assert dg.start()
    for _ in range(6):
        assert dg.conn.keep_alive()
        time.sleep(0.5)
    assert not dg.closed.is_set()
    dg.send(audio[: RATE * 5], pace=0.002)
    dg.close_stream()
    assert len(dg.finals()) == 1 and not dg.of("error")
    # Without it, the same wait ends the stream (as CloseStream would: Metadata, close).
    silent = Listener(daemon.port, TOKEN)
    assert silent.start()
    assert silent.closed.wait(10)
    silent.conn.finish()
    assert silent.of("metadata")


def test_bad_message_and_frame_get_error_and_stream_goes_on(daemon: Daemon,
                                                            audio: np.ndarray) -> None:
    dg = Listener(daemon.port, TOKEN)
    assert dg.start()
    dg.conn.send(json.dumps({"type": "Configure"}))
    dg.conn.send(b"\x00\x01\x02")  # not whole 16-bit samples
    dg.wait(lambda: len(dg.of("error")) == 2)
    unknown, odd = dg.of("error")
    assert "unknown message type 'Configure'" in unknown.description
    assert unknown.variant == "bad_request" and "multiple of 2" in odd.description
    dg.send(audio[: RATE * 5], pace=0.002)
    dg.close_stream()
    assert len(dg.finals()) == 1


def test_bad_query_refused_before_upgrade(daemon: Daemon) -> None:
    dg = Listener(daemon.port, TOKEN, encoding="mulaw")
    assert dg.start() is False  # the SDK reports the refused handshake
    base = f"ws://127.0.0.1:{daemon.port}/v1/listen"
    auth = {"Authorization": f"Token {TOKEN}"}
    for query, needle in [("encoding=opus&sample_rate=48000", "encoding='opus' not supported"),
                          ("sample_rate=16000", "encoding is required"),
                          ("encoding=linear16", "sample_rate is required"),
                          ("encoding=linear16&sample_rate=16000&endpointing=soon",
                           "endpointing='soon'")]:
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{base}?{query}", additional_headers=auth)
        response = refused.value.response
        assert response.status_code == 400
        body = json.loads(response.body)
        assert body["err_code"] == "Bad Request" and needle in body["err_msg"]
        assert needle in response.headers["dg-error"]


def test_token_auth(daemon: Daemon, audio: np.ndarray) -> None:
    wrong = Listener(daemon.port, "not-" + TOKEN)
    assert wrong.start() is False
    base = f"ws://127.0.0.1:{daemon.port}/v1/listen?encoding=linear16&sample_rate=16000"
    for headers in ({"Authorization": "Token nope"}, {}):
        with pytest.raises(InvalidStatus) as refused:
            connect(base, additional_headers=headers)
        assert refused.value.response.status_code == 401
    # The right token: as `Token` (the SDK), `Bearer` and `?token=` alike.
    for url, headers in ((base, {"Authorization": f"Bearer {TOKEN}"}),
                         (f"{base}&token={TOKEN}", {})):
        with connect(url, additional_headers=headers) as ws:
            ws.send(json.dumps({"type": "CloseStream"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "Metadata"
    right = Listener(daemon.port, TOKEN)
    assert right.start()
    right.send(audio[: RATE * 5], pace=0.002)
    right.close_stream()
    assert len(right.finals()) == 1


def test_same_sessions_mqtt_and_metrics(tmp_path: Path, audio: np.ndarray) -> None:
    """A /v1/listen session is a streamd session: its native speech_start, finals and done
    go to MQTT under its request_id, in order, the finals with the SDK's transcripts, and
    /metrics counts it."""
    with Mosquitto(tmp_path) as broker:
        cfg = test_config(mqtt={"host": broker.host, "port": broker.port})
        with running_daemon(cfg) as d:
            port = d.server.port

            async def main() -> tuple[Listener, list[dict]]:
                async with Subscriber(broker, [f"streamd/+/{kind}" for kind in
                                               ("speech_start", "final", "done")]) as sub:
                    dg = Listener(port, "any", interim_results=True)

                    def run() -> None:
                        assert dg.start()
                        dg.send(audio, pace=0.002)
                        dg.close_stream()

                    await asyncio.to_thread(run)
                    await sub.wait_for(lambda m: bool(sub.payloads("streamd/+/done")))
                return dg, sub.payloads("streamd/+/+")

            dg, published = asyncio.run(main())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
    finals = dg.finals()
    request_id = finals[0].metadata.request_id
    assert [m["session"] for m in published] == [request_id] * 7
    assert [m["type"] for m in published] == ["speech_start", "final"] * 3 + ["done"]
    assert published[-1]["segments"] == 3
    seqs = [m["seq"] for m in published]
    assert seqs == sorted(set(seqs))
    published = [m for m in published if m["type"] == "final"]
    assert [m["text"] for m in published] == [f.channel.alternatives[0].transcript
                                              for f in finals]
    assert [m["start"] for m in published] == [f.start for f in finals]
    assert 'streamd_sessions_total{source="websocket"} 1.0' in metrics
    assert "streamd_segments_total 3.0" in metrics
