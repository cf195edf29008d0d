"""Whisper encoder-decoder in Flax (linen modules used as pure functions).

Public entry points (all take `params` from `params_from_hf` and a static `config`):

- `encode(params, config, mel [B, n_mels, T]) -> [B, (T + 1) // 2, D]`: any T <= 3000,
  so callers can encode bucketed, shorter inputs.
- `cross_kv(params, config, encoder_out, encoder_mask) -> CrossCache`: cross-attention
  keys/values, computed once per encoder output.
- `init_cache(config, batch, max_len) -> DecoderCache`: fixed-size self-attention cache.
- `decode(params, config, cache, cross, tokens [B, S], num_valid) -> (logits, cache)`:
  S = prompt length is prefill (`prefill` is the same function), `decode_step` is S = 1.
- `alignment_attention(params, config, encoder_out, tokens [S], n_frames, heads)`: a
  forced pass over decoded tokens for word timings: the alignment heads' cross-attention
  [A, S, T] and each next token's probability.

Jitting: `config` is a static argument (hashable frozen dataclass; each distinct config is
a separate compile, and so is each distinct input shape: T, B, S, max_len). The decoder
cache is donated: do not reuse a cache after passing it in. Compute dtype comes from
`config.dtype` ("float32" default; "bfloat16"/"float16" for accelerators); softmax
and logits are always float32.

Caches: every leaf is batch-first (beam reorder = `jax.tree.map(lambda x: x[idx], c)`);
keys are stored [B, H, Dh, L] and values [B, H, L, Dh] (see `LayerKV`). A row (slot) is
reused by setting its `length` to 0: stale entries are masked, never read. Rows that
should not advance in a batched call pass `num_valid` 0.

Cache bound: a row whose `length + S` exceeds the cache's `max_len` cannot be stored
(`dynamic_update_slice` would clamp and overwrite earlier entries), so its logits are
returned as NaN from then on. Callers stop decoding at the cache length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.kv_cache import CrossCache, DecoderCache, LayerKV

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Model sizes and special token ids; defaults are whisper tiny.en."""

    n_mels: int = 80
    vocab_size: int = 51864
    d_model: int = 384
    encoder_layers: int = 4
    encoder_heads: int = 6
    decoder_layers: int = 4
    decoder_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames after the stride-2 conv (30 s)
    max_target_positions: int = 448
    decoder_start_token_id: int = 50257
    eos_token_id: int = 50256
    pad_token_id: int = 50256
    bos_token_id: int = 50256
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters keep whatever dtype they are given

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_heads

    @property
    def max_mel_frames(self) -> int:
        return 2 * self.max_source_positions

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
        """From a transformers `config.json` dict (unknown keys ignored)."""

        def first(value: Any) -> Any:  # HF allows a list of eos ids; ours is the first
            return value[0] if isinstance(value, (list, tuple)) else value

        defaults = cls()
        kwargs = dict(
            n_mels=d.get("num_mel_bins", defaults.n_mels),
            vocab_size=d.get("vocab_size", defaults.vocab_size),
            d_model=d.get("d_model", defaults.d_model),
            encoder_layers=d.get("encoder_layers", defaults.encoder_layers),
            encoder_heads=d.get("encoder_attention_heads", defaults.encoder_heads),
            decoder_layers=d.get("decoder_layers", defaults.decoder_layers),
            decoder_heads=d.get("decoder_attention_heads", defaults.decoder_heads),
            encoder_ffn_dim=d.get("encoder_ffn_dim", defaults.encoder_ffn_dim),
            decoder_ffn_dim=d.get("decoder_ffn_dim", defaults.decoder_ffn_dim),
            max_source_positions=d.get("max_source_positions", defaults.max_source_positions),
            max_target_positions=d.get("max_target_positions", defaults.max_target_positions),
            decoder_start_token_id=d.get(
                "decoder_start_token_id", defaults.decoder_start_token_id
            ),
            eos_token_id=first(d.get("eos_token_id", defaults.eos_token_id)),
            pad_token_id=first(d.get("pad_token_id", defaults.pad_token_id)),
            bos_token_id=first(d.get("bos_token_id", defaults.bos_token_id)),
            suppress_tokens=tuple(d.get("suppress_tokens") or ()),
            begin_suppress_tokens=tuple(d.get("begin_suppress_tokens") or ()),
        )
        if d.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {d['activation_function']!r}")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def tiny_test(cls, **overrides: Any) -> WhisperConfig:
        """A tiny random-size preset for tests."""
        base: dict[str, Any] = dict(
            vocab_size=128, d_model=64, encoder_layers=2, encoder_heads=4, decoder_layers=2,
            decoder_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_target_positions=64, decoder_start_token_id=125, eos_token_id=126,
            pad_token_id=126, bos_token_id=126,
        )
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------- state


