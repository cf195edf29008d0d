"""Offline Whisper recognition of a whole recording: windows, length buckets, decoding.

Whisper sees at most 30 s at once. Longer audio is cut at the quietest point before each
30 s limit, so no word is split by a hard cut. Each window is encoded either padded to
30 s (as Whisper was trained) or padded only to the next length bucket, which costs a
fraction of the encoder's work on short audio; `bench/transcribe.py` measures what the
buckets do to the word error rate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from models import whisper
from models.mel import HOP_LENGTH, SAMPLE_RATE, log_mel
from models.registry import WhisperModel
from models.whisper_decoding import DecodeOptions, DecodeResult, WhisperDecoder, decode_segment

WINDOW_S = 30
# Encoder input lengths (seconds) for the bucketed window; every bucket compiles once.
# Shorter buckets than 10 s made tiny.en loop or repeat on short clips (bench/transcribe.py
# measures this).
BUCKETS_S: tuple[int, ...] = (10, 20, 30)
# Read speech runs at about 3-4 tokens a second; the cap per window keeps a decoder stuck
# in a repetition loop from running on to Whisper's 224-token limit.
MAX_TOKENS_PER_S = 7
MIN_TOKEN_CAP = 32
EncoderWindow = Literal["bucketed", "padded"]


def split_long_audio(
    audio: np.ndarray, max_s: float = WINDOW_S, search_s: float = 8.0
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields `(start_sample, window)` pieces of at most `max_s`; each cut is at the
    quietest 100 ms within the last `search_s` seconds before the limit."""
    max_len = int(max_s * SAMPLE_RATE)
    hop = SAMPLE_RATE // 10
    start = 0
    while len(audio) - start > max_len:
        lo = start + max_len - int(search_s * SAMPLE_RATE)
        region = audio[lo : start + max_len]
        n = len(region) // hop
        energy = np.square(region[: n * hop].reshape(n, hop)).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * hop + hop // 2
        yield start, audio[start:cut]
        start = cut
    if len(audio) > start:
        yield start, audio[start:]


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

    def __post_init__(self) -> None:
        self.base_options = DecodeOptions(beam_size=self.beam_size if self.beam_size > 1 else None)
        self.decoder = WhisperDecoder(self.model.config, self.model.config.max_target_positions)

    def window_samples(self, n_samples: int) -> int:
        """The static encoder input length for `n_samples` of audio."""
        if self.encoder_window == "padded":
            return WINDOW_S * SAMPLE_RATE
        for seconds in self.buckets_s:
            if n_samples <= seconds * SAMPLE_RATE:
                return seconds * SAMPLE_RATE
        return WINDOW_S * SAMPLE_RATE

    def encode(self, audio: np.ndarray) -> jax.Array:
        """One window [N <= 30 s] -> encoder output [1, T, D]."""
        n = self.window_samples(len(audio))
        padded = np.zeros((1, n), np.float32)
        padded[0, : len(audio)] = audio[:n]
        return _features_and_encode(
            self.model.params, jnp.asarray(padded), config=self.model.config, n_samples=n
        )

    def transcribe(self, audio: np.ndarray) -> str:
        texts = []
        for _, window in split_long_audio(np.asarray(audio, np.float32)):
            if len(window) < HOP_LENGTH * 2:
                continue
            result = self._decode(self.encode(window), self.window_samples(len(window)))
            if result.text.strip() and not result.no_speech:
                texts.append(result.text.strip())
        return " ".join(texts)

    def _decode(self, encoder_out: jax.Array, window_samples: int) -> DecodeResult:
        cap = MIN_TOKEN_CAP + MAX_TOKENS_PER_S * window_samples // SAMPLE_RATE
        options = dataclasses.replace(
            self.base_options, max_new_tokens=min(cap, self.base_options.max_new_tokens)
        )
        return decode_segment(
            self.decoder, self.model.params, self.model.tokenizer,
            encoder_out=encoder_out, options=options,
        )[0]  # fmt: skip

    def warmup(self, lengths: Sequence[int] | None = None) -> None:
        """Compiles the encoder shapes and the decoder that audio of `lengths` samples
        needs (default: every shape), so timings exclude compiles. Audio over 30 s is cut
        where it is quietest, so its last window can be any bucket: it gets every one."""
        every = {self.window_samples(s * SAMPLE_RATE) for s in (*self.buckets_s, WINDOW_S)}
        if lengths is None or any(n > WINDOW_S * SAMPLE_RATE for n in lengths):
            sizes = every
        else:
            sizes = {self.window_samples(n) for n in lengths if n >= HOP_LENGTH * 2}
        for n in sorted(sizes):
            self._decode(self.encode(np.zeros(n, np.float32)), n)
