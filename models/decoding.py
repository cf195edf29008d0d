"""One incremental search engine for every autoregressive decoder (Whisper, Speech2Text,
wav2vec2 + text decoder): greedy / sampling and beam search over a fixed-size KV cache.

The model side is a small protocol (`IncrementalDecoder`): a cache constructor and a
jittable `step`. Token rules live in separate logit filters (`SuppressTokens`,
`SuppressAtBegin`, `ForceTokens`, family-specific ones elsewhere), as in openai/whisper's
decoding.py. The prompt is prefilled in one decoder call; then each search runs its whole
token loop inside one jitted `lax.while_loop`, so a search costs one host round trip, not
one per token.

Shapes are static: the batch (inputs x beams), the padded prompt width P and
`max_new_tokens` T are part of the compiled program; prompts shorter than P are padded and
their lengths passed as `prompt_len`. Every distinct (decoder, filters, probe, P, T, batch,
beams, length_penalty, renormalize) is one compile.

Scores follow transformers: a finished hypothesis scores sum(log p) / n ** length_penalty,
n counting the generated tokens including the end token; beam search keeps 2N candidates
per step, finalizes end-token candidates ranked in the top N, and stops when N hypotheses
are finished (transformers' `early_stopping=True`) or T tokens were generated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_NEG = -1.0e9  # transformers' "impossible" score offset; finite so sums stay ordered


class IncrementalDecoder(Protocol):
    """What a model provides to the search. Must be hashable (it is a static jit argument):
    a frozen dataclass holding the model config is the intended shape."""

    @property
    def max_len(self) -> int:
        """Cache length: prompt width + generated tokens must fit (read-only: a frozen
        dataclass field satisfies it)."""
        ...

    def init_cache(self, batch: int) -> Any:
        """A zeroed cache pytree, every leaf batch-first (the search reorders beams by
        gathering axis 0)."""
        ...

    def step(
        self, params: Any, cache: Any, cross: Any, tokens: jax.Array, num_valid: jax.Array,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """tokens int32 [B, S], num_valid int32 [B] -> (logits float [B, S, V], cache).
        Appends the first num_valid tokens of each row to its cache. `logits_at` int32
        [B, K] (indices into S): logits [B, K, V] at those positions only (the prefill
        needs two of a long prompt's positions; the vocabulary projection of the others is
        most of its cost)."""
        ...


class LogitFilter(Protocol):
    """A token rule: `(logits [B, V], generated int32 [B, T], t int32 []) -> logits`.

    `generated[:, :t]` are the tokens chosen so far (for beams, those of each beam row);
    `t` is the index of the token being chosen. Must be jittable and hashable.
    """

    def __call__(self, logits: jax.Array, generated: jax.Array, t: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class SuppressTokens:
    """Never emit these ids."""

    ids: tuple[int, ...]

    def __call__(self, logits: jax.Array, generated: jax.Array, t: jax.Array) -> jax.Array:
        if not self.ids:
            return logits
        return logits.at[:, np.asarray(self.ids)].set(-jnp.inf)


@dataclasses.dataclass(frozen=True)
class SuppressAtBegin:
    """Do not start with these ids (e.g. Whisper's blank " " and end token)."""

    ids: tuple[int, ...]

    def __call__(self, logits: jax.Array, generated: jax.Array, t: jax.Array) -> jax.Array:
        if not self.ids:
            return logits
        return jnp.where(t == 0, logits.at[:, np.asarray(self.ids)].set(-jnp.inf), logits)


@dataclasses.dataclass(frozen=True)
class ForceTokens:
    """Emit `ids` as the first generated tokens, whatever the model prefers."""

    ids: tuple[int, ...]

    def __call__(self, logits: jax.Array, generated: jax.Array, t: jax.Array) -> jax.Array:
        if not self.ids:
            return logits
        forced = jnp.asarray(self.ids, jnp.int32)[jnp.minimum(t, len(self.ids) - 1)]
        others = jnp.arange(logits.shape[-1]) != forced
        return jnp.where((t < len(self.ids)) & others, -jnp.inf, logits)


class Probe(Protocol):
    """Reads the prefill's logits at one prompt position per row (e.g. Whisper's
    no-speech probability at SOT). Must be jittable and hashable."""

    def position(self, prompt: jax.Array, prompt_len: jax.Array) -> jax.Array:
        """prompt int32 [B, P], prompt_len int32 [B] -> the position read, int32 [B]."""
        ...

    def __call__(self, logits: jax.Array) -> Any:
        """logits [B, V] at `position` -> any pytree (SearchResult.probe)."""
        ...


@struct.dataclass
class SearchResult:
    """Best hypothesis per input.

    tokens: int32 [B, T] generated tokens (end token and padding after `lengths`);
    lengths: int32 [B] tokens before the end token (T if none); sum_logprobs: float32 [B]
    (the end token's included); scores: float32 [B] the ranking score; finished: bool [B]
    True if the end token was produced; probe: whatever the prefill probe returned.
    """

    tokens: jax.Array
    lengths: jax.Array
    sum_logprobs: jax.Array
    scores: jax.Array
    finished: jax.Array
    probe: Any = None


def _apply_filters(
    filters: Sequence[LogitFilter],
    logits: jax.Array,
    generated: jax.Array,
    t: jax.Array,
    renormalize: bool,
) -> tuple[jax.Array, jax.Array]:
    """(scores to rank by, log-probabilities to accumulate), both [B, V].

    renormalize=True (openai/whisper): filter the logits, then log-softmax, so removed
    tokens' mass is spread over the rest. False (transformers): log-softmax first, then
    filter, so log-probs are those of the unfiltered model.
    """
    x = logits.astype(jnp.float32)
    if renormalize:
        for f in filters:
            x = f(x, generated, t)
        return x, jax.nn.log_softmax(x, axis=-1)
    x = jax.nn.log_softmax(x, axis=-1)
    for f in filters:
        x = f(x, generated, t)
    return x, x


def _prefill(decoder, params, cross, prompt, prompt_len, probe):
    """Runs the prompt through a fresh cache; returns logits at each row's last prompt
    token [B, V], the cache and the probe's reading. Logits are computed at those two
    positions only, not over the whole prompt."""
    cache = decoder.init_cache(prompt.shape[0])
    at = [prompt_len - 1]
    if probe is not None:
        at.append(probe.position(prompt, prompt_len).astype(jnp.int32))
    logits, cache = decoder.step(params, cache, cross, prompt, prompt_len,
                                 logits_at=jnp.stack(at, axis=1))
    probed = probe(logits[:, 1]) if probe is not None else None
    return logits[:, 0], cache, probed


def _lengths(tokens: jax.Array, eot: int) -> jax.Array:
    is_end = tokens == eot
    return jnp.where(is_end.any(-1), jnp.argmax(is_end, -1), tokens.shape[-1]).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "filters", "probe", "max_new_tokens", "eot", "renormalize"),
)
def _greedy(params, cross, prompt, prompt_len, key, temperature, budget, *, decoder, filters,
            probe, max_new_tokens, eot, renormalize):  # fmt: skip
    batch = prompt.shape[0]
    logits, cache, probed = _prefill(decoder, params, cross, prompt, prompt_len, probe)
    ones = jnp.ones((batch,), jnp.int32)

    def cond(s):
        stopped = s["finished"] | (s["t"] >= budget)
        return (s["t"] < max_new_tokens) & ~jnp.all(stopped)

    def body(s):
        t = s["t"]
        scores, logp = _apply_filters(filters, s["logits"], s["tokens"], t, renormalize)
        key, sub = jax.random.split(s["key"])
        # Both branches are cheap next to the decoder step; temperature stays traced.
        sampled = jax.random.categorical(sub, scores / jnp.maximum(temperature, 1e-6))
        tok = jnp.where(temperature > 0, sampled, jnp.argmax(scores, -1)).astype(jnp.int32)
        stopped = s["finished"] | (t >= budget)
        tok = jnp.where(stopped, eot, tok)
        tok_lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        sum_lp = s["sum_lp"] + jnp.where(stopped, 0.0, tok_lp)
        logits, cache = decoder.step(params, s["cache"], cross, tok[:, None], ones)
        return dict(
            t=t + 1, logits=logits[:, 0], cache=cache, key=key, sum_lp=sum_lp,
            tokens=s["tokens"].at[:, t].set(tok),
            finished=s["finished"] | ((tok == eot) & ~stopped),
        )  # fmt: skip

    init = dict(
        t=jnp.int32(0), logits=logits, cache=cache, key=key,
        sum_lp=jnp.zeros((batch,), jnp.float32),
        tokens=jnp.full((batch, max_new_tokens), eot, jnp.int32),
        finished=jnp.zeros((batch,), bool),
    )  # fmt: skip
    s = jax.lax.while_loop(cond, body, init)
    lengths = _lengths(s["tokens"], eot)
    n = (lengths + s["finished"]).astype(jnp.float32)  # generated, end token included
    return SearchResult(
        tokens=s["tokens"], lengths=lengths, sum_logprobs=s["sum_lp"],
        scores=s["sum_lp"] / jnp.maximum(n, 1.0), finished=s["finished"], probe=probed,
    )  # fmt: skip


