"""Bucketed batch recognition for streaming: one jitted device call per (bucket, batch
size) runs log-mel, the encoder, cross-attention K/V, the prompt's prefill and the token
loop for a batch of zero-padded segments (`recognize_batch`); `decode_rows` packs rows
(audio, committed prefix, previous text, token budget) into that call's static shapes
and reads the results back (`Decoded`, judged by models/whisper/decoding.py's checks).
The daemon's whisper pipeline (streamd/pipelines/whisper.py) owns the policy around it:
buckets, budgets, batching through the engine, agreement and context.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from models.decoding import SearchResult, beam_search, greedy_search
from models.whisper import model as whisper
from models.whisper.decoding import (
    NoSpeechProbe,
    WhisperDecoder,
    low_logprob,
    no_speech_likely,
    repetitive,
    silent,
)
from models.whisper.mel import SAMPLE_RATE, log_mel


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Everything static about one compiled call (hashable: a jit static argument)."""

    config: whisper.WhisperConfig
    samples: int  # audio samples of this bucket
    prompt_width: int  # SOT sequence + room for committed tokens
    max_new_tokens: int
    eot: int
    filters: tuple[Any, ...]
    probe: NoSpeechProbe
    beams: int = 1
    # Positions before the SOT sequence for `<|startofprev|>` + previous text (0: none).
    context_width: int = 0

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


@functools.partial(jax.jit, static_argnames="spec")
def recognize_batch(
    params: Any, audio: jax.Array, prompt: jax.Array, prompt_len: jax.Array,
    budget: jax.Array, spec: BucketSpec,
) -> SearchResult:
    """audio float32 [B, spec.samples] (zero-padded), prompt int32 [B, P] with
    P = spec.context_width + spec.prompt_width, prompt_len [B], budget int32 [B] (most new
    tokens per row; greedy only, beams run to their end)
    -> SearchResult (tokens [B, T] after the prompt; probe = no-speech probability [B]).

    One compile per (spec, B). The encoder sees the whole padded bucket (as Whisper sees
    its zero-padded 30 s window), so no encoder mask is needed.
    """
    cfg = spec.config
    enc = whisper.encode(params, cfg, log_mel(audio, cfg.n_mels))
    cross = whisper.cross_kv(params, cfg, enc, None)
    decoder = WhisperDecoder(cfg, spec.context_width + spec.prompt_width + spec.max_new_tokens)
    common: dict[str, Any] = dict(eot=spec.eot, max_new_tokens=spec.max_new_tokens,
                                  prompt_len=prompt_len, filters=spec.filters, probe=spec.probe)
    if spec.beams > 1:
        return beam_search(decoder, params, cross, prompt, beams=spec.beams, **common)
    return greedy_search(decoder, params, cross, prompt, token_budget=budget, **common)


@dataclasses.dataclass(frozen=True)
class Decoded:
    tokens: tuple[int, ...]  # generated tokens after the prompt, end token excluded
    avg_logprob: float  # over the generated tokens, end token included (openai's measure)
    no_speech_prob: float

    @property
    def silent(self) -> bool:
        return silent(self.no_speech_prob, self.avg_logprob)

    def fails(self, text: str) -> bool:
        """openai/whisper's fallback tests (any one): a repetitive text, a low average
        log-probability, or likely no speech. A final decoded after previous text that
        fails is decoded again without it."""
        return (repetitive(text) or low_logprob(self.avg_logprob)
                or no_speech_likely(self.no_speech_prob))


@dataclasses.dataclass(frozen=True)
class Row:
    """One segment of a batch: audio [N] float32 (cut to the bucket), the tokens forced
    after the SOT sequence (`prefix`), the previous text before it (`previous`, newest
    last; only in a shape with `context_width`) and the most new tokens (`budget`)."""

    audio: np.ndarray
    prefix: tuple[int, ...] = ()
    previous: tuple[int, ...] = ()
    budget: int = 1


def decode_rows(params: Any, spec: BucketSpec, rows: Sequence[Row], *,
                sot_sequence: tuple[int, ...], sot_prev: int) -> list[Decoded]:
    """One device call of `spec` for len(rows) rows (a compiled batch size). A row's
    prompt is `[<|startofprev|> previous...] SOT-sequence prefix...`, the newest previous
    tokens that fit the shape, last (as openai)."""
    batch = len(rows)
    audio = np.zeros((batch, spec.samples), np.float32)
    prompt = np.full((batch, spec.context_width + spec.prompt_width), spec.eot, np.int32)
    prompt_len = np.zeros(batch, np.int32)
    budget = np.ones(batch, np.int32)
    for i, row in enumerate(rows):
        clip = row.audio[: spec.samples]
        audio[i, : len(clip)] = clip
        body = (sot_sequence + row.prefix)[: spec.prompt_width]
        fit = min(spec.context_width + spec.prompt_width - len(body) - 1, len(row.previous))
        head: tuple[int, ...] = ()
        if fit > 0:
            head = (sot_prev, *row.previous[-fit:])
        tokens = head + body
        prompt[i, : len(tokens)] = tokens
        prompt_len[i] = len(tokens)
        budget[i] = row.budget
    res = jax.device_get(recognize_batch(params, audio, prompt, prompt_len, budget, spec))
    decoded = []
    for i in range(batch):
        n = int(res.lengths[i])
        decoded.append(Decoded(
            tokens=tuple(int(t) for t in res.tokens[i, :n]),
            avg_logprob=float(res.sum_logprobs[i]) / (n + 1),
            no_speech_prob=float(res.probe[i]),
        ))
    return decoded
