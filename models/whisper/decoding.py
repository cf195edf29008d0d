"""Whisper decoding on top of the generic search engine (models/decoding.py).

Adds what Whisper users expect around the search: the start prompt (SOT, language and
task for multilingual models, `<|notimestamps|>` unless timestamps are asked for), the
model's suppress lists, Whisper's timestamp rules as a logit filter, and openai/whisper's
guards against hallucination: the no-speech probability (at the SOT position of the
prompt), the average log-probability and the compression ratio of the text, with a
fallback to higher temperatures when a result looks like a repetition loop.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from models.whisper import model as whisper
from models.whisper.tokenizer import WhisperTokenizer


@dataclasses.dataclass(frozen=True)
class WhisperDecoder:
    """`IncrementalDecoder` for models/whisper/model.py: a cache of `max_len` tokens."""

    config: whisper.WhisperConfig
    max_len: int

    def init_cache(self, batch: int) -> whisper.DecoderCache:
        return whisper.init_cache(self.config, batch, self.max_len)

    def step(
        self, params: Any, cache: Any, cross: Any, tokens: jax.Array, num_valid: jax.Array,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        return whisper.decode(params, self.config, cache, cross, tokens, num_valid, logits_at)


@dataclasses.dataclass(frozen=True)
class TimestampRules:
    """Whisper's timestamp grammar (openai/whisper `ApplyTimestampRules`, transformers
    `WhisperTimeStampLogitsProcessor`), vectorized over rows:

    - never `<|notimestamps|>`; the first token is a timestamp <= max_initial_timestamp;
    - timestamps come in pairs: after a lone timestamp, only a timestamp or the end token;
      after a pair (or a timestamp at the start), only text;
    - timestamps do not decrease (and a pair's end does not repeat);
    - when the timestamps' total probability beats every single text token, a timestamp.
    """

    eot: int
    no_timestamps: int
    max_initial_timestamp_index: int | None = 50  # 50 x 20 ms = 1.0 s, as openai

    def __call__(self, logits: jax.Array, generated: jax.Array, t: jax.Array) -> jax.Array:
        ts_begin = self.no_timestamps + 1
        vocab = jnp.arange(logits.shape[-1])
        is_ts_id = vocab >= ts_begin
        logits = logits.at[:, self.no_timestamps].set(-jnp.inf)

        last = generated[:, jnp.maximum(t - 1, 0)]
        penult = generated[:, jnp.maximum(t - 2, 0)]
        last_ts = (t >= 1) & (last >= ts_begin)  # [B]
        penult_ts = (t < 2) | (penult >= ts_begin)
        ban = jnp.where((last_ts & penult_ts)[:, None], is_ts_id, False)
        ban |= jnp.where((last_ts & ~penult_ts)[:, None], vocab < self.eot, False)

        # The rule keeps timestamps non-decreasing, so the last one is the largest.
        seen = (jnp.arange(generated.shape[1]) < t) & (generated >= ts_begin)
        latest = jnp.max(jnp.where(seen, generated, ts_begin - 1), axis=1)  # [B]
        floor = jnp.where(seen.any(1), latest + jnp.where(last_ts & ~penult_ts, 0, 1), ts_begin)
        ban |= is_ts_id & (vocab < floor[:, None])

        first = jnp.logical_not(is_ts_id)
        if self.max_initial_timestamp_index is not None:
            first |= vocab > ts_begin + self.max_initial_timestamp_index
        ban |= (t == 0) & first
        logits = jnp.where(ban, -jnp.inf, logits)

        logprobs = jax.nn.log_softmax(logits, axis=-1)
        ts_mass = jax.nn.logsumexp(jnp.where(is_ts_id, logprobs, -jnp.inf), axis=-1)
        best_text = jnp.max(jnp.where(is_ts_id, -jnp.inf, logprobs), axis=-1)
        force_ts = (ts_mass > best_text)[:, None] & ~is_ts_id
        return jnp.where(force_ts, -jnp.inf, logits)


@dataclasses.dataclass(frozen=True)
class NoSpeechProbe:
    """Probability of `<|nospeech|>` at each row's SOT position (before any filter); the
    SOT follows a `<|startofprev|>` prompt when there is one (as openai/whisper)."""

    sot: int
    no_speech: int

    def position(self, prompt: jax.Array, prompt_len: jax.Array) -> jax.Array:
        return jnp.argmax(prompt == self.sot, axis=1)

    def __call__(self, logits: jax.Array) -> jax.Array:
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, self.no_speech]


# openai/whisper `transcribe`'s checks of a decode, the only definition of them: both
# `streamd transcribe` (decode_segment) and the daemon's whisper pipeline judge by these.
COMPRESSION_RATIO_THRESHOLD = 2.4
LOGPROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to decode one segment. Defaults follow openai/whisper's `transcribe`."""

    task: str = "transcribe"
    language: str | None = None  # multilingual models only; None -> "en"
    timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    beam_size: int | None = None  # None: greedy at temperature 0
    length_penalty: float = 1.0
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD
    logprob_threshold: float | None = LOGPROB_THRESHOLD
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD
    max_new_tokens: int = 224  # openai's sample_len: half the text context
    suppress_tokens: tuple[int, ...] | None = None  # None: the model config's list
    suppress_blank: bool = True  # begin-suppress the config's list (" " and the end token)
    # Also never the special tokens (SOT, <|startofprev|>, task, language, no-speech) nor,
    # without `timestamps`, a timestamp: for decodes that go on after a forced prefix.
    suppress_special: bool = False
    # The end token allowed as the first generated token (after a forced prefix, ending
    # at once is legitimate).
    end_at_begin: bool = False
    renormalize: bool = True  # log-softmax after filters (openai); False as transformers
    seed: int = 0
    # Pad prompts to at least this width: previous text of any length then shares one
    # compiled shape (None: as wide as the longest row).
    prompt_width: int | None = None


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """One segment's decode. tokens: generated ids before the end token (timestamps
    included when asked for); avg_logprob: sum of log-probs (end token included) over
    len(tokens) + 1; no_speech: the no-speech test says silence (callers usually drop it)."""

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    no_speech: bool


def compression_ratio(text: str) -> float:
    """Bytes of `text` over bytes of its zlib compression: high for repetition loops."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def repetitive(text: str, options: DecodeOptions = DecodeOptions()) -> bool:
    """The text compresses too well: a repetition loop (openai's compression check)."""
    limit = options.compression_ratio_threshold
    return limit is not None and compression_ratio(text) > limit


def low_logprob(avg_logprob: float, options: DecodeOptions = DecodeOptions()) -> bool:
    limit = options.logprob_threshold
    return limit is not None and avg_logprob < limit


def no_speech_likely(no_speech_prob: float, options: DecodeOptions = DecodeOptions()) -> bool:
    limit = options.no_speech_threshold
    return limit is not None and no_speech_prob > limit


def silent(no_speech_prob: float, avg_logprob: float,
           options: DecodeOptions = DecodeOptions()) -> bool:
    """openai's no-speech test: `<|nospeech|>` likely and the text unlikely."""
    return no_speech_likely(no_speech_prob, options) and low_logprob(avg_logprob, options)


def logit_filters(
    config: whisper.WhisperConfig, tokenizer: WhisperTokenizer, options: DecodeOptions
) -> tuple[decoding.LogitFilter, ...]:
    """The suppress lists (the model config's, or the options'), the begin-suppress list
    and, with timestamps, Whisper's timestamp rules."""
    suppress = set(
        config.suppress_tokens if options.suppress_tokens is None else options.suppress_tokens
    )
    if options.suppress_special:
        tok = tokenizer
        suppress |= {tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech, tok.translate,
                     tok.transcribe, tok.no_timestamps, *tok.languages.values()}
        if not options.timestamps:
            suppress |= set(range(tok.timestamp_begin, config.vocab_size))
    filters: list[decoding.LogitFilter] = [decoding.SuppressTokens(tuple(sorted(suppress)))]
    begin = tuple(t for t in config.begin_suppress_tokens
                  if not (options.end_at_begin and t == tokenizer.eot))
    if options.suppress_blank and begin:
        filters.append(decoding.SuppressAtBegin(begin))
    if options.timestamps:
        initial = options.max_initial_timestamp
        filters.append(
            TimestampRules(
                eot=tokenizer.eot,
                no_timestamps=tokenizer.no_timestamps,
                max_initial_timestamp_index=None if initial is None else round(initial / 0.02),
            )
        )
    return tuple(filters)


def _prompts(
    tokenizer: WhisperTokenizer,
    options: DecodeOptions,
    batch: int,
    prefixes: Sequence[Sequence[int]] | None,
    previous: Sequence[Sequence[int]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """[<|startofprev|> previous...] SOT-sequence [prefix...] per row, padded: (prompt, len)."""
    sot_seq = tokenizer.sot_sequence(options.language, options.task, options.timestamps)
    rows = []
    for b in range(batch):
        prev = list(previous[b]) if previous and previous[b] else []
        head = [tokenizer.sot_prev, *prev] if prev else []
        rows.append(head + sot_seq + (list(prefixes[b]) if prefixes else []))
    lengths = np.array([len(r) for r in rows], np.int32)
    width = max(int(lengths.max()), options.prompt_width or 0)
    prompt = np.full((batch, width), tokenizer.eot, np.int32)
    for b, r in enumerate(rows):
        prompt[b, : len(r)] = r
    return prompt, lengths


def decode_segment(
    decoder: WhisperDecoder,
    params: Any,
    tokenizer: WhisperTokenizer,
    *,
    mel: jax.Array | None = None,
    encoder_out: jax.Array | None = None,
    encoder_mask: jax.Array | None = None,
    options: DecodeOptions = DecodeOptions(),
    prefixes: Sequence[Sequence[int]] | None = None,
    previous: Sequence[Sequence[int]] | None = None,
) -> list[DecodeResult]:
    """Decodes a batch of segments, one result per row.

    Give `mel` float [B, n_mels, frames] (encoded here) or `encoder_out` [B, T, D] with an
    optional `encoder_mask` bool [B, T]. `prefixes`: per-row tokens already committed
    (prefilled after the SOT sequence, not returned again); `previous`: per-row earlier
    text as a `<|startofprev|>` prompt. Rows that fail the compression-ratio or
    avg-logprob checks are decoded again at the next temperature (the whole batch is rerun,
    keeping shapes static); rows judged silent are not retried.
    """
    config = decoder.config
    if encoder_out is None:
        if mel is None:
            raise ValueError("give mel or encoder_out")
        encoder_out = whisper.encode(params, config, jnp.asarray(mel))
    cross = whisper.cross_kv(params, config, encoder_out, encoder_mask)
    batch = encoder_out.shape[0]
    prompt, prompt_len = _prompts(tokenizer, options, batch, prefixes, previous)
    max_new = min(options.max_new_tokens, decoder.max_len - prompt.shape[1])
    common = dict(
        eot=tokenizer.eot, max_new_tokens=max_new, prompt_len=prompt_len,
        filters=logit_filters(config, tokenizer, options), renormalize=options.renormalize,
        probe=NoSpeechProbe(tokenizer.sot, tokenizer.no_speech),
    )  # fmt: skip

    results: list[DecodeResult | None] = [None] * batch
    pending = list(range(batch))
    key = jax.random.PRNGKey(options.seed)
    for i, temperature in enumerate(options.temperatures):
        if temperature == 0 and options.beam_size:
            out = decoding.beam_search(
                decoder, params, cross, prompt, beams=options.beam_size,
                length_penalty=options.length_penalty, **common,
            )  # fmt: skip
        else:
            out = decoding.greedy_search(
                decoder, params, cross, prompt, temperature=temperature,
                key=jax.random.fold_in(key, i), **common,
            )  # fmt: skip
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        sum_lp, no_speech = np.asarray(out.sum_logprobs), np.asarray(out.probe)
        last = i == len(options.temperatures) - 1
        for b in list(pending):
            ids = tokens[b, : lengths[b]].tolist()
            text = tokenizer.decode(ids)
            avg_lp = float(sum_lp[b]) / (len(ids) + 1)
            quiet = silent(float(no_speech[b]), avg_lp, options)
            results[b] = DecodeResult(
                tokens=ids, text=text, avg_logprob=avg_lp, no_speech_prob=float(no_speech[b]),
                compression_ratio=compression_ratio(text), temperature=float(temperature),
                no_speech=quiet,
            )  # fmt: skip
            if quiet or not (repetitive(text, options) or low_logprob(avg_lp, options)) or last:
                pending.remove(b)
        if not pending:
            break
    return [r for r in results if r is not None]
