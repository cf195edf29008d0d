"""`slow-echo`: the `echo` pipeline, but each final takes a second more.

A SIGTERM during a segment must still wait for that segment's final; this pipeline makes
the wait long enough to see. It is also the worked example of a pipeline from another
package (docs/pipelines.md): it only uses streamd's public pipeline interface.
"""

from __future__ import annotations

import asyncio

import numpy as np

from streamd.config import Config
from streamd.engine import Engine
from streamd.pipelines.echo import EchoPipeline, EchoRecognizer
from streamd.recognizer import Hypothesis, RecognizerOptions, SegmentInfo

FINAL_DELAY_S = 1.0


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


def create(config: Config, engine: Engine) -> SlowEchoPipeline:
    return SlowEchoPipeline(engine)
