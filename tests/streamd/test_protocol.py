"""Wire contract: parsing client messages, decoding audio, event shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamd import protocol
from streamd.errors import BadRequest, Unsupported
from streamd.protocol import Start, Stop, decode_audio, parse_control


def start(**fields) -> str:
    return json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le",
                       "channels": 1, **fields})


def test_parse_start_and_stop() -> None:
    msg = parse_control(start(session="kitchen-1", pipeline="whisper", partials=False))
    assert msg == Start(16000, "pcm_s16le", 1, "kitchen-1", "whisper", False)
    auto = parse_control(json.dumps({"type": "start", "sample_rate": 8000}))
    assert auto.encoding == "pcm_s16le" and auto.channels == 1 and auto.partials
    assert protocol.valid_session_id(auto.session)
    assert parse_control(json.dumps({"type": "stop"})) == Stop()
    assert parse_control(start(encoding="pcm_f32le", channels=2)).frame_bytes == 8


def test_parse_context_and_prompt() -> None:
    """`context` and `prompt` are optional: absent, the daemon's default and no prompt."""
    auto = parse_control(start())
    assert auto.context is None and auto.prompt == ""
    msg = parse_control(start(context=False, prompt="  Kennedy,\n Fellow  Americans "))
    assert msg.context is False and msg.prompt == "Kennedy, Fellow Americans"
    assert parse_control(start(context=True, prompt="x" * 500)).context is True


