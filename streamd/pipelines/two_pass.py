"""The `two-pass` pipeline: CTC partials while a segment grows, a Whisper final at its end.

First pass: the `ctc` pipeline's cached-state streaming (`recognition.model`, a wav2vec2
or wav2vec2-conformer CTC folder of any layout). Every chunk (320 ms, rounded to whole
frames of the model) of the growing segment is encoded once; a partial is the greedy
text so far. Partials carry no `stable`: the contract says
a stable prefix never changes, and the final is another model's text.

Second pass: at the endpoint the whole segment is decoded once by Whisper
(`recognition.final_model`, default the embedded tiny.en), with no committed prefix, as
the `whisper` pipeline decodes a final. Whisper sees no audio while speech goes on, so a
growing segment costs no Whisper work; when the speech pauses (a `closing` partial) the
Whisper final starts on the paused audio, and the endpoint's final reuses it if no speech
followed. The final replaces the partials' text.

The final carries no `words`: Whisper decodes without timestamps here, and CTC word times
belong to the CTC text, not to Whisper's words.

At the final the segment's CTC stream state is dropped without its look-ahead flush (its
text would be thrown away). Partials therefore feed all the audio they have, with no hold
back for what the endpoint may cut: the final never continues the CTC state, so nothing
has to be rewound, and partials show 180 ms more speech than the `ctc` pipeline's.

Device work: the CTC kind (`ctc/320ms` or `conformer/320ms`) and only the Whisper buckets
a final can use (windows of at least `FINAL_MIN_S`) are registered on the shared engine,
so its warm-up compiles every shape both passes issue before READY.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import numpy as np

from streamd.config import Config
from streamd.engine import Engine
from streamd.pipelines import ctc, whisper
from streamd.pipelines.ctc import CTCPipeline, CTCRecognizer
from streamd.pipelines.whisper import DEFAULT_BUCKETS_S, FINAL_MIN_S, WhisperPipeline
from streamd.pipelines.whisper_recognizer import WhisperRecognizer
from streamd.recognizer import Hypothesis, PipelineCounters, RecognizerOptions, SegmentInfo

# Whisper decodes finals only, so the short partial buckets would just be compiled for nothing.
FINAL_BUCKETS_S = tuple(b for b in DEFAULT_BUCKETS_S if b >= FINAL_MIN_S)


class TwoPassPipeline:
    """A CTC pipeline for partials and a Whisper pipeline for finals on one engine."""

    name = "two-pass"

    def __init__(self, partials: CTCPipeline, finals: WhisperPipeline) -> None:
        self.partials = partials
        self.finals = finals
        self.whisper_model = finals.whisper_model  # file transcription (streamd/openai_api.py)

    def counters(self) -> PipelineCounters:
        return {**self.partials.counters(), **self.finals.counters()}

    def new_recognizer(self, session: str,
                       options: RecognizerOptions | None = None) -> TwoPassRecognizer:
        return TwoPassRecognizer(self.partials.new_recognizer(session),
                                 self.finals.new_recognizer(session, options))


class TwoPassRecognizer:
    """Per session: the CTC stream of the segment in flight and a Whisper recognizer that
    only ever decodes finals."""

    def __init__(self, partials: CTCRecognizer, finals: WhisperRecognizer) -> None:
        self._ctc = partials
        self._whisper = finals
        self._early: asyncio.Task | None = None  # Whisper's final started at a pause

    async def partial(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        if segment.closing:
            # The speech paused: Whisper starts the final on the audio the endpoint's final
            # will have, beside the CTC partial (whose event must not wait for it). Its
            # text is not sent: partials stay the CTC model's.
            await self._settle()
            self._early = asyncio.create_task(self._whisper.partial(audio_16k, segment))
            await asyncio.sleep(0)  # it queues first: it skips itself behind a busy queue
        hyp = await self._ctc.partial(audio_16k, segment)
        # No stable prefix: Whisper's final need not start with the CTC text.
        return None if hyp is None else dataclasses.replace(hyp, stable="")

    async def _settle(self) -> None:
        """Waits for an early final in flight (calls into one recognizer never overlap)."""
        task, self._early = self._early, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task  # a failed early final just means the final decodes itself

    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        # The segment's CTC state goes first, whatever Whisper does; the next partial
        # starts a fresh stream.
        self._ctc.close()
        await self._settle()
        # Whisper reuses the early decode if the audio is the paused audio, else decodes.
        return await self._whisper.final(audio_16k, segment)

    def clear_context(self) -> None:
        """Forget the previous text of Whisper's finals (streamd.recognizer.clear_context)."""
        self._whisper.clear_context()

    def close(self) -> None:
        if self._early is not None:
            self._early.cancel()
            self._early = None
        self._ctc.close()
        self._whisper.close()


def create(config: Config, engine: Engine) -> TwoPassPipeline:
    """Factory for `streamd serve --pipeline two-pass --model CTC_FOLDER
    [--final-model WHISPER]`. Both models load before any engine kind is added."""
    ctc_model = ctc.load_configured(config, "two-pass")
    whisper_model = whisper.load_configured(config.recognition.final_model,
                                            "recognition.final_model")
    # The CTC kind keeps its family's name (`ctc/320ms`, `conformer/320ms`) in metrics.
    family = ctc.PIPELINE_OF_FAMILY[ctc_model.config.model_type]
    partials = CTCPipeline(engine, ctc_model, family, holdback_samples=0)
    finals = WhisperPipeline(engine, whisper_model, buckets_s=FINAL_BUCKETS_S,
                             max_segment_s=config.vad.max_segment_s,
                             beam_size=config.recognition.beam_size,
                             context=config.recognition.context,
                             context_tokens=config.recognition.context_tokens,
                             context_reset_s=config.recognition.context_reset_s,
                             context_partials=config.recognition.context_partials)
    return TwoPassPipeline(partials, finals)
