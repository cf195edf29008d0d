"""OpenAI-compatible file transcription, `POST /v1/audio/transcriptions` (docs/openai.md).

Sans-I/O: the form's fields -> a checked `TranscriptionRequest`, the file's bytes -> 16 kHz
mono audio, Whisper's segments -> the body of each `response_format`, and OpenAI's error
shape. The HTTP side (aiohttp, on its own port) is streamd/http_server.py.

Rules where OpenAI's API names things streamd does not have:
- `model` is required (as by OpenAI) but any name selects the daemon's loaded Whisper
  (`whisper-1`, `tiny.en`, `gpt-4o-transcribe` alike); clients need not know its name.
- `language`: the transcriber decodes English, so only `en` (or none) is accepted.
- `temperature` is checked (0..1) and otherwise ignored: decoding starts greedy and falls
  back to higher temperatures by itself, as Whisper's own `transcribe` does.
- `prompt` is Whisper's initial prompt (names, jargon), at most MAX_PROMPT_CHARS.
- Fields streamd does not know (`chunking_strategy`, `include[]`) are ignored;
  `stream=true` is refused.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile

from models.whisper.decoding import compression_ratio
from streamd.audio import SAMPLE_RATE, resample, to_mono
from streamd.protocol import MAX_PROMPT_CHARS

if TYPE_CHECKING:
    from models.whisper.transcriber import Segment

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")
LANGUAGES = {"en": "english"}  # code -> the name verbose_json reports, as OpenAI
MIN_AUDIO_S = 0.1  # OpenAI's `audio_too_short`
FIELD_MAX_CHARS = 4096  # any form field but `file`


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP `status` and
    `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class TranscriptionRequest:
    """The checked form fields of one request (the file travels beside it)."""

    model: str
    response_format: str = "json"
    granularities: frozenset[str] = field(default_factory=lambda: frozenset({"segment"}))
    language: str = "en"
    prompt: str = ""
    temperature: float = 0.0

    @property
    def words(self) -> bool:
        """Word timings are computed only when asked for (they cost an alignment)."""
        return self.response_format == "verbose_json" and "word" in self.granularities


def parse_fields(fields: Mapping[str, Sequence[str]]) -> TranscriptionRequest:
    """Form field name -> its values (repeated fields: `timestamp_granularities[]`) ->
    the request; `ApiError` (400) naming the field that is wrong."""

    def one(name: str) -> str | None:
        values = fields.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ApiError(400, f"'{name}' was given {len(values)} times", name)
        return values[0].strip()

    model = one("model")
    if not model:
        raise ApiError(400, "you must provide a model parameter (any name selects the "
                            "loaded model, e.g. whisper-1)", "model", "missing_required_parameter")
    response_format = one("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"'{response_format}' is not one of {list(RESPONSE_FORMATS)} "
                            "- 'response_format'", "response_format", "invalid_value")
    granularities = [g.strip() for g in [*fields.get("timestamp_granularities[]", ()),
                                         *fields.get("timestamp_granularities", ())]]
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise ApiError(400, f"'{granularity}' is not one of {list(GRANULARITIES)} - "
                                "'timestamp_granularities[]'", "timestamp_granularities[]",
                           "invalid_value")
    if granularities and response_format != "verbose_json":
        raise ApiError(400, "timestamp_granularities needs response_format verbose_json",
                       "timestamp_granularities[]", "invalid_value")
    language = (one("language") or "en").lower()
    if language not in LANGUAGES:
        raise ApiError(400, f"language '{language}' is not supported: this model transcribes "
                            f"English only ({', '.join(LANGUAGES)})", "language",
                       "unsupported_language")
    prompt = one("prompt") or ""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt is over {MAX_PROMPT_CHARS} characters", "prompt",
                       "invalid_value")
    temperature = _temperature(one("temperature"))
    if (one("stream") or "false").lower() not in ("false", "0"):
        raise ApiError(400, "stream is not supported here; use the WebSocket API "
                            "(/v1/stream or /v1/listen) for live results", "stream",
                       "unsupported_value")
    return TranscriptionRequest(model, response_format,
                                frozenset(granularities or ("segment",)), language, prompt,
                                temperature)


def _temperature(text: str | None) -> float:
    if text is None or text == "":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ApiError(400, f"temperature must be a number from 0 to 1, got {text!r}",
                       "temperature", "invalid_value")
    return value


def decode_audio(data: bytes, max_audio_s: float) -> np.ndarray:
    """An uploaded file (anything libsndfile reads: WAV, FLAC, OGG/Opus, MP3, ...) ->
    16 kHz mono float32; `ApiError` (400, param `file`) when it cannot be used. The length
    is read from the header before anything is decoded."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            rate, frames = sound.samplerate, sound.frames
            if rate <= 0:
                raise ApiError(400, "the audio file has no sample rate", "file", "invalid_value")
            if frames / rate > max_audio_s:
                raise ApiError(400, f"audio of {frames / rate:.0f} s is longer than this "
                                    f"server's limit of {max_audio_s:g} s", "file",
                               "audio_too_long")
            samples = sound.read(dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = getattr(exc, "error_string", "") or str(exc)  # not the BytesIO's repr
        raise ApiError(400, "could not decode the audio file (WAV, FLAC, OGG, MP3 and other "
                            f"formats libsndfile reads are supported): {reason}", "file",
                       "invalid_value") from exc
    samples = to_mono(samples)
    if not np.all(np.isfinite(samples)):
        raise ApiError(400, "the audio file holds NaN or infinite samples", "file",
                       "invalid_value")
    if len(samples) < MIN_AUDIO_S * rate:
        raise ApiError(400, f"audio file is too short: at least {MIN_AUDIO_S} s",
                       "file", "audio_too_short")
    return resample(samples, rate, SAMPLE_RATE)


def render(request: TranscriptionRequest, segments: Sequence[Segment],
           duration_s: float) -> tuple[str | dict[str, Any], str]:
    """The response body (a JSON object, or text) and its content type."""
    text = " ".join(s.text for s in segments)
    fmt = request.response_format
    if fmt == "text":
        return text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return srt(segments), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return vtt(segments), "text/vtt; charset=utf-8"
    usage = {"type": "duration", "seconds": math.ceil(duration_s)}
    if fmt == "json":
        return {"text": text, "usage": usage}, "application/json"
    body: dict[str, Any] = {"task": "transcribe", "language": LANGUAGES[request.language],
                            "duration": round(duration_s, 3), "text": text}
    if "segment" in request.granularities:
        body["segments"] = [
            {"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
             "compression_ratio": round(compression_ratio(s.text), 4)}
            for i, s in enumerate(segments)]
    if "word" in request.granularities:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3),
                          "end": round(w.end, 3), "probability": round(w.probability, 4)}
                         for s in segments for w in s.words]
    body["usage"] = usage
    return body, "application/json"


