"""Test pipelines from another package (docs/pipelines.md), using only streamd's public
pipeline interface:

- `slow-echo`: the `echo` pipeline, but each final takes a second more. A SIGTERM during
  a segment must still wait for that segment's final; this makes the wait long enough
  to see.
- `paced-echo`: the `echo` pipeline on a device of known speed: every partial holds an
  engine worker for `PACED_ECHO_PARTIAL_S` seconds and every final for
  `PACED_ECHO_FINAL_S` (environment; defaults below), whatever the batch, so a node's
  capacity in sessions is known exactly (tests/streamd/test_overload.py). It submits as
  the whisper pipeline does: finals more urgent than partials, partials best effort.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from streamd.config import Config
from streamd.engine import Engine
from streamd.pipelines.echo import RATE, EchoPipeline, EchoRecognizer
from streamd.recognizer import Hypothesis, RecognizerOptions, SegmentInfo

FINAL_DELAY_S = 1.0
PARTIAL_S, FINAL_S = 0.05, 0.1  # paced-echo's defaults


class SlowFinals(EchoRecognizer):
    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        await asyncio.sleep(FINAL_DELAY_S)
        return await super().final(audio_16k, segment)


class SlowEchoPipeline(EchoPipeline):
    name = "slow-echo"

    def new_recognizer(
        self, session: str, options: RecognizerOptions | None = None
    ) -> SlowFinals:
        return SlowFinals(self)


class PacedRecognizer:
    supersede_partials = True  # its partials are independent of its finals

    def __init__(self, pipeline: PacedEchoPipeline) -> None:
        self.engine = pipeline.engine

    async def partial(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        seconds = await self.engine.submit("partial", audio_16k, best_effort=True)
        return None if seconds is None else Hypothesis(f"{seconds:.2f}", stable="")

    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        seconds = await self.engine.submit("final", audio_16k, priority=1)
        return Hypothesis(f"{seconds:.2f}")

    def close(self) -> None:
        pass


class PacedEchoPipeline:
    """Texts as `echo` (each segment's duration); each real request in a batch holds the
    worker for the kind's service time (padding costs nothing)."""

    name = "paced-echo"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        service = {"partial": float(os.environ.get("PACED_ECHO_PARTIAL_S", PARTIAL_S)),
                   "final": float(os.environ.get("PACED_ECHO_FINAL_S", FINAL_S))}
        for kind, seconds in service.items():
            engine.add_kind(kind, self._batch(seconds), None)

    @staticmethod
    def _batch(seconds: float):
        def run(items: list[np.ndarray | None]) -> list[float | None]:
            real = [a for a in items if a is not None]
            time.sleep(seconds * len(real))  # a device call: the GIL is released
            return [None if a is None else len(a) / RATE for a in items]
        return run

    def counters(self) -> dict:
        return {}

    def new_recognizer(
        self, session: str, options: RecognizerOptions | None = None
    ) -> PacedRecognizer:
        return PacedRecognizer(self)


def create(config: Config, engine: Engine) -> SlowEchoPipeline:
    return SlowEchoPipeline(engine)


def create_paced(config: Config, engine: Engine) -> PacedEchoPipeline:
    return PacedEchoPipeline(engine)
