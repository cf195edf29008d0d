"""Offline Whisper recognition of a whole recording: windows, length buckets, decoding.

Whisper sees at most 30 s at once, and was trained on speech zero-padded to 30 s. Two
things follow, both measured on the development set (tests/data/audio/dev, 119 files;
`python bench/transcribe.py`, table in the README):

- The speech must end inside the window with silence after it. A window whose speech
  runs to its last frame makes tiny.en say its last phrase again ("... i want to die in
  it i want to die in it"): 8 of 119 outputs, WER 13.8 % on 5-10 s files in 10 s buckets.
  So a bucket is only used when its last quarter stays silence (`TAIL_MARGIN`).
- Without timestamps, tiny.en often stops after the first sentences of a long window
  (37 words of the 174.8 s stream file, 12 of a 13.6 s file). Decoding with timestamps
  marks where each segment ends; a window whose last segment is incomplete (or cut by the
  token cap) goes on from the end of its last complete segment, as openai/whisper's
  `transcribe` does. Audio longer than 30 s is windowed at the quietest 100 ms before
  each 30 s limit, so a window rarely ends inside a word.

Each window is encoded padded only to the next length bucket (10 or 30 s): a third of
the encoder's work of a 30 s window on audio up to 7.5 s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from models.registry import WhisperModel
from models.whisper import model as whisper
from models.whisper import timing as whisper_timing
from models.whisper.decoding import DecodeOptions, DecodeResult, WhisperDecoder, decode_segment
from models.whisper.mel import HOP_LENGTH, SAMPLE_RATE, log_mel
from models.whisper.tokenizer import WhisperTokenizer

WINDOW_S = 30
# Encoder input lengths (seconds) for the bucketed window; every bucket compiles once.
# A bucket is an approximation of Whisper's 30 s window. Dev + shared sets (131 files,
# timestamps, tail margin; bench/transcribe.py): 10/30 s and 10/20/30 s both 5.57 %; the
# 20 s bucket changed a word against the 30 s window (10-20 s band 4.43 % vs 4.24 %, the
# 5-10 s band the other way by one word, 4.27 % vs 4.43 %) and costs a third compile:
# 10/30. Shorter buckets than 10 s made tiny.en loop on short clips (5/10/15/20/30 s:
# 21.2 % on the shared set).
BUCKETS_S: tuple[int, ...] = (10, 30)
# The fraction of a bucket that must stay silence after the audio (see the module
# docstring). Dev set, timestamps and seeking, WER (5-10 s band) / outputs with a
# repeated tail: margin 0: see README; 0.1: 6.04 % (3.96 %) / 0; 0.25: 6.07 % (4.13 %) / 0;
# 0.4: 6.07 % (4.30 %) / 0. Flat from 0.1 to 0.4; 0.25 keeps a margin on either side.
TAIL_MARGIN = 0.25
# Token cap per window: MIN_TOKEN_CAP + MAX_TOKENS_PER_S x window seconds (Whisper's own
# limit is 224). The fastest speech of the dev and shared sets is 7.3 tokens/s (LibriSpeech
# 61, upper-case reference tokens: more than Whisper writes), so a 10 s window's 102-token
# cap holds its 73 tokens and the timestamps; a decoder stuck in a loop stops early, and a
# segment the cap cuts is decoded again from its start in the next window (seeking).
MAX_TOKENS_PER_S = 7
MIN_TOKEN_CAP = 32
# Previous-text tokens after <|startofprev|>: Whisper's limit, half the text context - 1.
PROMPT_LIMIT = 223
EncoderWindow = Literal["bucketed", "padded"]


def window_for(n_samples: int, buckets_s: tuple[int, ...], tail_margin: float) -> int:
    """The smallest bucket (samples) whose last `tail_margin` of its length stays silence
    after `n_samples` of audio; the 30 s window when none does."""
    for seconds in buckets_s:
        if n_samples <= seconds * SAMPLE_RATE * (1.0 - tail_margin):
            return seconds * SAMPLE_RATE
    return WINDOW_S * SAMPLE_RATE


def _timestamp_pairs(tokens: list[int], timestamp_begin: int) -> tuple[list[int], bool]:
    """Where a timestamp pair splits two segments (the index of the pair's second token),
    and whether the decode ends with a single timestamp closing its last segment."""
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = len(tokens) >= 2 and is_ts[-2:] == [False, True]
    return [i for i in range(1, len(tokens)) if is_ts[i - 1] and is_ts[i]], single_ending


def timestamped_segments(tokens: list[int], tokenizer: WhisperTokenizer) -> tuple[list[int], int]:
    """Text tokens of the complete segments of a timestamped decode, and the samples of the
    window they consumed (0: the whole window; openai/whisper's `transcribe` rule).

    A segment is complete when its closing timestamp is followed by the next segment's
    opening one (a pair) or ends the decode (a single final timestamp). Text after the last
    pair, unless it ends with its own timestamp, is incomplete: dropped, and the window's
    use stops at that pair."""
    begin = tokenizer.timestamp_begin
    pairs, single_ending = _timestamp_pairs(tokens, begin)
    if not pairs or single_ending:
        return [t for t in tokens if t < tokenizer.eot], 0
    end = pairs[-1]
    consumed = (tokens[end - 1] - begin) * 2 * HOP_LENGTH  # a timestamp step is 2 mel frames
    return [t for t in tokens[:end] if t < tokenizer.eot], consumed


@dataclasses.dataclass(frozen=True)
class Word:
    """A recognized word: its text as decoded (with its leading space), its start and end
    in seconds from the audio start, and the mean probability of its tokens."""

    word: str
    start: float
    end: float
    probability: float


@dataclasses.dataclass(frozen=True)
class Segment:
    """A span Whisper closed with timestamps: seconds from the audio start, its text
    (stripped) and, when asked for, its words."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()


def split_segments(
    tokens: list[int], tokenizer: WhisperTokenizer, window_s: float
) -> list[tuple[float, float, list[int]]]:
    """The segments of one timestamped decode as (start s, end s, text tokens), times from
    the window start; the spans `timestamped_segments` keeps (openai/whisper's rule).

    Each timestamp pair splits two segments; a decode that ends with a single timestamp
    closes its last segment there. Without a pair, the window is one segment that ends at
    its last timestamp (or the window's end, when there is none)."""
    begin, step = tokenizer.timestamp_begin, 2 * HOP_LENGTH / SAMPLE_RATE
    cuts, single_ending = _timestamp_pairs(tokens, begin)
    if not cuts:
        stamps = [t for t in tokens if t >= begin]
        end = (stamps[-1] - begin) * step if stamps and stamps[-1] > begin else window_s
        return [(0.0, min(end, window_s), [t for t in tokens if t < tokenizer.eot])]
    if single_ending:
        cuts.append(len(tokens))
    spans, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        start = (piece[0] - begin) * step if piece[0] >= begin else 0.0
        end = (piece[-1] - begin) * step if piece[-1] >= begin else window_s
        # A bucket pads the window: a timestamp can point past the audio.
        spans.append((min(start, window_s), min(end, window_s),
                      [t for t in piece if t < tokenizer.eot]))
        last = cut
    return spans


def initial_prompt(tokenizer: WhisperTokenizer, text: str, limit: int) -> tuple[int, ...]:
    """Whisper's `initial_prompt` (names, jargon) as tokens: whitespace collapsed, read as
    words (a leading space), its last `limit` (>= 1) tokens, as openai keeps the newest."""
    text = " ".join(text.split())
    return tuple(tokenizer.encode(" " + text))[-limit:] if text else ()


def previous_text(initial: tuple[int, ...], history: Sequence[int],
                  limit: int) -> tuple[int, ...]:
    """A decode's previous-text prompt of at most `limit` tokens: the initial prompt, then
    the newest `history` (recent text tokens) that fit."""
    room = limit - len(initial)
    return initial + (tuple(history[-room:]) if room > 0 and history else ())


def quietest_cut(audio: np.ndarray, start: int, max_len: int, search_s: float = 8.0) -> int:
    """The middle of the quietest 100 ms within the last `search_s` seconds before
    `start + max_len`: where a window of long audio ends without splitting a word."""
    hop = SAMPLE_RATE // 10
    lo = start + max_len - int(search_s * SAMPLE_RATE)
    region = audio[lo : start + max_len]
    n = len(region) // hop
    energy = np.square(region[: n * hop].reshape(n, hop)).mean(axis=1)
    return lo + int(np.argmin(energy)) * hop + hop // 2


@functools.partial(jax.jit, static_argnames=("config", "n_samples"))
def _features_and_encode(
    params: whisper.Params, audio: jax.Array, *, config: whisper.WhisperConfig, n_samples: int
) -> jax.Array:
    """audio float32 [B, n_samples] -> encoder output [B, n_samples // 320, D]."""
    mel = log_mel(audio, config.n_mels)
    return whisper.encode(params, config, mel)


@dataclasses.dataclass
class WhisperTranscriber:
    """Transcribes 16 kHz mono audio of any length with a loaded Whisper."""

    model: WhisperModel
    beam_size: int = 1
    encoder_window: EncoderWindow = "bucketed"
    buckets_s: tuple[int, ...] = BUCKETS_S
    timestamps: bool = True
    tail_margin: float = TAIL_MARGIN
    quiet_cuts: bool = True
    # Windows after the first are decoded with the text before them as a <|startofprev|>
    # prompt (openai's `condition_on_previous_text`); reset after a window that fell back
    # above temperature 0.5, as openai.
    context: bool = False
    # Whisper's `initial_prompt` (names, jargon): before the previous text of every window
    # (openai's `carry_initial_prompt`), at most half of the prompt's room.
    prompt: str = ""

    def __post_init__(self) -> None:
        self.base_options = DecodeOptions(
            beam_size=self.beam_size if self.beam_size > 1 else None, timestamps=self.timestamps
        )
        self.decoder = WhisperDecoder(self.model.config, self.model.config.max_target_positions)
        self.initial = initial_prompt(self.model.tokenizer, self.prompt, PROMPT_LIMIT // 2)

    def previous(self, history: list[int]) -> tuple[int, ...]:
        """The prompt of the next window: the initial prompt, then the newest history."""
        return previous_text(self.initial, history, PROMPT_LIMIT)

    def window_samples(self, n_samples: int) -> int:
        """The static encoder input length for `n_samples` of audio."""
        if self.encoder_window == "padded":
            return WINDOW_S * SAMPLE_RATE
        return window_for(n_samples, self.buckets_s, self.tail_margin)

    def encode(self, audio: np.ndarray, n: int | None = None) -> jax.Array:
        """One window [N <= 30 s] -> encoder output [1, T, D] of its bucket (or of `n`)."""
        n = n or self.window_samples(len(audio))
        padded = np.zeros((1, n), np.float32)
        padded[0, : len(audio)] = audio[:n]
        return _features_and_encode(
            self.model.params, jnp.asarray(padded), config=self.model.config, n_samples=n
        )

    def transcribe(self, audio: np.ndarray) -> str:
        """The text of `transcribe_segments`, segments joined by spaces."""
        return " ".join(segment.text for segment in self.transcribe_segments(audio))

    def transcribe_segments(
        self, audio: np.ndarray, *, word_timestamps: bool = False
    ) -> list[Segment]:
        """openai/whisper's long-form loop: decode a window with timestamps, keep its
        complete segments, and go on from the end of the last complete one (a segment the
        window cut short, or one the token cap cut, is decoded again in the next window).
        Without timestamps every window is kept whole, as one segment."""
        audio = np.asarray(audio, np.float32)
        segments: list[Segment] = []
        history: list[int] = []  # text tokens since the last prompt reset (context on)
        seek = 0
        window_max = WINDOW_S * SAMPLE_RATE
        tokenizer = self.model.tokenizer
        while len(audio) - seek >= HOP_LENGTH * 2:
            end = min(len(audio), seek + window_max)
            if end < len(audio) and self.quiet_cuts:
                end = quietest_cut(audio, seek, window_max)
            window = audio[seek:end]
            size = self.window_samples(len(window))
            encoded = self.encode(window, size)
            result = self._decode(encoded, size, self.previous(history))
            text_ids, consumed = timestamped_segments(result.tokens, tokenizer)
            if not result.no_speech:
                offset, window_s = seek / SAMPLE_RATE, len(window) / SAMPLE_RATE
                texts = [(start, stop, ids, tokenizer.decode(ids).strip()) for start, stop, ids
                         in split_segments(result.tokens, tokenizer, window_s)]  # fmt: skip
                texts = [span for span in texts if span[3]]
                if word_timestamps:
                    spans = [(start, stop, ids) for start, stop, ids, _ in texts]
                    segments += self._timed_segments(encoded, len(window), spans, offset,
                                                     segments[-1].end if segments else 0.0)
                else:
                    segments += [Segment(offset + start, offset + stop, text)
                                 for start, stop, _, text in texts]
                if self.context and tokenizer.decode(text_ids).strip():
                    history += text_ids
            if result.temperature > 0.5:
                history = []  # a poor window must not prompt the next one (openai)
            seek += consumed if 0 < consumed < len(window) else len(window)
        return segments

    def align(self, audio: np.ndarray, text_ids: Sequence[int]) -> tuple[Word, ...]:
        """Word timings (seconds from the audio start) of known text tokens over audio of
        at most 30 s: the daemon's finals, decoded elsewhere, get their words here."""
        audio = np.asarray(audio[: WINDOW_S * SAMPLE_RATE], np.float32)
        ids = [t for t in text_ids if t < self.model.tokenizer.eot]
        if not ids:
            return ()
        size = self.window_samples(len(audio))
        span = [(0.0, len(audio) / SAMPLE_RATE, ids)]
        return self._timed_segments(self.encode(audio, size), len(audio), span, 0.0, 0.0)[0].words

    def _timed_segments(
        self, encoded: jax.Array, n_samples: int, spans: list[tuple[float, float, list[int]]],
        offset: float, last_speech: float,
    ) -> list[Segment]:
        """The window's segments with their words (whisper_timing). A segment spans its
        words, as openai's; words never start before the previous one ends."""
        tokenizer = self.model.tokenizer
        prefix = tokenizer.sot_sequence(self.base_options.language, self.base_options.task)
        heads = self.model.alignment_heads or whisper_timing.default_heads(self.model.config)
        timed = whisper_timing.window_words(
            self.model.params, self.model.config, tokenizer, heads, encoded,
            n_samples // (2 * HOP_LENGTH), spans, prefix, last_speech - offset,
        )  # fmt: skip
        segments: list[Segment] = []
        for (start, stop, ids), words in zip(spans, timed, strict=True):
            kept: list[Word] = []
            for w in words:
                floor = kept[-1].end if kept else (segments[-1].end if segments else last_speech)
                begin = max(round(offset + w.start, 2), floor)
                kept.append(Word(w.word, begin, max(round(offset + w.end, 2), begin),
                                 w.probability))
            if kept:
                start, stop = kept[0].start - offset, kept[-1].end - offset
            segments.append(Segment(offset + start, offset + stop,
                                    tokenizer.decode(ids).strip(), tuple(kept)))
        return segments

    def _decode(self, encoder_out: jax.Array, window_samples: int,
                previous: tuple[int, ...] = ()) -> DecodeResult:
        cap = MIN_TOKEN_CAP + MAX_TOKENS_PER_S * window_samples // SAMPLE_RATE
        options = dataclasses.replace(
            self.base_options, max_new_tokens=min(cap, self.base_options.max_new_tokens)
        )
        if previous:  # one prompt shape for previous text of any length
            sot = self.model.tokenizer.sot_sequence(timestamps=self.timestamps)
            options = dataclasses.replace(options, prompt_width=1 + PROMPT_LIMIT + len(sot))
        return decode_segment(
            self.decoder, self.model.params, self.model.tokenizer,
            encoder_out=encoder_out, options=options, previous=[previous] if previous else None,
        )[0]  # fmt: skip

    def warmup(self, lengths: Sequence[int] | None = None) -> None:
        """Compiles the encoder shapes and the decoder that audio of `lengths` samples
        needs (default: every shape), so timings exclude compiles. Audio of up to 30 s
        gets its own bucket: a smaller one is needed only when decoding seeks past a cut
        segment, and then loads from the compilation cache on first use (each shape costs
        about 1 s to trace and load even when cached: warming only its own bucket took
        jfk.wav's second run from 7.2 to 6.4 s, bench/results/startup.json). Audio over
        30 s is windowed at quiet points: every bucket. With context or a prompt, the shape
        with a previous-text prompt too."""
        every = [WINDOW_S] if self.encoder_window == "padded" else [*self.buckets_s, WINDOW_S]
        sizes = {s * SAMPLE_RATE for s in every}
        if lengths is not None and all(n <= WINDOW_S * SAMPLE_RATE for n in lengths):
            sizes = {self.window_samples(n) for n in lengths if n >= HOP_LENGTH * 2}
        for n in sorted(sizes):
            encoded = self.encode(np.zeros(n, np.float32), n)
            self._decode(encoded, n)
            if self.context or self.initial:  # the shape with a previous-text prompt
                self._decode(encoded, n, (self.model.tokenizer.eot - 1,))