@pytest.mark.parametrize("text,error,match", [
    ("{oops", BadRequest, "not JSON"),
    ("[1, 2]", BadRequest, "object"),
    (json.dumps({"type": "pause"}), BadRequest, "unknown message type"),
    (json.dumps({"sample_rate": 16000}), BadRequest, "unknown message type"),
    (start(sample_rate="16000"), BadRequest, "sample_rate"),
    (start(sample_rate=True), BadRequest, "sample_rate"),
    (start(channels=1.5), BadRequest, "channels"),
    (start(session="x" * 65), BadRequest, "session"),
    (start(session="a/b"), BadRequest, "session"),
    (start(partials="yes"), BadRequest, "partials"),
    (start(pipeline=3), BadRequest, "pipeline"),
    (start(context="yes"), BadRequest, "context"),
    (start(prompt=3), BadRequest, "prompt"),
    (start(prompt="x" * 501), BadRequest, "500"),
    (start(prompt="names\x00"), BadRequest, "prompt"),
    (start(encoding="opus"), Unsupported, "opus"),
    (start(sample_rate=7999), Unsupported, "7999"),
    (start(sample_rate=48001), Unsupported, "48001"),
    (start(channels=0), Unsupported, "channels"),
])
def test_parse_errors(text: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        parse_control(text)
    assert info.value.code in ("bad_request", "unsupported")


def test_decode_s16_f32_and_mixdown() -> None:
    s16 = Start(16000, "pcm_s16le", 1, "s")
    pcm = np.array([0, 16384, -32768, 32767], "<i2")
    np.testing.assert_allclose(decode_audio(pcm.tobytes(), s16), [0, 0.5, -1, 32767 / 32768])
    stereo = Start(16000, "pcm_f32le", 2, "s")
    frames = np.array([[0.5, -0.5], [1.0, 0.0], [0.2, 0.4]], "<f4")
    np.testing.assert_allclose(decode_audio(frames.tobytes(), stereo), [0, 0.5, 0.3], atol=1e-7)
    out = decode_audio(np.array([3.0, -3.0], "<f4").tobytes(), Start(16000, "pcm_f32le", 1, "s"))
    np.testing.assert_array_equal(out, [1.0, -1.0])  # clipped to full scale
    assert decode_audio(b"", s16).shape == (0,)


def test_decode_rejects_partial_frames_and_non_finite() -> None:
    with pytest.raises(BadRequest, match="multiple of 2"):
        decode_audio(b"\0\0\0", Start(16000, "pcm_s16le", 1, "s"))
    with pytest.raises(BadRequest, match="multiple of 4"):
        decode_audio(b"\0\0\0\0\0\0", Start(16000, "pcm_s16le", 2, "s"))
    f32 = Start(16000, "pcm_f32le", 1, "s")
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(BadRequest, match="NaN or infinite"):
            decode_audio(np.array([0.0, bad], "<f4").tobytes(), f32)


def test_event_shapes() -> None:
    assert protocol.ready_event("s", "whisper") == {
        "type": "ready", "session": "s", "pipeline": "whisper", "sample_rate": 16000,
        "protocol": 1}
    assert protocol.speech_start_event("s", 0, 1.23449) == {
        "type": "speech_start", "session": "s", "segment": 0, "start": 1.234}
    p = protocol.partial_event("s", 2, 1.0, 2.0, "hi", stable="h")
    assert p == {"type": "partial", "session": "s", "segment": 2, "start": 1.0, "end": 2.0,
                 "text": "hi", "stable": "h"}
    assert "stable" not in protocol.partial_event("s", 2, 1.0, 2.0, "hi")
    words = [{"word": "hi", "start": 1.0, "end": 1.5, "confidence": 0.9}]
    f = protocol.final_event("s", 2, 1.0, 2.0, "hi", words)
    assert f["words"] == words and f["type"] == "final"
    assert "words" not in protocol.final_event("s", 2, 1.0, 2.0, "hi")
    e = protocol.error_event("bad_request", "nope")
    assert e == {"type": "error", "code": "bad_request", "message": "nope"}
    assert protocol.done_event("s", 3) == {"type": "done", "session": "s", "segments": 3}
    assert json.loads(protocol.encode_event(f)) == f
    assert protocol.encode_event({"text": "é"}) == '{"text":"é"}'


def test_parse_resume() -> None:
    msg = parse_control(start(resume={"session": "s-1", "offset": 12.5}))
    assert msg.session == "s-1" and msg.resume == protocol.Resume(12.5, None)
    both = parse_control(start(session="s-1", resume={"session": "s-1", "offset": 0,
                                                      "segment": 4}))
    assert both.resume == protocol.Resume(0.0, 4)
    assert parse_control(start()).resume is None
    for bad, match in [
        ("yes", "resume must be an object"),
        ({"offset": 1.0}, "resume.session"),
        ({"session": "a/b", "offset": 1.0}, "resume.session"),
        ({"session": "s", "offset": -1}, "offset"),
        ({"session": "s", "offset": "1"}, "offset"),
        ({"session": "s", "offset": True}, "offset"),
        ({"session": "s", "offset": 1, "segment": -1}, "segment"),
        ({"session": "s", "offset": 1, "segment": 1.0}, "segment"),
    ]:
        with pytest.raises(BadRequest, match=match):
            parse_control(start(resume=bad))
    with pytest.raises(BadRequest, match="differ"):
        parse_control(start(session="t", resume={"session": "s", "offset": 1}))
    nan = '{"type": "start", "sample_rate": 16000, "resume": {"session": "s", "offset": NaN}}'
    with pytest.raises(BadRequest, match="offset"):
        parse_control(nan)
    assert protocol.utterance_end_event("s", 1, 2.34567) == {
        "type": "utterance_end", "session": "s", "segment": 1, "last_speech_end": 2.346}
    assert protocol.finalized_event("s", 2) == {"type": "finalized", "session": "s",
                                                "segments": 2}


def test_keepalive_finalize_and_session_timing_fields() -> None:
    assert parse_control(json.dumps({"type": "keepalive"})) == protocol.Keepalive()
    assert parse_control(json.dumps({"type": "finalize", "extra": 1})) == protocol.Finalize()
    msg = parse_control(start(endpoint_ms=800, utterance_end_ms=1200))
    assert (msg.endpoint_ms, msg.utterance_end_ms) == (800, 1200)
    plain = parse_control(start())
    assert plain.endpoint_ms is None and plain.utterance_end_ms is None
    edges = parse_control(start(endpoint_ms=100, utterance_end_ms=30000))
    assert (edges.endpoint_ms, edges.utterance_end_ms) == (100, 30000)


@pytest.mark.parametrize("field,value", [
    ("endpoint_ms", 99), ("endpoint_ms", 10001), ("endpoint_ms", 500.0), ("endpoint_ms", "500"),
    ("endpoint_ms", True), ("utterance_end_ms", 499), ("utterance_end_ms", 30001),
    ("utterance_end_ms", [1000]),
])
def test_timing_fields_out_of_bounds_are_bad_requests(field: str, value: object) -> None:
    with pytest.raises(BadRequest, match=f"start.{field} must be an integer") as info:
        parse_control(start(**{field: value}))
    assert info.value.code == "bad_request"


@pytest.mark.parametrize("text", [
    '{"type": "start", "sample_rate": ' + "9" * 5000 + "}",  # int over 4300 digits
    "[" * 5000 + "]" * 5000,  # nesting past the recursion limit
])
def test_oversized_json_is_bad_request(text: str) -> None:
    """Regression (found by tests/streamd/test_fuzz.py): ValueError / RecursionError from
    json.loads escaped as an internal error (close 1011)."""
    with pytest.raises(BadRequest, match="not JSON"):
        parse_control(text)
