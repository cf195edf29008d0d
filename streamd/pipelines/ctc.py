"""The `ctc` pipeline: wav2vec2 CTC models streamed chunk by chunk with cached state.

Each session keeps one `wav2vec2.StreamState` (batch axis 1) per segment and feeds only
the audio that is new since its last call, in whole chunks, through
`wav2vec2.encode_chunk`: every sample is encoded once, however often partials come.
Chunk, left context and look-ahead are durations (`CHUNK_MS`, `LEFT_MS`, `RIGHT_MS`:
320 ms, 5.12 s, 320 ms) turned into the model's own frames by
`wav2vec2.StreamConfig.from_ms` (the chunk rounded to the nearest whole number of output
frames: 16 frames of 20 ms for wav2vec2-base, 64 of 5 ms for strides 5, 4, 4), so every
conv layout streams; word times use the model's frame duration (`config.frame_s`).
The final feeds the rest of the segment (a short last chunk with `num_valid`), flushes the
look-ahead with `pending_chunks` empty chunks and returns the greedy text with word times.
Fed the same segment audio, the final equals `CTCTranscriber.stream` (same chunking).

Partials hold back the audio a VAD endpoint may still cut off (endpoint silence minus end
padding): the segment the final gets is never shorter than what partials fed, so the state
never has to be rewound. Only a `max_length` split can cut earlier; then the final
re-encodes the segment from its start (rare, correct, slower).

Stable text: an emitted CTC frame never changes (its look-ahead is already in), and the
greedy text only grows, so partial text is stable except where a split re-encode changes
frames near the cut: frames within the look-ahead of the newest audio are kept out of
`stable` as a margin.

Device work: one engine kind per chunk shape (`ctc/320ms`: the chunk's duration); a batch
stacks the states of its sessions (`stack_states`), runs one jitted `encode_chunk` and
splits them again. The engine's warm-up compiles every batch size before READY. The
`conformer` pipeline is this code with a wav2vec2-conformer folder
(streamd/pipelines/conformer.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from models import ctc, wav2vec2
from models.ctc import transcriber
from streamd.audio import SAMPLE_RATE
from streamd.config import Config
from streamd.engine import Engine
from streamd.errors import ConfigError
from streamd.recognizer import (
    Hypothesis,
    PipelineCounters,
    RecognizerOptions,
    SegmentInfo,
    Word,
)

log = logging.getLogger("streamd.pipelines.ctc")

CHUNK_MS = transcriber.CHUNK_MS  # as durations: the frames depend on the model's layout
LEFT_MS = transcriber.LEFT_MS
RIGHT_MS = transcriber.RIGHT_MS
# The pipeline (and metrics kind) of each wav2vec2 encoder family, by HF model_type.
PIPELINE_OF_FAMILY = {"wav2vec2": "ctc", "wav2vec2-conformer": "conformer"}
FINAL_PRIORITY = 1  # engine priority of finals (and their flush chunks); partials run at 0


@dataclasses.dataclass(frozen=True)
class Job:
    """One chunk of one stream: its state (batch 1; donated), audio [chunk_samples] and
    the real samples in it."""

    state: wav2vec2.StreamState | None
    chunk: np.ndarray
    valid: int


PAD = Job(None, np.zeros(0, np.float32), 0)  # the engine's empty slot


@dataclasses.dataclass(frozen=True)
class Step:
    logits: np.ndarray  # [n, V] the utterance's frames this chunk emitted
    state: wav2vec2.StreamState


@dataclasses.dataclass(frozen=True)
class CTCModel:
    config: wav2vec2.Wav2Vec2Config
    params: Any  # prepared for streaming (`wav2vec2.prepare_stream`)
    vocab: ctc.CTCVocab
    stream: wav2vec2.StreamConfig


def load_model(folder: str | Path, chunk_ms: float = CHUNK_MS, left_ms: float = LEFT_MS,
               right_ms: float = RIGHT_MS) -> CTCModel:
    """A Hugging Face wav2vec2 / wav2vec2-conformer CTC folder of any layout, ready to
    stream; the durations become its frames as `wav2vec2.StreamConfig.from_ms` rounds them.
    Raises models.checkpoint.ModelLoadError."""
    config, params, vocab_dir = wav2vec2.load(folder)
    vocab = ctc.CTCVocab.from_folder(vocab_dir)
    normalize = wav2vec2.extractor_normalizes(folder)
    stream = wav2vec2.StreamConfig.from_ms(config, chunk_ms, left_ms, right_ms,
                                           normalize=normalize)
    return CTCModel(config, wav2vec2.prepare_stream(params, config, stream), vocab, stream)


class CTCPipeline:
    """Owns the params and the engine kind of its chunk shape."""

    def __init__(self, engine: Engine, model: CTCModel, name: str = "ctc",
                 holdback_samples: int = 0) -> None:
        self.name = name
        self.engine = engine
        self.model = model
        self.chunk_samples = wav2vec2.chunk_samples(model.config, model.stream)
        self.kind = f"{name}/{self.chunk_samples * 1000 // SAMPLE_RATE}ms"
        self.holdback = holdback_samples
        # Emitted (output) frames within this many of the newest are kept out of `stable`:
        # the look-ahead, in output frames (an adapter emits one per adapter_factor).
        self.stable_margin = -(-model.stream.right_frames // model.config.adapter_factor)
        self._pad_state = self.new_state()  # empty slots of stacked batches (never donated)
        self.reencoded = 0  # finals that had to re-encode their segment (max_length split)
        engine.add_kind(self.kind, self.run_batch, PAD)

    def new_state(self) -> wav2vec2.StreamState:
        return wav2vec2.init_state(self.model.config, 1, self.model.stream)

    def compiled_shapes(self) -> int:
        """Compiles of `encode_chunk` so far (all pipelines in the process)."""
        return wav2vec2.encode_chunk._cache_size()  # type: ignore[attr-defined]  # jax private

    def counters(self) -> PipelineCounters:
        return {}

    def new_recognizer(self, session: str,
                       options: RecognizerOptions | None = None) -> CTCRecognizer:
        """`options` (context, prompt) do not apply to CTC."""
        return CTCRecognizer(self)

    async def step(self, state: wav2vec2.StreamState, chunk: np.ndarray,
                   priority: int = 0) -> Step:
        """Feeds up to one chunk of audio ([<= chunk_samples]; shorter ends the segment)."""
        piece = np.zeros(self.chunk_samples, np.float32)
        piece[: len(chunk)] = chunk
        return await self.engine.submit(self.kind, Job(state, piece, len(chunk)), priority)

    # -- worker thread

    def run_batch(self, items: list[Job]) -> list[Step | None]:
        """Engine batch function: one `encode_chunk` over the stacked batch-1 states of its
        rows (empty slots get a fresh state and are dropped again). Stacking always joins
        `len(items)` batch-1 states, so serving reuses exactly the small concatenate/slice
        compiles that warm-up made for each batch size."""
        if len(items) == 1:  # no stacking; the state is donated, so never the template
            state = self.new_state() if items[0].state is None else items[0].state
        else:
            state = wav2vec2.stack_states([self._pad_state if job.state is None else job.state
                                           for job in items])
        chunks = np.zeros((len(items), self.chunk_samples), np.float32)
        valid = np.zeros(len(items), np.int32)
        for row, job in enumerate(items):
            chunks[row, : len(job.chunk)], valid[row] = job.chunk, job.valid
        out, state = wav2vec2.encode_chunk(self.model.params, state, jnp.asarray(chunks),
                                           jnp.asarray(valid))
        logits, mask = np.asarray(out.logits), np.asarray(out.mask)
        rows = [state] if len(items) == 1 else wav2vec2.unstack_state(state)
        return [None if job is PAD else Step(logits[row][mask[row]], rows[row])
                for row, job in enumerate(items)]


class CTCRecognizer:
    """Per session: the stream state and greedy decoder of the segment in flight."""

    def __init__(self, pipeline: CTCPipeline) -> None:
        self.pipeline = pipeline
        self._segment: int | None = None
        self._state: wav2vec2.StreamState | None = None
        self._greedy = ctc.GreedyState()
        self._fed = 0  # samples of the segment encoded so far
        self._last_text = ""

    def _enter(self, segment: int) -> None:
        if segment != self._segment:
            self._segment = segment
            self._state = self.pipeline.new_state()
            self._greedy = ctc.GreedyState()
            self._fed = 0
            self._last_text = ""  # an empty partial says nothing

    async def _advance(self, chunk: np.ndarray, priority: int) -> None:
        """One chunk ([<= chunk_samples]) through the encoder and the greedy decoder."""
        assert self._state is not None
        try:
            step = await self.pipeline.step(self._state, chunk, priority)
        except BaseException:
            # The engine may have consumed (donated) the state: the next call of this
            # segment starts over from its first sample.
            self._segment, self._state = None, None
            raise
        self._state, self._fed = step.state, self._fed + len(chunk)
        self._greedy = ctc.greedy_step(self._greedy, step.logits, self.pipeline.model.vocab)

    async def _feed(self, audio: np.ndarray, end: int, priority: int) -> None:
        """Encodes the whole chunks of audio[self._fed : end]."""
        n = self.pipeline.chunk_samples
        while self._fed + n <= end:
            await self._advance(audio[self._fed : self._fed + n], priority)

    async def partial(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        self._enter(segment.index)
        await self._feed(audio_16k, len(audio_16k) - self.pipeline.holdback, 0)
        vocab = self.pipeline.model.vocab
        text = vocab.decode(self._greedy.spans.tokens)
        if text == self._last_text:
            return None  # nothing new to say
        self._last_text = text
        spans = self._greedy.spans
        cut = self._greedy.frames - self.pipeline.stable_margin
        stable = vocab.decode([t for t, e in zip(spans.tokens, spans.ends, strict=True)
                               if e <= cut])
        return Hypothesis(text, stable=stable if text.startswith(stable) else "")

    async def final(self, audio_16k: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        p = self.pipeline
        if segment.index != self._segment or self._fed > len(audio_16k):
            if segment.index == self._segment:  # a split cut the segment before our audio
                p.reencoded += 1
            self._segment = None
        self._enter(segment.index)
        await self._feed(audio_16k, len(audio_16k), FINAL_PRIORITY)
        # The rest (always < one chunk, maybe empty) ends the segment; then the flush.
        await self._advance(audio_16k[self._fed :], FINAL_PRIORITY)
        assert self._state is not None
        for _ in range(int(wav2vec2.pending_chunks(self._state)[0])):
            await self._advance(audio_16k[:0], FINAL_PRIORITY)
        greedy = self._greedy
        self._segment, self._state = None, None
        result = ctc.greedy_result(greedy, p.model.vocab, frame_stride=p.model.config.frame_s,
                                   time_offset=segment.start)
        words = tuple(Word(w["word"], w["start"], w["end"],
                           1.0 if w["confidence"] is None else w["confidence"])
                      for w in result.words)
        return Hypothesis(result.text, stable=result.text, words=words)

    def close(self) -> None:
        self._segment, self._state = None, None


def holdback_samples(config: Config) -> int:
    """Audio at the end of a partial that the VAD may still cut off at an endpoint:
    the endpoint fires `endpoint_silence_ms` after the last voiced frame and keeps
    `end_pad_ms` of it (in whole VAD frames)."""
    vad = config.vad
    endpoint = -(-vad.endpoint_silence_ms // vad.frame_ms)
    pad = -(-vad.end_pad_ms // vad.frame_ms)
    return max(endpoint - 1 - pad, 0) * vad.frame_ms * SAMPLE_RATE // 1000


def load_configured(config: Config, name: str, family: str | None = None) -> CTCModel:
    """`recognition.model` as the CTC folder of the pipeline `name` (of `family` when
    given, else either); every failure is a ConfigError naming the key."""
    from models.checkpoint import ModelLoadError

    folder = config.recognition.model
    if not folder:
        wanted = family or "wav2vec2 or wav2vec2-conformer"
        raise ConfigError("recognition.model", f"the {name} pipeline needs a {wanted} CTC "
                          "model folder (--model FOLDER)")
    try:
        model = load_model(folder)
    except ModelLoadError as exc:
        raise ConfigError("recognition.model", str(exc)) from exc
    found = model.config.model_type
    if family is not None and found != family:
        raise ConfigError("recognition.model", f"{folder} is a {found} model; the {name} "
                          f"pipeline takes {family} (use --pipeline "
                          f"{PIPELINE_OF_FAMILY[found]})")
    return model


def create_family(config: Config, engine: Engine, name: str, family: str) -> CTCPipeline:
    """Loads `recognition.model` (a `family` CTC folder) for the pipeline `name`."""
    model = load_configured(config, name, family)
    return CTCPipeline(engine, model, name, holdback_samples(config))


def create(config: Config, engine: Engine) -> CTCPipeline:
    """Factory for `streamd serve --pipeline ctc --model FOLDER`."""
    return create_family(config, engine, "ctc", "wav2vec2")
