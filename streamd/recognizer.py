"""The interface a recognition pipeline implements, and building one by its registered name.

A `Pipeline` is created once per daemon (it owns params and registers its batch kinds
with the shared `Engine`); it hands each session a `SegmentRecognizer`, which turns the
16 kHz audio of the growing segment into partial hypotheses and, at the endpoint, a final.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streamd.config import Config
from streamd.engine import Engine
from streamd.pipelines import load_pipeline_factory


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
    """Per-session recognizer. Calls for one session never overlap.

    Optional attribute `supersede_partials = True`: the session may cancel a partial in
    flight when the segment's final is due (streamd/session.py, `SessionRunner`). Only
    for recognizers whose partials are independent of their final: not when the final
    continues the partials' work (the streaming CTC pipeline's encoder state, which a
    cancelled partial throws away).
    """

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


def create_pipeline(name: str, config: Config, engine: Engine) -> Pipeline:
    """Build the pipeline registered as `name` (an entry point of the group
    `streamd.pipelines`, see streamd/pipelines/__init__.py and docs/pipelines.md)."""
    factory: PipelineFactory = load_pipeline_factory(name)
    return factory(config, engine)