def _clock(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def srt(segments: Sequence[Segment]) -> str:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm`, a blank line after each."""
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n"
                   for i, s in enumerate(segments, 1))


def vtt(segments: Sequence[Segment]) -> str:
    """WebVTT: the header, then cues with `HH:MM:SS.mmm`."""
    return "WEBVTT\n\n" + "".join(
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n" for s in segments)


class WhisperFiles:
    """Whole-file transcription on the daemon's loaded Whisper (its params are shared with
    the streaming pipeline; the offline decoder compiles its own shapes on first use)."""

    def __init__(self, model: Any, beam_size: int = 1) -> None:
        self.model = model  # models.registry.WhisperModel
        self.beam_size = beam_size

    def transcribe(self, audio: np.ndarray, request: TranscriptionRequest) -> list[Segment]:
        """Runs on a worker thread (JAX releases the GIL while it computes)."""
        from models.whisper.transcriber import WhisperTranscriber

        # The same settings as `streamd transcribe`, so both give the same text.
        transcriber = WhisperTranscriber(self.model, beam_size=self.beam_size,
                                         prompt=request.prompt)
        return transcriber.transcribe_segments(audio, word_timestamps=request.words)


def whisper_files(pipeline: Any, beam_size: int = 1) -> WhisperFiles | None:
    """File transcription for the daemon's pipeline: its Whisper (`whisper`, and the
    finals of `two-pass`); None for pipelines without one (CTC, test doubles)."""
    model = getattr(pipeline, "whisper_model", None)
    return WhisperFiles(model, beam_size) if model is not None else None
