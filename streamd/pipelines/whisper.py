"""The `whisper` pipeline: partials while a segment grows, one final at its endpoint.

This module owns the buckets, budgets and engine kinds; the device call is
models/whisper/batch.py's, the per-session policy (agreement, early final, splicing,
context) streamd/pipelines/whisper_recognizer.py's.

Per request the segment audio so far is zero-padded to the smallest of a few static
length buckets (default 2, 4, 6, 10, 14, 21 s), turned into log-mel, encoded, and
decoded greedily after a prompt `SOT <|notimestamps|> + committed tokens` that the
decoder pre-fills into its fixed-size KV cache. LocalAgreement-3 over words decides the
committed (stable) prefix, which later partials and the final keep (the contract: `stable`
never changes). The final decodes the whole segment afresh: forcing the partials' prefix
kept their early mistakes (WER 6.1 % vs 4.1 % on the stream recording). A fresh final that
differs from the stable prefix in case or punctuation only takes the stable spelling; one
with other words for it is spliced (the stable words, then the fresh decode after its
match of the last stable word: `splice_point`); one that does not align is decoded once
more with the stable prefix forced.
Final early: when the VAD reports the speech paused for the end padding, the session asks
for a `closing` partial on exactly the audio a final at the coming endpoint would get; it
is decoded as the final (and sent as a partial unless it is empty), and the
endpoint's final reuses it when the audio is unchanged: the final's decode overlaps the
rest of the endpoint wait instead of following it.
Finals use a window of at least `final_min_s` (10 s): tiny.en loops or repeats a sentence
when short speech is padded to a 5-8 s window and is clean from 10 s on (see
models/whisper/transcriber.py), while partials keep the short buckets for speed. Finals are
submitted with a higher engine priority than partials.

Device work: one engine kind per length bucket (`whisper/<seconds>s`); each batch runs
one jitted call (models/whisper/batch.py `recognize_batch`: mel, encoder, cross K/V,
prefill, token loop).
Each kind registers its batch sizes with the engine, which pads every batch to one of
them and compiles exactly those at warm-up; long buckets have only small batch sizes
(cost on CPU grows with rows anyway, and warm-up stays short).
A partial is skipped (None) while another request waits in the engine queue: finals of
other sessions then never wait behind a pile of partials.

No-speech guard (as openai/whisper): a segment whose `<|nospeech|>` probability is over
0.6 and whose average log-probability is under -1 gives an empty final and no partials.

Context (issue 17): a session's finals (and, with `context_partials`, its partials) are
decoded after a prompt of its recent final text, `<|startofprev|> previous... SOT ...`
(how Whisper was trained; openai/whisper's `condition_on_previous_text`), so a sentence
the VAD split keeps its beginning and a fragment is not written as a sentence of its own.
An optional per-session `prompt` (Whisper's `initial_prompt`) always comes first. The previous text
is prefilled into the same fixed-size KV cache as the committed prefix: buckets up to
14 s have a second, wider prompt shape (`context_width` more positions, shared by the
previous text and the committed prefix), compiled at warm-up and used for a batch when
one of its rows has previous text; longer buckets' committed room holds it already. Guards
against what conditioning does wrong: a final whose prompted decode fails openai's
checks (compression ratio over 2.4, average log-probability under -1, or no-speech
probability over 0.6) is decoded again without the prompt, that decode is the final,
and the session's context is cleared (openai resets its prompt after a fallback above
temperature 0.5); the context is also cleared after `context_reset_s` of silence
between finals and when the session ends.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.whisper import model as whisper
from models.whisper.batch import BucketSpec, Decoded, Row, decode_rows, recognize_batch
from models.whisper.decoding import (
    DecodeOptions,
    NoSpeechProbe,
    logit_filters,
)
from models.whisper.mel import SAMPLE_RATE
from models.whisper.transcriber import (
    PROMPT_LIMIT,
    TAIL_MARGIN,
    WhisperTranscriber,
    initial_prompt,
)
from streamd.config import Config
from streamd.engine import Engine
from streamd.errors import ConfigError
from streamd.pipelines.stabilize import loop_start
from streamd.pipelines.whisper_recognizer import WhisperRecognizer
from streamd.recognizer import (
    PipelineCounters,
    RecognizerOptions,
    Word,
)

log = logging.getLogger("streamd.pipelines.whisper")

DEFAULT_BUCKETS_S = (2.0, 4.0, 6.0, 10.0, 14.0, 21.0, 30.0)
# Engine kind of the finals' word timings (`recognition.word_timestamps`) and its empty slot.
WORDS_KIND = "whisper/words"
WORDS_PAD: tuple[np.ndarray, tuple[int, ...]] = (np.zeros(0, np.float32), ())
# Smallest encoder window of a final (see the module docstring).
FINAL_MIN_S = 10.0
FINAL_PRIORITY = 1  # engine priority of finals; partials run at 0
# Rows x seconds of audio per device call; bounds the batch sizes of long buckets.
ROW_SECONDS_PER_CALL = 32.0
# Silence kept after the audio inside a bucket: Whisper says its last phrase again when
# the speech runs to the window's end. Finals keep the offline transcriber's margin, a
# quarter of the window (models/whisper/transcriber.py TAIL_MARGIN, chosen on the dev set);
# partials keep 0.3 s, for speed: a partial's loop is cut (`cut_loop`) and only words
# that three partials agree on become stable.
PARTIAL_TAIL_MARGIN_S = 0.3
# Token budget of a request: TOKEN_BUDGET_BASE + rate x audio seconds, committed prefix
# included. What tiny.en writes for the dev and shared sets runs at most 5.2 tokens per
# second of audio (median 3.3; `streamd transcribe` on tests/data/audio/dev), so finals
# (8/s) keep half again of the fastest speech and partials (6/s) a seventh, and partials
# never commit their last word; the budget stops the loops tiny.en falls into on short
# padded audio ("and so and so ...") early: a 0.8 s partial cost 160 ms at the bucket's
# 20-token cap and a third of that at its budget.
TOKEN_BUDGET_BASE = 4
PARTIAL_TOKENS_PER_S = 6.0
FINAL_TOKENS_PER_S = 8.0
# Previous-text tokens a decode may see (recognition.context_tokens). Whisper's own limit
# is half the text context (223 after <|startofprev|>); the prefill of every request pays
# for each one (tiny.en, 10 s bucket, 2 CPU cores: 0.03 s for today's 47-token prompt,
# 0.19 s with 224 more), so the default is the last couple of sentences.
CONTEXT_TOKENS = 64
# Silence between a session's finals (one's end to the next one's start, pads included)
# after which the previous text is dropped (recognition.context_reset_s). Measured with
# bench/context.py (finals in process, partials off) on the two stream files, unrelated
# utterances 0-5 s apart: finals WER shared / dev 4.05 / 5.36 % without context; with it,
# reset 0.5 s: 4.05 / 5.36; 1 s: 4.05 / 5.36; 2 s: 4.05 / 5.05; 10 s: 4.05 / 5.36. A
# sentence the VAD splits at a pause (JFK) continues well within 2 s.
CONTEXT_RESET_S = 2.0
# Partials are decoded without the previous text: on a fraction of a sentence the prompt
# outweighs the audio ("asked not" after "my fellow Americans"), LocalAgreement commits
# that, and the final must keep it. bench/context.py with every partial decoded, reset
# 2 s, finals WER shared / dev: no context 4.05 / 5.68 %; partials and finals prompted
# 4.73 / 5.99; finals only 4.05 / 5.05.
CONTEXT_PARTIALS = False


# --------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class Job:
    """One request to the engine: segment audio [N] float32, the tokens to force after the
    SOT sequence (`prefix`) and the previous text before it (`previous`, newest last)."""

    audio: np.ndarray
    prefix: tuple[int, ...] = ()
    tokens_per_s: float = FINAL_TOKENS_PER_S
    previous: tuple[int, ...] = ()

    def budget(self) -> int:
        """New tokens this request may generate (see TOKEN_BUDGET_BASE)."""
        total = TOKEN_BUDGET_BASE + int(np.ceil(self.tokens_per_s * len(self.audio) / SAMPLE_RATE))
        return max(total - len(self.prefix), 1)


PAD = Job(np.zeros(0, np.float32))  # the engine's empty slot


# --------------------------------------------------------------------------- pipeline


def bucket_ladder(
    max_segment_s: float, buckets_s: Sequence[float] = DEFAULT_BUCKETS_S,
    final_min_s: float = FINAL_MIN_S,
) -> tuple[float, ...]:
    """Buckets up to the first that holds a whole segment (VAD cap) with a final's tail
    margin, and the smallest final window, <= 30 s."""
    need = min(max(max_segment_s / (1.0 - TAIL_MARGIN), final_min_s), 30.0)
    out = []
    for b in sorted(buckets_s):
        out.append(b)
        if b >= need:
            break
    if out[-1] < need:
        out.append(30.0)
    return tuple(out)


class WhisperPipeline:
    """Owns the params and registers one engine kind per bucket (and per beam final)."""

    name = "whisper"

    def __init__(
        self,
        engine: Engine,
        model: Any,  # models.registry.WhisperModel: config, params, tokenizer
        *,
        buckets_s: Sequence[float] = DEFAULT_BUCKETS_S,
        max_segment_s: float = 20.0,
        beam_size: int = 1,
        tokens_per_second: float = 5.0,
        final_min_s: float = FINAL_MIN_S,
        context: bool = True,
        context_tokens: int = CONTEXT_TOKENS,
        context_reset_s: float = CONTEXT_RESET_S,
        context_partials: bool = CONTEXT_PARTIALS,
        word_timestamps: bool = False,
    ) -> None:
        self.engine = engine
        self.whisper_model = model  # file transcription too (streamd/openai_api.py)
        self.config: whisper.WhisperConfig = model.config
        self.params = model.params
        self.tokenizer = model.tokenizer
        tok = self.tokenizer
        self.sot_sequence = tuple(tok.sot_sequence(timestamps=False))
        self.eot = tok.eot
        # Decodes go on after a forced (committed) prefix: never a special token or a
        # timestamp, and ending at once is legitimate.
        filters = logit_filters(self.config, tok,
                                DecodeOptions(suppress_special=True, end_at_begin=True))
        probe = NoSpeechProbe(tok.sot, tok.no_speech)
        self.specs: list[BucketSpec] = []
        self.final_specs: list[BucketSpec] = []  # buckets of finals (beam search if asked)
        self._piece: dict[int, str] = {}
        self.partials_skipped = 0  # partials not computed because the engine was busy
        self.finals_early = 0  # finals computed on a closing partial (not at the endpoint)
        self.finals_restabilized = 0  # fresh finals redone to keep the stable prefix
        self.finals_spliced = 0  # fresh finals joined to the stable prefix without a redo
        self.context = context  # sessions' default (start.context overrides)
        self.context_tokens = min(context_tokens, PROMPT_LIMIT)
        self.context_reset_s = context_reset_s
        # Partials prompted too (see CONTEXT_PARTIALS); by default finals only.
        self.context_partials = context_partials
        self.context_fallbacks = 0  # finals decoded again without the previous text
        self.sot_prev = tok.sot_prev
        self.word_timestamps = word_timestamps
        if word_timestamps:
            self._add_word_kind(model)
        # Each bucket's shape with room for previous text (absent: no context at all).
        self.wide: dict[BucketSpec, BucketSpec] = {}
        max_len = self.config.max_target_positions
        ladder = bucket_ladder(max_segment_s, buckets_s, final_min_s)
        for seconds in ladder:
            # Token budgets scale with the audio: caps runaway loops, keeps prefill small.
            new = min(int(seconds * tokens_per_second) + 10, max_len // 2)
            width = min(len(self.sot_sequence) + int(seconds * tokens_per_second * 0.8) + 4,
                        max_len - new)
            spec = BucketSpec(self.config, int(seconds * SAMPLE_RATE), width, new, self.eot,
                              filters, probe)
            self.specs.append(spec)
            self._add_kind(spec)
            if seconds < final_min_s and seconds != ladder[-1]:
                continue  # too short a window for a final
            if beam_size > 1:
                spec = dataclasses.replace(spec, beams=beam_size)
                self._add_kind(spec)
            self.final_specs.append(spec)

    def _add_word_kind(self, model: Any) -> None:
        """Finals' word timings: one forced pass of the final's tokens over its audio
        (models/whisper/timing.py), on the engine's threads as every device call."""
        self.aligner = WhisperTranscriber(model)
        # One final at a time: alignment runs row by row (its shapes follow the text).
        self.engine.add_kind(WORDS_KIND, self._align_run, WORDS_PAD, batch_sizes=(1,))

    def _align_run(self, items: list[tuple[np.ndarray, tuple[int, ...]]]) -> list[tuple]:
        if all(item is WORDS_PAD for item in items):  # warm-up: a final's usual shapes
            for seconds in self.aligner.buckets_s:
                self.aligner.align(np.zeros(seconds * SAMPLE_RATE // 2, np.float32), (220,))
            return [()] * len(items)
        return [() if item is WORDS_PAD else self.aligner.align(*item) for item in items]

    async def timed_words(self, audio: np.ndarray, tokens: tuple[int, ...],
                    start: float) -> tuple[Word, ...]:
        """The final's words in stream seconds (`start`: the segment's)."""
        timed = await self.engine.submit(WORDS_KIND, (audio, tokens), FINAL_PRIORITY)
        return tuple(Word(w.word.strip(), start + w.start, start + w.end, w.probability)
                     for w in timed)  # fmt: skip

    def _add_kind(self, spec: BucketSpec) -> None:
        """One engine kind per bucket; its wider shape (previous text) shares the kind.

        The previous text and the committed prefix share the prompt's room: a fresh final
        (most prompted decodes) has no prefix, so the wide shape only adds what
        `<|startofprev|>` + `context_tokens` + the SOT sequence need beyond the bucket's
        committed room (none from the 21 s bucket on: the same shape), and a decode with a
        long prefix keeps fewer previous tokens. Every prompt position is prefilled, used
        or not: for tiny.en's 10 s final, 111 positions (SOT room + 65 before it) came to
        about a tenth more multiply-adds than the unprompted 46, 67 to a twentieth."""
        room = self.config.max_target_positions - spec.max_new_tokens
        need = min(1 + self.context_tokens + len(self.sot_sequence), room)
        if self.context_tokens:
            extra = max(need - spec.prompt_width, 0)
            self.wide[spec] = dataclasses.replace(spec, context_width=extra) if extra else spec
        self.engine.add_kind(self.kind(spec), functools.partial(self._run, spec), PAD,
                             batch_sizes=self.batch_sizes(spec))

    @staticmethod
    def kind(spec: BucketSpec) -> str:
        suffix = f"/beam{spec.beams}" if spec.beams > 1 else ""
        return f"whisper/{spec.seconds:g}s{suffix}"

    def spec_for(self, n_samples: int, final: bool = False) -> BucketSpec:
        """The smallest bucket holding n samples and its tail margin (else the largest)."""
        if final:
            return next((s for s in self.final_specs
                         if n_samples <= s.samples * (1.0 - TAIL_MARGIN)), self.final_specs[-1])
        need = n_samples + int(PARTIAL_TAIL_MARGIN_S * SAMPLE_RATE)
        return next((s for s in self.specs if s.samples >= need), self.specs[-1])

    def prefix_room(self, n_samples: int) -> int:
        """Committed tokens that fit the prompt of this audio's bucket (and of every later,
        longer request of the same segment, as buckets only grow)."""
        return self.spec_for(n_samples).prompt_width - len(self.sot_sequence)

    def batch_sizes(self, spec: BucketSpec) -> tuple[int, ...]:
        """The engine's batch sizes that keep a call of this bucket within
        ROW_SECONDS_PER_CALL (the engine pads and warms exactly these)."""
        cap = max(1, int(ROW_SECONDS_PER_CALL // (spec.seconds * spec.beams)))
        sizes = tuple(b for b in self.engine.batch_sizes if b <= cap)
        return sizes or self.engine.batch_sizes[:1]

    def compiled_shapes(self) -> int:
        """Compiles of `recognize_batch` so far (all pipelines in the process)."""
        return recognize_batch._cache_size()  # type: ignore[attr-defined]  # jax private

    def counters(self) -> PipelineCounters:
        return {
            "streamd_partials_skipped": ("Partials not computed: the engine queue was busy",
                                         lambda: self.partials_skipped),
            "streamd_finals_early": ("Finals decoded at the speech pause, before the endpoint",
                                     lambda: self.finals_early),
            "streamd_finals_restabilized": (("Finals decoded again with the stable prefix "
                                            "forced (the fresh decode had other words)"),
                                            lambda: self.finals_restabilized),
            "streamd_finals_spliced": (("Finals whose fresh decode had other words for the "
                                       "stable prefix, joined after its match of the last"),
                                       lambda: self.finals_spliced),
            "streamd_context_fallbacks": (("Finals decoded again without the previous text "
                                          "(the prompted decode failed a check)"),
                                          lambda: self.context_fallbacks),
        }

    def new_recognizer(self, session: str,
                       options: RecognizerOptions | None = None) -> WhisperRecognizer:
        return WhisperRecognizer(self, options or RecognizerOptions())

    def prompt_tokens(self, text: str) -> tuple[int, ...]:
        """A session's `prompt` as tokens: at most half the context room, its last ones
        (openai keeps the newest), so recent finals always fit after it."""
        if not self.context_tokens:
            return ()
        return initial_prompt(self.tokenizer, text, max(self.context_tokens // 2, 1))

    async def recognize(self, audio: np.ndarray, prefix: tuple[int, ...] = (),
                        final: bool = False, previous: tuple[int, ...] = ()) -> Decoded:
        spec = self.spec_for(len(audio), final)
        if len(audio) > spec.samples:
            log.warning("segment of %.1f s cut to the %.0f s bucket", len(audio) / SAMPLE_RATE,
                        spec.seconds)
        priority = FINAL_PRIORITY if final else 0
        rate = FINAL_TOKENS_PER_S if final else PARTIAL_TOKENS_PER_S
        job = Job(audio, prefix, rate, previous if spec in self.wide else ())
        return await self.engine.submit(self.kind(spec), job, priority)

    # -- worker thread

    def _run(self, spec: BucketSpec, items: list[Job]) -> list[Decoded]:
        """Engine batch function: one device call of the batch the engine padded to one of
        this bucket's sizes (its empty rows stop at once). All empty (warm-up): the wide
        shape (previous text) is compiled too."""
        if all(job is PAD for job in items) and self.wide.get(spec, spec) != spec:
            self._call(spec, items, wide=True)
        return self._call(spec, items)

    def _call(self, spec: BucketSpec, jobs: list[Job], wide: bool = False) -> list[Decoded]:
        """One device call. The bucket's wide shape when a row has previous text (or
        `wide`); rows without it are then padded: their prompt is today's, unmoved. The
        engine's empty rows stop at once (budget 1)."""
        if wide or any(job.previous for job in jobs):
            spec = self.wide[spec]
        rows = [Row(job.audio, job.prefix, job.previous, 1 if job is PAD else job.budget())
                for job in jobs]
        return decode_rows(self.params, spec, rows, sot_sequence=self.sot_sequence,
                           sot_prev=self.sot_prev)

    # -- text

    def piece(self, token: int) -> str:
        if token not in self._piece:
            self._piece[token] = self.tokenizer.decode([token])
        return self._piece[token]

    def words(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        """Groups tokens into words: a word starts at a token that begins with a space."""
        groups: list[list[int]] = []
        for t in tokens:
            if not groups or self.piece(t).startswith(" "):
                groups.append([t])
            else:
                groups[-1].append(t)
        return [tuple(g) for g in groups]

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    @staticmethod
    def tokens(words: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The token ids of `words`, in order (a decoder prefix)."""
        return tuple(t for w in words for t in w)

    def words_text(self, words: Sequence[tuple[int, ...]]) -> str:
        return self.text(self.tokens(words))

    def plain_words(self, words: Sequence[tuple[int, ...]]) -> list[str]:
        """Words lower-cased, without punctuation: what a case or comma change keeps."""
        return ["".join(c for c in self.text(w).lower() if c.isalnum()) for w in words]

    def cut_loop(self, words: list[tuple[int, ...]], keep: int) -> list[tuple[int, ...]]:
        """Drops a repetition loop at the end (compared on `plain_words`), never cutting
        into the first `keep` words."""
        norm = self.plain_words(words)
        cut = loop_start(norm, keep)
        if cut == len(norm) > 1:  # the token cap may have cut the loop's last word short
            shorter = loop_start(norm[:-1], keep)
            cut = shorter if shorter < len(norm) - 1 else cut
        return words[:cut]




def load_configured(name: str, key: str) -> Any:
    """The Whisper model `name` (empty: the embedded tiny.en) of the config key `key`;
    a failure is a ConfigError naming that key. -> models.registry.WhisperModel"""
    from models.checkpoint import ModelLoadError
    from models.registry import load_whisper

    try:
        return load_whisper(name or None)
    except ModelLoadError as exc:
        raise ConfigError(key, str(exc)) from exc


def create(config: Config, engine: Engine) -> WhisperPipeline:
    """Factory for `streamd serve`: loads `recognition.model` (default tiny.en)."""
    model = load_configured(config.recognition.model, "recognition.model")
    rec = config.recognition
    return WhisperPipeline(engine, model, max_segment_s=config.vad.max_segment_s,
                           beam_size=rec.beam_size, context=rec.context,
                           context_tokens=rec.context_tokens,
                           context_reset_s=rec.context_reset_s,
                           context_partials=rec.context_partials,
                           word_timestamps=rec.word_timestamps)