def init_cache(config: WhisperConfig, batch: int, max_len: int | None = None) -> DecoderCache:
    """Zeroed cache for `batch` rows of up to `max_len` tokens (default: the position table)."""
    max_len = config.max_target_positions if max_len is None else max_len
    if max_len > config.max_target_positions:
        raise ValueError(f"max_len {max_len} > max_target_positions {config.max_target_positions}")
    heads, head_dim = config.decoder_heads, config.d_model // config.decoder_heads
    dtype = jnp.dtype(config.dtype)
    layers = tuple(
        LayerKV(
            keys=jnp.zeros((batch, heads, head_dim, max_len), dtype),
            values=jnp.zeros((batch, heads, max_len, head_dim), dtype),
        )
        for _ in range(config.decoder_layers)
    )
    return DecoderCache(layers=layers, length=jnp.zeros((batch,), jnp.int32))


def encoder_output_length(n_frames: int) -> int:
    """Encoder frames for `n_frames` mel frames (the second conv has stride 2, padding 1)."""
    return (n_frames + 1) // 2


# --------------------------------------------------------------------------- layers

_NEG = float(np.finfo(np.float32).min)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention. q [B, S, H, Dh] (pre-scaled), k [B, H, Dh, T], v [B, H, T, Dh],
    mask bool broadcastable to [B, H, S, T] -> [B, S, H, Dh]."""
    scores = jnp.einsum("bshd,bhdt->bhst", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, _NEG)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bhtd->bshd", weights, v)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # torch's default (erf) GELU


class Attention(nn.Module):
    """Projections of one multi-head attention block; the caller chooses which K/V to use."""

    heads: int
    d_model: int
    dtype: Any

    def setup(self) -> None:
        head_dim = self.d_model // self.heads
        proj = dict(features=(self.heads, head_dim), dtype=self.dtype)
        self.q_proj = nn.DenseGeneral(**proj)
        self.k_proj = nn.DenseGeneral(**proj, use_bias=False)  # Whisper: no key bias
        self.v_proj = nn.DenseGeneral(**proj)
        self.out_proj = nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype)
        self.scale = head_dim**-0.5

    def query(self, x: jax.Array) -> jax.Array:
        return self.q_proj(x) * jnp.asarray(self.scale, self.dtype)

    def key_value(self, x: jax.Array) -> LayerKV:
        """x [B, T, D] -> keys [B, H, Dh, T], values [B, H, T, Dh]."""
        return LayerKV(
            keys=self.k_proj(x).transpose(0, 2, 3, 1), values=self.v_proj(x).transpose(0, 2, 1, 3)
        )

    def output(self, heads: jax.Array) -> jax.Array:
        return self.out_proj(heads)


class MLP(nn.Module):
    d_model: int
    ffn_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _gelu(nn.Dense(self.ffn_dim, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.d_model, dtype=self.dtype, name="fc2")(x)


def _layer_norm(config: WhisperConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (the fast one loses ~1e-4 on big activations).
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.dtype, use_fast_variance=False, name=name
    )


class EncoderLayer(nn.Module):
    config: WhisperConfig

    def setup(self) -> None:
        c = self.config
        self.self_attn_layer_norm = _layer_norm(c, "self_attn_layer_norm")
        self.self_attn = Attention(c.encoder_heads, c.d_model, c.dtype)
        self.final_layer_norm = _layer_norm(c, "final_layer_norm")
        self.mlp = MLP(c.d_model, c.encoder_ffn_dim, c.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.self_attn_layer_norm(x)
        kv = self.self_attn.key_value(h)
        x = x + self.self_attn.output(_attend(self.self_attn.query(h), kv.keys, kv.values, None))
        return x + self.mlp(self.final_layer_norm(x))


class Encoder(nn.Module):
    """mel [B, n_mels, T] -> [B, (T + 1) // 2, D]."""

    config: WhisperConfig

    def setup(self) -> None:
        c = self.config
        conv: dict[str, Any] = dict(features=c.d_model, kernel_size=(3,), padding=((1, 1),),
                                    dtype=c.dtype)
        self.conv1 = nn.Conv(**conv)
        self.conv2 = nn.Conv(**conv, strides=(2,))
        self.embed_positions = self.param(  # fixed sinusoids, but loaded from the checkpoint
            "embed_positions", lambda _, s: _sinusoids(*s), (c.max_source_positions, c.d_model)
        )
        self.layers = [EncoderLayer(c) for _ in range(c.encoder_layers)]
        self.layer_norm = _layer_norm(c, "layer_norm")

    def __call__(self, mel: jax.Array) -> jax.Array:
        x = jnp.swapaxes(mel, 1, 2).astype(self.config.dtype)  # convs run time-major: [B, T, C]
        x = _gelu(self.conv1(x))
        x = _gelu(self.conv2(x))
        if x.shape[1] > self.config.max_source_positions:
            raise ValueError(f"{mel.shape[2]} mel frames > {self.config.max_mel_frames}")
        # Shorter inputs take the first positions, so a bucketed input matches the
        # corresponding prefix of a full 30 s encode in its position signal.
        x = x + self.embed_positions[: x.shape[1]].astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class DecoderLayer(nn.Module):
    config: WhisperConfig

    def setup(self) -> None:
        c = self.config
        self.self_attn_layer_norm = _layer_norm(c, "self_attn_layer_norm")
        self.self_attn = Attention(c.decoder_heads, c.d_model, c.dtype)
        self.encoder_attn_layer_norm = _layer_norm(c, "encoder_attn_layer_norm")
        self.encoder_attn = Attention(c.decoder_heads, c.d_model, c.dtype)
        self.final_layer_norm = _layer_norm(c, "final_layer_norm")
        self.mlp = MLP(c.d_model, c.decoder_ffn_dim, c.dtype)

    def cross_kv(self, encoder_out: jax.Array) -> LayerKV:
        return self.encoder_attn.key_value(encoder_out)

    def __call__(
        self,
        x: jax.Array,
        kv: LayerKV,
        start: jax.Array,
        self_mask: jax.Array,
        cross: LayerKV,
        cross_mask: jax.Array,
    ) -> tuple[jax.Array, LayerKV]:
        h = self.self_attn_layer_norm(x)
        new = self.self_attn.key_value(h)  # S new positions

        def write(buf: jax.Array, rows: jax.Array, at: jax.Array, axis: int) -> jax.Array:
            index: list[int | jax.Array] = [0] * buf.ndim
            index[axis] = at
            return jax.lax.dynamic_update_slice(buf, rows.astype(buf.dtype), index)

        # One row at a time (vmap): each row writes at its own length. Keys: [H, Dh, L].
        kv = LayerKV(
            keys=jax.vmap(write, in_axes=(0, 0, 0, None))(kv.keys, new.keys, start, 2),
            values=jax.vmap(write, in_axes=(0, 0, 0, None))(kv.values, new.values, start, 1),
        )
        q = self.self_attn.query(h)
        x = x + self.self_attn.output(_attend(q, kv.keys, kv.values, self_mask))

        h = self.encoder_attn_layer_norm(x)
        q = self.encoder_attn.query(h)
        x = x + self.encoder_attn.output(_attend(q, cross.keys, cross.values, cross_mask))
        return x + self.mlp(self.final_layer_norm(x)), kv

    def forced(
        self, x: jax.Array, self_mask: jax.Array, cross: LayerKV
    ) -> tuple[jax.Array, jax.Array]:
        """The layer over a whole token sequence without a cache (word alignment): x
        [B, S, D] -> (x, cross-attention scores before the softmax, float32 [B, H, S, T])."""
        h = self.self_attn_layer_norm(x)
        kv = self.self_attn.key_value(h)
        x = x + self.self_attn.output(_attend(self.self_attn.query(h), kv.keys, kv.values,
                                              self_mask))
        h = self.encoder_attn_layer_norm(x)
        q = self.encoder_attn.query(h)
        scores = jnp.einsum("bshd,bhdt->bhst", q, cross.keys, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1).astype(cross.values.dtype)
        x = x + self.encoder_attn.output(jnp.einsum("bhst,bhtd->bshd", weights, cross.values))
        return x + self.mlp(self.final_layer_norm(x)), scores


class Decoder(nn.Module):
    config: WhisperConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype)
        self.embed_positions = self.param(
            "embed_positions", nn.initializers.normal(0.02), (c.max_target_positions, c.d_model)
        )
        self.layers = [DecoderLayer(c) for _ in range(c.decoder_layers)]
        self.layer_norm = _layer_norm(c, "layer_norm")

    def cross_kv(self, encoder_out: jax.Array, encoder_mask: jax.Array) -> CrossCache:
        x = encoder_out.astype(self.config.dtype)
        layers = tuple(layer.cross_kv(x) for layer in self.layers)
        return CrossCache(layers=layers, mask=encoder_mask)

    def __call__(
        self, cache: DecoderCache, cross: CrossCache, tokens: jax.Array, num_valid: jax.Array,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, DecoderCache]:
        n_new = tokens.shape[1]
        max_len = cache.layers[0].values.shape[2]
        positions = cache.length[:, None] + jnp.arange(n_new, dtype=jnp.int32)  # [B, S]
        # Clamp the table lookup; rows that overflow are NaN-poisoned below anyway.
        table = jnp.take(self.embed_positions, positions, axis=0, mode="clip")
        x = self.embed_tokens(tokens) + table.astype(self.config.dtype)
        # Query at position p sees keys [0, p]: older entries plus this call's causal prefix.
        self_mask = (jnp.arange(max_len)[None, None, :] <= positions[:, :, None])[:, None]
        cross_mask = cross.mask[:, None, None, :]
        layers = []
        for layer, kv, ckv in zip(self.layers, cache.layers, cross.layers, strict=True):
            x, kv = layer(x, kv, cache.length, self_mask, ckv, cross_mask)
            layers.append(kv)
        x = self.layer_norm(x)
        if logits_at is not None:  # only these positions' logits: [B, K, D]
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        # Output tied to the embedding; contracting its last axis directly on [B*S, D] rows
        # keeps XLA from materialising a transposed copy of the [V, D] table every step.
        emb = self.embed_tokens.embedding.astype(self.config.dtype)
        flat = jax.lax.dot_general(
            x.reshape(-1, x.shape[-1]), emb, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        logits = flat.reshape(*x.shape[:2], -1)
        overflow = cache.length + n_new > max_len
        logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
        return logits, DecoderCache(layers=tuple(layers), length=cache.length + num_valid)

    def forced(
        self, tokens: jax.Array, encoder_out: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """One pass over whole sequences tokens [B, S] (no cache) -> (logits float32
        [B, S, V], per layer the cross-attention scores before the softmax [B, H, S, T])."""
        n = tokens.shape[1]
        x = self.embed_tokens(tokens) + self.embed_positions[:n].astype(self.config.dtype)
        self_mask = (jnp.arange(n)[None, :] <= jnp.arange(n)[:, None])[None, None]
        scores = []
        for layer in self.layers:
            x, layer_scores = layer.forced(x, self_mask, layer.cross_kv(
                encoder_out.astype(self.config.dtype)))
            scores.append(layer_scores)
        x = self.layer_norm(x)
        emb = self.embed_tokens.embedding.astype(self.config.dtype)
        logits = jnp.einsum("bsd,vd->bsv", x, emb, preferred_element_type=jnp.float32)
        return logits, tuple(scores)

    def init_all(self, tokens: jax.Array, encoder_out: jax.Array) -> jax.Array:
        """Touches every parameter (used only by `init_params`)."""
        batch = tokens.shape[0]
        cross = self.cross_kv(encoder_out, jnp.ones(encoder_out.shape[:2], bool))
        cache = init_cache(self.config, batch, tokens.shape[1])
        return self(cache, cross, tokens, jnp.full((batch,), tokens.shape[1], jnp.int32))[0]


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
    """Whisper's fixed encoder positions: [sin | cos] halves, [length, channels]."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return jnp.asarray(np.concatenate([np.sin(t), np.cos(t)], axis=1), jnp.float32)


# --------------------------------------------------------------------------- pure API


def _encode(params: Params, config: WhisperConfig, mel: jax.Array) -> jax.Array:
    """mel float [B, n_mels, T] -> encoder states [B, (T + 1) // 2, D] in config.dtype.

    T may be any length up to 2 * max_source_positions (3000); each T compiles once.
    """
    # Module.apply's annotation also covers `mutable=` calls' (out, variables) tuple
    return cast(jax.Array, Encoder(config).apply({"params": params["encoder"]}, mel))


def _cross_kv(
    params: Params, config: WhisperConfig, encoder_out: jax.Array, encoder_mask: jax.Array | None
) -> CrossCache:
    """Cross-attention K/V of every decoder layer. encoder_out [B, T, D], encoder_mask
    bool [B, T] (default all True) -> CrossCache. The mask hides padded frames, so encoder
    outputs of different true lengths can share one padded bucket. Passing None or a mask
    are separate compiles."""
    if encoder_mask is None:
        encoder_mask = jnp.ones(encoder_out.shape[:2], bool)
    return cast(CrossCache, Decoder(config).apply(
        {"params": params["decoder"]}, encoder_out, encoder_mask, method="cross_kv"
    ))


def _decode(
    params: Params,
    config: WhisperConfig,
    cache: DecoderCache,
    cross: CrossCache,
    tokens: jax.Array,
    num_valid: jax.Array | None = None,
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, DecoderCache]:
    """tokens int32 [B, S], num_valid int32 [B] | None -> (logits float32 [B, S, V], cache).

    Writes row b's S new keys/values at cache.length[b] (positions length + arange(S)),
    then advances length by num_valid (default S); tokens past num_valid are padding whose
    cache entries the next call overwrites. `logits_at` int32 [B, K] (indices into S):
    logits [B, K, V] of those positions only (a prefill reads one or two of them; the
    projection onto the vocabulary is most of a long prompt's cost). Donates `cache`.
    Each S (and passing num_valid, logits_at or not, each K) compiles once. Rows with
    length + S > max_len get NaN logits (module doc).
    """
    if num_valid is None:
        num_valid = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    return cast(tuple[jax.Array, DecoderCache], Decoder(config).apply(
        {"params": params["decoder"]}, cache, cross, tokens.astype(jnp.int32), num_valid,
        logits_at,
    ))


def _decode_step(
    params: Params, config: WhisperConfig, cache: DecoderCache, cross: CrossCache, tokens: jax.Array
) -> tuple[jax.Array, DecoderCache]:
    """One token per row: tokens int32 [B] -> (logits float32 [B, V], cache). Donates `cache`."""
    logits, cache = _decode(params, config, cache, cross, tokens[:, None])
    return logits[:, 0], cache


def _alignment_attention(
    params: Params, config: WhisperConfig, encoder_out: jax.Array, tokens: jax.Array,
    n_frames: jax.Array, heads: tuple[tuple[int, int], ...],
) -> tuple[jax.Array, jax.Array]:
    """A forced pass for word timings (openai/whisper's `find_alignment`): the decoder runs
    once over a whole token row against one window's encoder output.

    encoder_out [1, T, D], tokens int32 [S] (padded to a width bucket: positions only see
    the tokens before them, so padding changes nothing before it), n_frames int32: the
    encoder frames that hold audio. Returns (the cross-attention of the `heads` (layer,
    head) pairs, softmax over the first n_frames frames only, float32 [A, S, T]; the
    probability of each next token among the text tokens, float32 [S - 1]: position i
    predicting tokens[i + 1], softmax over the ids below the end token, as openai)."""
    logits, scores = cast(tuple[jax.Array, tuple[jax.Array, ...]], Decoder(config).apply(
        {"params": params["decoder"]}, tokens[None].astype(jnp.int32), encoder_out,
        method="forced",
    ))
    picked = jnp.stack([scores[layer][0, head] for layer, head in heads])  # [A, S, T]
    audio = jnp.arange(picked.shape[-1]) < n_frames
    weights = jax.nn.softmax(jnp.where(audio, picked, -jnp.inf), axis=-1)
    text_logits = logits[0, :-1, : config.eos_token_id]
    next_ids = jnp.minimum(tokens[1:], config.eos_token_id - 1)  # specials get a dummy
    probs = jnp.take_along_axis(jax.nn.softmax(text_logits, axis=-1), next_ids[:, None], 1)
    return weights, probs[:, 0]


# One jitted function per phase; config is static (hashable), the cache is donated.
encode = jax.jit(_encode, static_argnames="config")
cross_kv = jax.jit(_cross_kv, static_argnames="config")
decode = jax.jit(_decode, static_argnames="config", donate_argnames="cache")
prefill = decode  # the same function with S = prompt length
decode_step = jax.jit(_decode_step, static_argnames="config", donate_argnames="cache")
# Apart from the decode loop: each (T, S, heads) compiles once.
alignment_attention = jax.jit(_alignment_attention, static_argnames=("config", "heads"))
