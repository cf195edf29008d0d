"""`echo`: a pipeline without a model whose text is the duration of the audio it got.

For testing clients, deployments and the daemon itself (`streamd serve --pipeline echo`):
it starts in a second and needs no model, yet every event is checkable exactly. A
segment of 2.345 s says "2.35" (seconds, two decimals), as a partial (of the audio so
far) and as its final; so a final's text equals its `end - start` to within 0.01 s. The
durations go through the real `Engine` (batch kind `duration`), so batching, queueing,
back-pressure and shutdown behave as with a model. `recognition.model` is ignored.
"""

from __future__ import annotations

import numpy as np

from streamd.config import Config
from streamd.engine import Engine
from streamd.recognizer import (
    Hypothesis,
    PipelineCounters,
    RecognizerOptions,
    SegmentInfo,
)

RATE = 16000


class EchoRecognizer:
    def __init__(self, pipeline: EchoPipeline) -> None:
        self.pipeline = pipeline
        self.engine = pipeline.engine

    async def partial(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        return Hypothesis(await self._seconds(audio_16k), stable="")

    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        return Hypothesis(await self._seconds(audio_16k))

    async def _seconds(self, audio_16k: np.ndarray) -> str:
        seconds = await self.engine.submit("duration", audio_16k)
        return f"{seconds:.2f}"

    def clear_context(self) -> None:
        """The hook `finalize` calls (streamd.recognizer.clear_context): echo keeps no
        previous text, so it only counts the calls (`streamd_echo_context_clears_total`),
        which lets a client test see that its `finalize` reached the recognizer."""
        self.pipeline.context_clears += 1

    def close(self) -> None:
        pass


class EchoPipeline:
    """Reports each segment's duration in seconds as its text."""

    name = "echo"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Sizes of the batches the engine ran (tests check only compiled sizes arrive).
        self.batch_sizes_seen: list[int] = []
        self.context_clears = 0
        engine.add_kind("duration", self._batch, np.zeros(0, np.float32))

    def _batch(self, items: list[np.ndarray]) -> list[float]:
        self.batch_sizes_seen.append(len(items))
        return [len(audio) / RATE for audio in items]

    def counters(self) -> PipelineCounters:
        return {"streamd_echo_batches": ("Batches the echo pipeline ran",
                                         lambda: len(self.batch_sizes_seen)),
                "streamd_echo_context_clears": ("Previous text cleared (finalize)",
                                                lambda: self.context_clears)}

    def new_recognizer(
        self, session: str, options: RecognizerOptions | None = None
    ) -> EchoRecognizer:
        return EchoRecognizer(self)


def create(config: Config, engine: Engine) -> EchoPipeline:
    """Factory registered as `echo` (pyproject.toml, entry points `streamd.pipelines`)."""
    return EchoPipeline(engine)
