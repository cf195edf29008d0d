"""The Deepgram live-streaming dialect (`GET /v1/listen`), mapped onto streamd sessions.

Pure functions and one small stateful translator; no I/O. The server routes a
`/v1/listen` connection to the same `_Connection` as `/v1/stream`: the query string
becomes the session's `protocol.Start` (`parse_query`), Deepgram's JSON control messages
become `protocol` controls (`parse_control`), and each native event becomes zero or more
Deepgram messages on the wire (`Translator`). Publishers (MQTT) and metrics see the
native events, exactly as for `/v1/stream`. See docs/deepgram.md.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from streamd import protocol
from streamd.errors import BadRequest, Unsupported

LISTEN_PATH = "/v1/listen"
ENCODINGS = {"linear16": "pcm_s16le"}  # Deepgram name -> streamd encoding
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_WORD_STRIP = re.compile(r"^[^\w']+|[^\w']+$")


@dataclass(frozen=True)
class ListenParams:
    """What a `/v1/listen` query asks for; unknown parameters are ignored."""

    sample_rate: int
    channels: int = 1
    interim_results: bool = False  # Deepgram's default
    endpoint_ms: int | None = None  # None: the daemon's vad.endpoint_silence_ms
    speech_final: bool = True  # False with endpointing=false
    utterance_end_ms: int | None = None
    vad_events: bool = False

    def start(self, session: str) -> protocol.Start:
        return protocol.Start(
            sample_rate=self.sample_rate, encoding="pcm_s16le", channels=self.channels,
            session=session, partials=self.interim_results, endpoint_ms=self.endpoint_ms,
            utterance_end_ms=self.utterance_end_ms)


def _one(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[-1].strip() if values else None


def _bool(query: dict[str, list[str]], key: str, default: bool) -> bool:
    value = _one(query, key)
    if value is None or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequest(f"{key}={value!r}: expected true or false")


def _int(query: dict[str, list[str]], key: str) -> int | None:
    value = _one(query, key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{key}={value!r}: expected an integer") from None


def parse_query(query: str) -> ListenParams:
    """A `/v1/listen` query string -> ListenParams.

    Raises BadRequest (malformed value) or Unsupported (an encoding, rate or channel
    count streamd does not take). Unknown parameters (and `model`, `punctuate`,
    `smart_format`, `language`, ...) are accepted and ignored, as Deepgram does.
    """
    q = parse_qs(query, keep_blank_values=True)
    encoding = _one(q, "encoding")
    if encoding is None:
        raise Unsupported("encoding is required: encoding=linear16 (raw 16-bit PCM; "
                          "containerized audio is not supported)")
    if encoding.lower() not in ENCODINGS:
        raise Unsupported(f"encoding={encoding!r} not supported; use encoding=linear16")
    rate = _int(q, "sample_rate")
    if rate is None:
        raise Unsupported("sample_rate is required with encoding=linear16")
    if not protocol.MIN_RATE <= rate <= protocol.MAX_RATE:
        raise Unsupported(f"sample_rate={rate} outside {protocol.MIN_RATE}..{protocol.MAX_RATE}")
    channels = _int(q, "channels")
    channels = 1 if channels is None else channels
    if not 1 <= channels <= protocol.MAX_CHANNELS:
        raise Unsupported(f"channels={channels} outside 1..{protocol.MAX_CHANNELS}")
    if _bool(q, "multichannel", False):
        raise Unsupported("multichannel=true is not supported: channels are mixed to mono")
    endpoint_ms, speech_final = None, True
    endpointing = _one(q, "endpointing")
    if endpointing is not None and endpointing.lower() in _FALSE:
        speech_final = False  # segments still end at the daemon's endpoint
    elif endpointing is not None and endpointing.lower() not in _TRUE:
        ms = _int(q, "endpointing")
        assert ms is not None
        if ms < 0:
            raise BadRequest(f"endpointing={ms}: expected milliseconds >= 0 or false")
        lo, hi = protocol.ENDPOINT_MS
        endpoint_ms = min(max(ms, lo), hi)
    utterance_end_ms = _int(q, "utterance_end_ms")
    if utterance_end_ms is not None:
        lo, hi = protocol.UTTERANCE_END_MS
        if not lo <= utterance_end_ms <= hi:
            raise BadRequest(f"utterance_end_ms={utterance_end_ms} outside {lo}..{hi}")
    for key in ("punctuate", "smart_format"):  # accepted; Whisper's text is punctuated
        _bool(q, key, False)
    return ListenParams(rate, channels, _bool(q, "interim_results", False), endpoint_ms,
                        speech_final, utterance_end_ms, _bool(q, "vad_events", False))


def new_request_id() -> str:
    """A request id that is also a valid session id (a UUID, as Deepgram's)."""
    return str(uuid.uuid4())


def parse_control(text: str) -> protocol.Keepalive | protocol.Finalize | protocol.Stop:
    """`KeepAlive`, `Finalize`, `CloseStream` -> the session's controls. Raises BadRequest."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest("control message is not JSON") from None
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind == "KeepAlive":
        return protocol.Keepalive()
    if kind == "Finalize":
        return protocol.Finalize()
    if kind == "CloseStream":
        return protocol.Stop()
    raise BadRequest(f"unknown message type {kind!r}; expected 'KeepAlive', 'Finalize' or "
                     "'CloseStream'")


def approximate_words(text: str, start: float, end: float) -> list[dict[str, Any]]:
    """Words of `text` over [start, end], each given time in proportion to its length in
    characters: for results without word times (Whisper partials, and finals unless
    `recognition.word_timestamps` is on), so these are approximate."""
    tokens = text.split()
    total = sum(len(t) for t in tokens)
    words, t = [], start
    for token in tokens:
        t1 = t + (end - start) * len(token) / total
        words.append({"word": token, "start": t, "end": t1, "confidence": 1.0})
        t = t1
    return words


def _word(w: dict[str, Any]) -> dict[str, Any]:
    text = str(w["word"])
    return {"word": _WORD_STRIP.sub("", text).lower() or text.lower(),
            "start": round(float(w["start"]), 3), "end": round(float(w["end"]), 3),
            "confidence": round(float(w.get("confidence", 1.0)), 4), "punctuated_word": text}


class Translator:
    """Native session events -> Deepgram messages for one `/v1/listen` connection."""

    def __init__(self, params: ListenParams, request_id: str, pipeline: str) -> None:
        self.params = params
        self.request_id = request_id
        self.model_info = {"name": pipeline, "version": "", "arch": "streamd"}
        self._finalizing: set[float] = set()  # segment starts (s) ended by a Finalize
        self._answered = False  # a from_finalize Results went out since the last Finalize
        self._last_end = 0.0  # end of the last Results, for an empty from_finalize answer
        self.created = datetime.now(UTC).isoformat(timespec="milliseconds")

    def finalize_requested(self, segment_starts: list[float]) -> None:
        """A Finalize ends the segments that start at these times (at most one)."""
        self._finalizing.update(round(s, 3) for s in segment_starts)
        self._answered = False

    def translate(self, event: dict[str, Any], audio_s: float = 0.0) -> list[dict[str, Any]]:
        kind = event["type"]
        if kind == "partial":
            return [self._results(event, final=False)]
        if kind == "final":
            return [self._results(event, final=True)]
        if kind == "speech_start":
            if not self.params.vad_events:
                return []
            return [{"type": "SpeechStarted", "channel": [0, 1], "timestamp": event["start"]}]
        if kind == "utterance_end":
            return [{"type": "UtteranceEnd", "channel": [0, 1],
                     "last_word_end": event["last_speech_end"]}]
        if kind == "finalized":
            if self._answered:
                return []
            self._answered = True  # nothing was in flight: an empty from_finalize answer
            return [self._results({"start": self._last_end, "end": self._last_end, "text": ""},
                                  final=True, from_finalize=True)]
        if kind == "done":
            return [self.metadata(audio_s)]
        if kind == "error":
            return [{"type": "Error", "variant": event["code"],
                     "description": event["message"], "message": event["message"]}]
        return []  # ready: Deepgram sends nothing on open

    def metadata(self, audio_s: float) -> dict[str, Any]:
        name = self.model_info["name"]
        return {"type": "Metadata", "transaction_key": "deprecated",
                "request_id": self.request_id, "sha256": "", "created": self.created,
                "duration": round(audio_s, 3), "channels": self.params.channels,
                "models": [name], "model_info": {name: self.model_info}}

    def _results(self, event: dict[str, Any], final: bool,
                 from_finalize: bool | None = None) -> dict[str, Any]:
        start, end, text = float(event["start"]), float(event["end"]), event["text"]
        if from_finalize is None and final:
            from_finalize = round(start, 3) in self._finalizing
            if from_finalize:
                self._finalizing.discard(round(start, 3))
                self._answered = True
        words = event.get("words") or approximate_words(text, start, end)
        words = [_word(w) for w in words]
        confidence = (sum(w["confidence"] for w in words) / len(words)) if words else 1.0
        self._last_end = max(self._last_end, end)
        message: dict[str, Any] = {
            "type": "Results", "channel_index": [0, 1],
            "duration": round(end - start, 3), "start": round(start, 3),
            "is_final": final,
            "speech_final": bool(final and self.params.speech_final and not from_finalize),
            "channel": {"alternatives": [{"transcript": text,
                                          "confidence": round(confidence, 4),
                                          "words": words}]},
            "metadata": {"request_id": self.request_id, "model_info": self.model_info,
                         "model_uuid": ""},
        }
        if final:
            message["from_finalize"] = bool(from_finalize)
        return message


def error_body(message: str, request_id: str) -> dict[str, Any]:
    """The HTTP 400 body of a refused `/v1/listen` request (Deepgram's REST error shape)."""
    return {"err_code": "Bad Request", "err_msg": message, "request_id": request_id}
