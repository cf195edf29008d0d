"""The interface a recognition pipeline implements, and the registry of pipelines by name.

A `Pipeline` is created once per daemon (it owns params and registers its batch kinds
with the shared `Engine`); it hands each session a `SegmentRecognizer`, which turns the
16 kHz audio of the growing segment into partial hypotheses and, at the endpoint, a final.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streamd.config import KNOWN_PIPELINES, Config
from streamd.engine import Engine
from streamd.errors import Unsupported


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds of stream audio
    end: float
    confidence: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3),
                "confidence": round(self.confidence, 4)}


@dataclass(frozen=True)
class Hypothesis:
    text: str
    stable: str = ""  # prefix of `text` that will not change any more (partials)
    words: tuple[Word, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SegmentInfo:
    """Where the audio handed to a recognizer sits in the session's stream."""

    session: str
    index: int
    start: float  # seconds since the session's first sample
    end: float
    # A partial on audio the VAD says is complete (speech paused for the end padding): if
    # the endpoint follows, the final gets exactly this audio, so a pipeline may compute
    # the final now and reuse it (`final` then costs nothing).
    closing: bool = False


@dataclass(frozen=True)
class RecognizerOptions:
    """Per-session recognition options from `start` (docs/protocol.md).

    context: decode with the session's recent final text as a prompt (None: the
    daemon's `recognition.context`); prompt: text that always precedes it (Whisper's
    `initial_prompt`: names, jargon). Pipelines without a text prompt ignore both."""

    context: bool | None = None
    prompt: str = ""


class SegmentRecognizer(Protocol):
    """Per-session recognizer. Calls for one session never overlap."""

    async def partial(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        """Audio of the segment so far ([N] float32). None: nothing new to say."""
        ...

    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        """Whole segment audio; called exactly once per segment, after its partials."""
        ...

    def close(self) -> None:
        """The session ended; free per-session state."""
        ...


# Prometheus counter name -> (help text, current value); read at scrape time.
PipelineCounters = dict[str, tuple[str, Callable[[], float]]]


class Pipeline(Protocol):
    name: str

    def new_recognizer(
        self, session: str, options: RecognizerOptions | None = None
    ) -> SegmentRecognizer: ...

    def counters(self) -> PipelineCounters:
        """The pipeline's own counters for /metrics (may be empty)."""
        ...


def clear_context(recognizer: SegmentRecognizer) -> None:
    """Forget the session's previous text (a `finalize`, a topic change): the next
    segment is decoded without it. A no-op for recognizers without context."""
    clear = getattr(recognizer, "clear_context", None)
    if clear is not None:
        clear()


PipelineFactory = Callable[[Config, Engine], Pipeline]

_REGISTRY: dict[str, PipelineFactory] = {}


def register_pipeline(name: str, factory: PipelineFactory) -> None:
    """Model packages call this when their pipeline exists (name from KNOWN_PIPELINES)."""
    _REGISTRY[name] = factory


def available_pipelines() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def create_pipeline(name: str, config: Config, engine: Engine) -> Pipeline:
    """Build a pipeline by name: registered, or `streamd.pipelines.<name>.create`.

    Known names without an implementation yet raise `Unsupported`.
    """
    factory = _REGISTRY.get(name)
    if factory is None and name in KNOWN_PIPELINES:
        # Model pipelines live in streamd/pipelines/<name>.py and expose `create`.
        module = f"streamd.pipelines.{name.replace('-', '_')}"
        try:
            factory = importlib.import_module(module).create
        except ModuleNotFoundError as exc:
            if exc.name not in (module, "streamd.pipelines"):
                raise
    if factory is None:
        if name in KNOWN_PIPELINES:
            raise Unsupported(f"pipeline {name!r} is not available in this build yet")
        raise Unsupported(f"unknown pipeline {name!r}")
    return factory(config, engine)