def _check(decoder: IncrementalDecoder, prompt: jax.Array, max_new_tokens: int) -> None:
    if prompt.shape[1] + max_new_tokens > decoder.max_len:
        raise ValueError(
            f"prompt width {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
            f"decoder cache length {decoder.max_len}"
        )


def _prompt_len(prompt: jax.Array, prompt_len: jax.Array | np.ndarray | None) -> jax.Array:
    if prompt_len is None:
        return jnp.full(prompt.shape[:1], prompt.shape[1], jnp.int32)
    return jnp.asarray(prompt_len, jnp.int32)


def greedy_search(
    decoder: IncrementalDecoder,
    params: Any,
    cross: Any,
    prompt: jax.Array | np.ndarray,
    *,
    eot: int,
    max_new_tokens: int,
    prompt_len: jax.Array | np.ndarray | None = None,
    filters: Sequence[LogitFilter] = (),
    temperature: float = 0.0,
    key: jax.Array | None = None,
    renormalize: bool = True,
    probe: Probe | None = None,
    token_budget: jax.Array | None = None,
) -> SearchResult:
    """Greedy decoding (temperature 0) or sampling (temperature > 0, needs `key`).

    cross: the model's per-input encoder state, batch-first [B, ...]; prompt: int32
    [B, P] (rows shorter than P padded, lengths in `prompt_len` [B]); probe: optional
    hashable `(prefill logits [B, P, V], prompt, prompt_len) -> pytree` run inside the
    jit on the prompt's logits, e.g. Whisper's no-speech probability.
    Stops at the end token `eot` in every row or after `max_new_tokens`; token_budget:
    optional int32 [B], a row also stops (unfinished) after that many tokens, so a short
    input that loops does not cost the whole static `max_new_tokens` of its batch.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    _check(decoder, prompt, max_new_tokens)
    key = jax.random.PRNGKey(0) if key is None else key
    budget = (jnp.full(prompt.shape[:1], max_new_tokens, jnp.int32) if token_budget is None
              else jnp.asarray(token_budget, jnp.int32))
    return _greedy(
        params, cross, prompt, _prompt_len(prompt, prompt_len), key,
        jnp.float32(temperature), budget, decoder=decoder, filters=tuple(filters), probe=probe,
        max_new_tokens=max_new_tokens, eot=eot, renormalize=renormalize,
    )  # fmt: skip


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...] gathered along axis 1 by idx [B, M] -> [B, M, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "filters", "probe", "max_new_tokens", "eot", "beams",
                     "length_penalty", "renormalize"),
)  # fmt: skip
def _beam(params, cross, prompt, prompt_len, *, decoder, filters, probe, max_new_tokens, eot,
          beams, length_penalty, renormalize):  # fmt: skip
    batch, n, steps = prompt.shape[0], beams, max_new_tokens
    # Beam rows of one input are adjacent: row = input * beams + beam.
    cross, prompt, prompt_len = jax.tree.map(
        lambda x: jnp.repeat(x, n, 0), (cross, prompt, prompt_len)
    )
    logits, cache, probed = _prefill(decoder, params, cross, prompt, prompt_len, probe)
    if probe is not None:
        probed = jax.tree.map(lambda x: x[::n], probed)
    ones = jnp.ones((batch * n,), jnp.int32)
    top_n = jnp.arange(2 * n) < n

    def cond(s):
        return (s["t"] < steps) & ~jnp.all(s["fin_flag"])

    def body(s):
        t = s["t"]
        scores, logp = _apply_filters(
            filters, s["logits"], s["run_tokens"].reshape(batch * n, steps), t, renormalize
        )
        vocab = scores.shape[-1]
        # Rank by cumulative log-prob (filtered tokens are -inf); 2N candidates so that N
        # unfinished ones remain even if N of them end here.
        cand = (logp + s["run_scores"].reshape(-1, 1)).reshape(batch, n * vocab)
        top_s, top_i = jax.lax.top_k(cand, 2 * n)  # [B, 2N]
        parent, tok = top_i // vocab, (top_i % vocab).astype(jnp.int32)
        seqs = _take(s["run_tokens"], parent).at[:, :, t].set(tok)  # [B, 2N, T]
        ends = (tok == eot) | (t + 1 >= steps)

        # Running beams: the best N candidates that did not end.
        run_rank = top_s + jnp.where(ends, _NEG, 0.0)
        run_scores, keep = jax.lax.top_k(run_rank, n)
        new_parent, new_tok = _take(parent, keep), _take(tok, keep)

        # Finished: ended candidates among the top N, length-normalized, merged with the
        # kept ones; nothing is added once an input holds N finished (early stopping).
        norm = top_s / ((t + 1).astype(jnp.float32) ** length_penalty)
        full = jnp.all(s["fin_flag"], axis=1, keepdims=True)
        just = ends & top_n[None]
        norm = norm + jnp.where(full, _NEG, 0.0) + jnp.where(just, 0.0, _NEG)
        merged = jnp.concatenate([s["fin_scores"], norm], axis=1)
        fin_scores, pick = jax.lax.top_k(merged, n)
        cat = lambda a, b: _take(jnp.concatenate([a, b], axis=1), pick)  # noqa: E731
        fin = dict(
            fin_scores=fin_scores,
            fin_tokens=cat(s["fin_tokens"], seqs),
            fin_sum_lp=cat(s["fin_sum_lp"], top_s),
            fin_flag=cat(s["fin_flag"], just),
        )
        # Reorder the cache rows to the surviving beams' parents, then feed their tokens.
        rows = (jnp.arange(batch)[:, None] * n + new_parent).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], s["cache"])
        logits, cache = decoder.step(params, cache, cross, new_tok.reshape(-1, 1), ones)
        return dict(
            t=t + 1, logits=logits[:, 0], cache=cache, run_tokens=_take(seqs, keep),
            run_scores=run_scores, **fin,
        )  # fmt: skip

    init = dict(
        t=jnp.int32(0), logits=logits, cache=cache,
        run_tokens=jnp.full((batch, n, steps), eot, jnp.int32),
        # Only beam 0 is live at first: the others are copies of it.
        run_scores=jnp.tile(jnp.where(jnp.arange(n) == 0, 0.0, _NEG), (batch, 1)),
        fin_tokens=jnp.full((batch, n, steps), eot, jnp.int32),
        fin_scores=jnp.full((batch, n), _NEG, jnp.float32),
        fin_sum_lp=jnp.zeros((batch, n), jnp.float32),
        fin_flag=jnp.zeros((batch, n), bool),
    )  # fmt: skip
    s = jax.lax.while_loop(cond, body, init)
    tokens = s["fin_tokens"][:, 0]
    lengths = _lengths(tokens, eot)
    return SearchResult(
        tokens=tokens, lengths=lengths, sum_logprobs=s["fin_sum_lp"][:, 0],
        scores=s["fin_scores"][:, 0], finished=lengths < steps, probe=probed,
    )  # fmt: skip


def beam_search(
    decoder: IncrementalDecoder,
    params: Any,
    cross: Any,
    prompt: jax.Array | np.ndarray,
    *,
    eot: int,
    max_new_tokens: int,
    beams: int,
    prompt_len: jax.Array | np.ndarray | None = None,
    filters: Sequence[LogitFilter] = (),
    length_penalty: float = 1.0,
    renormalize: bool = True,
    probe: Probe | None = None,
) -> SearchResult:
    """Beam search with `beams` hypotheses per input (runs batch x beams decoder rows).

    Arguments as in `greedy_search`; `cross` and `prompt` hold one row per input and are
    repeated per beam inside. Returns the best finished hypothesis per input.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    _check(decoder, prompt, max_new_tokens)
    return _beam(
        params, cross, prompt, _prompt_len(prompt, prompt_len), decoder=decoder,
        filters=tuple(filters), probe=probe, max_new_tokens=max_new_tokens, eot=eot,
        beams=beams, length_penalty=float(length_penalty), renormalize=renormalize,
    )  # fmt: skip
