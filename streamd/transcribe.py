"""`streamd transcribe`: offline recognition of audio files, one result per file."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import numpy as np

from models.checkpoint import ModelLoadError
from streamd.audio import SAMPLE_RATE, AudioError, audio_length, read_audio
from streamd.protocol import MAX_PROMPT_CHARS

log = logging.getLogger(__name__)


class FileTranscriber(Protocol):
    """What every model family offers the CLI: 16 kHz mono float32 in, text out."""

    def transcribe(self, audio: np.ndarray) -> str: ...

    def warmup(self) -> None:
        """Compile before timing. Whisper's also takes `lengths`: the audio lengths
        (samples at 16 kHz) it will see, and compiles only the shapes those need."""


def load_transcriber(args: argparse.Namespace) -> FileTranscriber:
    """The transcriber for `--model` (default: the embedded tiny.en Whisper)."""
    from models import registry

    folder = registry.resolve_model(args.model)
    family = registry.model_family(folder)
    if family == "whisper":
        from models.whisper.transcriber import EncoderWindow, WhisperTranscriber

        window: EncoderWindow = args.encoder_window or "bucketed"
        prompt = getattr(args, "prompt", "") or ""
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"--prompt is over {MAX_PROMPT_CHARS} characters")
        model = registry.load_whisper(args.model)
        return WhisperTranscriber(model, beam_size=args.beam_size, encoder_window=window,
                                  context=bool(getattr(args, "context", False)), prompt=prompt)
    loader = _FAMILY_LOADERS.get(family)
    if loader is None:
        raise ModelLoadError(f"{folder}: the {family} family cannot transcribe yet")
    return loader(folder, args)


class _Seq2SeqTranscriber:
    """Speech2Text and speech encoder-decoder models: `module.load(folder)` and
    `module.transcribe(model, audio, beam_size)` on the shared search engine."""

    def __init__(self, module, folder, beam_size: int) -> None:
        self._module = module
        self._model = module.load(folder)
        self._beam_size = beam_size

    def transcribe(self, audio: np.ndarray) -> str:
        return self._module.transcribe(self._model, audio, beam_size=self._beam_size)

    def warmup(self) -> None:
        # Encoders that pad to a bucket compile here; others compile per input length.
        # Faint noise, not zeros: utterance normalization divides by the deviation.
        noise = np.random.default_rng(0).normal(0, 1e-3, SAMPLE_RATE).astype(np.float32)
        self.transcribe(noise)


def _load_seq2seq(module_name: str) -> Callable[..., FileTranscriber]:
    def load(folder, args: argparse.Namespace) -> FileTranscriber:
        import importlib

        return _Seq2SeqTranscriber(importlib.import_module(module_name), folder, args.beam_size)

    return load


def _load_ctc(folder, args: argparse.Namespace) -> FileTranscriber:
    from models.ctc.transcriber import CTCTranscriber

    return CTCTranscriber(folder, beam_size=args.beam_size, chunk_ms=args.chunk_ms,
                          left_ms=args.left_ms, right_ms=args.right_ms)


# Non-Whisper families: family -> (folder, args) -> transcriber.
_FAMILY_LOADERS: dict[str, Callable[..., FileTranscriber]] = {
    "wav2vec2": _load_ctc,
    "wav2vec2-conformer": _load_ctc,
    "speech2text": _load_seq2seq("models.seq2seq.speech2text"),
    "speech-encoder-decoder": _load_seq2seq("models.seq2seq.speech_encoder_decoder"),
}


def _warmup(transcriber: FileTranscriber, files: Sequence[str]) -> None:
    """Compiles what `files` need: their lengths come from the file headers, so only the
    shapes these files use compile (unreadable files are reported later, in order)."""
    if "lengths" not in inspect.signature(transcriber.warmup).parameters:
        transcriber.warmup()  # compiles what it knows to (CTC streaming, bucketed encoders)
        return
    lengths = [n for n in map(audio_length, files) if n is not None]
    transcriber.warmup(lengths=lengths)  # type: ignore[call-arg]


def _partial_printer(path: str, as_json: bool) -> Callable[[str], None]:
    """Prints each changed partial of a streamed file as it comes."""

    def show(text: str) -> None:
        if as_json:
            print(json.dumps({"file": path, "partial": text}, ensure_ascii=False), flush=True)
        else:
            print(f"partial: {text}", flush=True)

    return show


def _segment_json(segment) -> dict:
    """A models.whisper.transcriber.Segment as JSON: start, end, text, words (word, start, end,
    confidence: the mean probability of its tokens)."""
    return {"start": round(segment.start, 2), "end": round(segment.end, 2),
            "text": segment.text,
            "words": [{"word": w.word.strip(), "start": round(w.start, 2),
                       "end": round(w.end, 2), "confidence": round(w.probability, 4)}
                      for w in segment.words]}


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        started = time.perf_counter()
        transcriber = load_transcriber(args)
        print(f"loading model: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        if args.stream and not hasattr(transcriber, "stream"):
            raise ValueError("--stream needs a CTC model (wav2vec2, wav2vec2-conformer)")
        word_timestamps = bool(getattr(args, "word_timestamps", False))
        if word_timestamps and not hasattr(transcriber, "transcribe_segments"):
            raise ValueError("--word-timestamps needs a Whisper model")
        started = time.perf_counter()
        _warmup(transcriber, args.files)
        print(f"compiling: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    except (ModelLoadError, ValueError) as exc:
        print(f"streamd transcribe: {exc}", file=sys.stderr)
        return 2
    failures = 0
    for path in args.files:
        try:
            audio = read_audio(path)
        except AudioError as exc:
            failures += 1
            print(f"streamd transcribe: {exc}", file=sys.stderr)
            continue
        started = time.perf_counter()
        segments = None
        # (both checked after loading: only the families that have them get here)
        if args.stream:
            text = cast(Any, transcriber).stream(audio, _partial_printer(str(path), args.json))
        elif word_timestamps:
            segments = cast(Any, transcriber).transcribe_segments(audio, word_timestamps=True)
            text = " ".join(segment.text for segment in segments)
        else:
            text = transcriber.transcribe(audio)
        elapsed = time.perf_counter() - started
        if args.json:
            record = {
                "file": str(path),
                "text": text,
                "duration_s": round(len(audio) / SAMPLE_RATE, 3),
                "elapsed_s": round(elapsed, 4),
            }
            if segments is not None:
                record["segments"] = [_segment_json(segment) for segment in segments]
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            line = f"final: {text}" if args.stream else text
            print(f"{path}: {line}" if len(args.files) > 1 else line, flush=True)
            for segment in segments or ():
                for word in segment.words:
                    print(f"  {word.start:7.2f} {word.end:7.2f}  {word.probability:.2f}  "
                          f"{word.word.strip()}", flush=True)
    return 1 if failures else 0
