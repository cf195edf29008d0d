"""The wire contract (protocol version 1): parsing client messages, building events.

Pure functions and small dataclasses; no I/O. See docs/protocol.md.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamd.errors import BadRequest, Unsupported

PROTOCOL_VERSION = 1
TARGET_RATE = 16000
ENCODINGS: dict[str, np.dtype] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
MIN_RATE, MAX_RATE = 8000, 48000
MAX_CHANNELS = 8
_SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Bounds of the per-session timing fields of `start` (milliseconds, inclusive).
ENDPOINT_MS = (100, 10000)
UTTERANCE_END_MS = (500, 30000)
# `start.prompt`: Whisper's initial prompt (names, jargon); its tokens are capped again by
# the pipeline (half of recognition.context_tokens).
MAX_PROMPT_CHARS = 500


@dataclass(frozen=True)
class Resume:
    """`start.resume`: the stream goes on from `offset` seconds of its audio (the first
    sample sent now is at that time); `segment`: the next segment number (default: what
    this daemon remembers of the session)."""

    offset: float
    segment: int | None = None


@dataclass(frozen=True)
class Start:
    sample_rate: int
    encoding: str
    channels: int
    session: str
    pipeline: str | None = None
    partials: bool = True
    resume: Resume | None = None
    endpoint_ms: int | None = None  # None: the daemon's vad.endpoint_silence_ms
    utterance_end_ms: int | None = None  # None: no utterance_end events
    context: bool | None = None  # None: the daemon's recognition.context
    prompt: str = ""

    @property
    def frame_bytes(self) -> int:
        """Bytes of one interleaved sample frame (all channels)."""
        return ENCODINGS[self.encoding].itemsize * self.channels


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Keepalive:
    """Nothing to do: keeps quiet connections open through proxies; no reply."""


@dataclass(frozen=True)
class Finalize:
    """End the segment in flight now: its final comes, then `finalized`."""


CONTROL_TYPES = ("start", "stop", "keepalive", "finalize")


def new_session_id() -> str:
    return uuid.uuid4().hex[:12]


def valid_session_id(value: object) -> bool:
    return isinstance(value, str) and _SESSION_RE.match(value) is not None


def _int_field(msg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = msg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"start.{key} must be an integer")
    return value


def _ms_field(msg: dict[str, Any], key: str, bounds: tuple[int, int]) -> int | None:
    value = msg.get(key)
    if value is None:
        return None
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"start.{key} must be an integer {lo}..{hi} (milliseconds)")
    return value


def parse_control(text: str) -> Start | Stop | Keepalive | Finalize:
    """Parse one client text message.

    Raises BadRequest (not JSON, not an object, unknown type, bad field) or
    Unsupported (encoding, rate, channel count outside what the daemon offers).
    """
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"control message is not JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise BadRequest(f"control message is not JSON: {exc.reason}") from None
    except (ValueError, RecursionError):  # an integer over 4300 digits; nesting too deep
        raise BadRequest("control message is not JSON: a number too long or nesting too deep"
                         ) from None
    if not isinstance(msg, dict):
        raise BadRequest("control message must be a JSON object")
    kind = msg.get("type")
    if kind == "stop":
        return Stop()
    if kind == "keepalive":
        return Keepalive()
    if kind == "finalize":
        return Finalize()
    if kind != "start":
        expected = ", ".join(repr(t) for t in CONTROL_TYPES)
        raise BadRequest(f"unknown message type {kind!r}; expected one of {expected}")
    rate = _int_field(msg, "sample_rate")
    channels = _int_field(msg, "channels", 1)
    encoding = msg.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str):
        raise BadRequest("start.encoding must be a string")
    if encoding not in ENCODINGS:
        raise Unsupported(f"encoding {encoding!r} not supported; use {', '.join(ENCODINGS)}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise Unsupported(f"sample_rate {rate} outside {MIN_RATE}..{MAX_RATE}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise Unsupported(f"channels {channels} outside 1..{MAX_CHANNELS}")
    session = msg.get("session")
    if session is None:
        session = new_session_id()
    elif not valid_session_id(session):
        raise BadRequest("start.session: letters, digits, '-', '_', at most 64")
    pipeline = msg.get("pipeline")
    if pipeline is not None and not isinstance(pipeline, str):
        raise BadRequest("start.pipeline must be a string")
    partials = msg.get("partials", True)
    if not isinstance(partials, bool):
        raise BadRequest("start.partials must be true or false")
    resume = None
    if msg.get("resume") is not None:
        session, resume = _parse_resume(msg["resume"], msg.get("session"))
    context = msg.get("context")
    if context is not None and not isinstance(context, bool):
        raise BadRequest("start.context must be true or false")
    return Start(rate, encoding, channels, session, pipeline, partials, resume,
                 endpoint_ms=_ms_field(msg, "endpoint_ms", ENDPOINT_MS),
                 utterance_end_ms=_ms_field(msg, "utterance_end_ms", UTTERANCE_END_MS),
                 context=context, prompt=_parse_prompt(msg.get("prompt", "")))


def _parse_prompt(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("start.prompt must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadRequest(f"start.prompt is over {MAX_PROMPT_CHARS} characters")
    if any(not c.isprintable() and not c.isspace() for c in value):
        raise BadRequest("start.prompt must be printable text")
    return " ".join(value.split())


def _parse_resume(value: object, session: object) -> tuple[str, Resume]:
    if not isinstance(value, dict):
        raise BadRequest("start.resume must be an object {session, offset[, segment]}")
    rid = value.get("session")
    if not valid_session_id(rid):
        raise BadRequest("start.resume.session: letters, digits, '-', '_', at most 64")
    if session is not None and session != rid:
        raise BadRequest("start.session and start.resume.session differ")
    offset = value.get("offset")
    if (isinstance(offset, bool) or not isinstance(offset, (int, float))
            or not 0 <= offset < float("inf")):
        raise BadRequest("start.resume.offset must be a number of seconds >= 0")
    segment = value.get("segment")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int)
                                or segment < 0):
        raise BadRequest("start.resume.segment must be an integer >= 0")
    assert isinstance(rid, str)
    return rid, Resume(float(offset), segment)


def decode_audio(data: bytes, start: Start) -> np.ndarray:
    """Binary frame -> mono float32 samples in [-1, 1] at the client's rate. Shape [N].

    Raises BadRequest for a byte count that is not whole sample frames, or NaN/inf.
    """
    if len(data) % start.frame_bytes:
        raise BadRequest(
            f"audio frame of {len(data)} bytes is not a multiple of {start.frame_bytes} "
            f"({start.encoding}, {start.channels} channel(s))"
        )
    samples = np.frombuffer(data, dtype=ENCODINGS[start.encoding])
    if start.encoding == "pcm_s16le":
        audio = samples.astype(np.float32) / 32768.0
    else:
        audio = samples.astype(np.float32)
        if not np.isfinite(audio).all():
            raise BadRequest("audio contains NaN or infinite samples")
    if start.channels > 1:
        audio = audio.reshape(-1, start.channels).mean(axis=1)
    return np.clip(audio, -1.0, 1.0)


# Server -> client events. Plain dicts: they go to JSON and MQTT unchanged.


def _t(seconds: float) -> float:
    return round(float(seconds), 3)


def ready_event(session: str, pipeline: str) -> dict[str, Any]:
    return {"type": "ready", "session": session, "pipeline": pipeline,
            "sample_rate": TARGET_RATE, "protocol": PROTOCOL_VERSION}


def speech_start_event(session: str, segment: int, start: float) -> dict[str, Any]:
    return {"type": "speech_start", "session": session, "segment": segment, "start": _t(start)}


def partial_event(
    session: str, segment: int, start: float, end: float, text: str, stable: str | None = None
) -> dict[str, Any]:
    event = {"type": "partial", "session": session, "segment": segment,
             "start": _t(start), "end": _t(end), "text": text}
    if stable is not None:
        event["stable"] = stable
    return event


def final_event(
    session: str, segment: int, start: float, end: float, text: str,
    words: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    event = {"type": "final", "session": session, "segment": segment,
             "start": _t(start), "end": _t(end), "text": text}
    if words:
        event["words"] = words
    return event


def utterance_end_event(session: str, segment: int, last_speech_end: float) -> dict[str, Any]:
    return {"type": "utterance_end", "session": session, "segment": segment,
            "last_speech_end": _t(last_speech_end)}


def finalized_event(session: str, segments: int) -> dict[str, Any]:
    return {"type": "finalized", "session": session, "segments": segments}


def error_event(code: str, message: str, session: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if session is not None:
        event["session"] = session
    return event


def done_event(session: str, segments: int) -> dict[str, Any]:
    return {"type": "done", "session": session, "segments": segments}


def encode_event(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
