"""Text decoders with cross-attention over a fixed-size KV cache, for speech models.

One decoder shape covers the families a speech encoder is paired with:

- BART (post-LN layers, learned positions offset by 2, `layernorm_embedding`),
- mBART (pre-LN layers, learned positions offset by 2, embedding and final norms),
- Speech2Text's decoder (pre-LN, fixed sinusoidal positions that start after the pad id),
- GPT-2 with `add_cross_attention` (pre-LN blocks `ln_1` / `ln_cross_attn` / `ln_2`,
  learned positions, fused QKV converted to separate projections on load).

All are "embed -> layers of (self-attention, cross-attention, feed-forward) -> norm ->
tied or separate output projection"; `TextDecoderConfig` records where they differ.

Public API (params from `params_from_bart` / `params_from_gpt2`, config static):
- `cross_kv(params, config, encoder_out [B, T, E], mask [B, T] | None) -> CrossCache`
- `init_cache(config, batch, max_len) -> DecoderCache`
- `decode(params, config, cache, cross, tokens [B, S], num_valid [B]) -> (logits [B, S, V],
  cache)`: prefill is S = prompt width, a step is S = 1; jitted, the cache is donated.
- `TextDecoder(config, max_len)`: the `models.decoding.IncrementalDecoder` over a model's
  `params["decoder"]`, so Speech2Text and the speech encoder-decoder share the search.

The cache classes are Whisper's (`models.kv_cache.DecoderCache`, `CrossCache`, `LayerKV`):
keys [B, H, Dh, L], values [B, H, L, Dh], batch first, `length` int32 [B]. Rows whose
`length + S` exceeds the cache get NaN logits, as in Whisper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import decoding
from models.kv_cache import CrossCache, DecoderCache, LayerKV
from models.layers import activation, dense, layer_norm

Params = dict[str, Any]
_NEG = float(np.finfo(np.float32).min)

SUPPORTED_DECODERS = ("bart", "mbart", "gpt2")  # HF model_type of a decoder config


@dataclasses.dataclass(frozen=True)
class TextDecoderConfig:
    """Sizes and layout of one decoder; `kind` is the HF family it was read from."""

    kind: str = "bart"
    vocab_size: int = 64
    d_model: int = 32
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 64
    max_positions: int = 64  # target positions the position table covers
    activation: str = "gelu"
    pre_norm: bool = False  # LN before each sub-layer (mBART, S2T, GPT-2) or after (BART)
    embed_norm: bool = True  # `layernorm_embedding` after token + position embeddings
    final_norm: bool = False  # a norm after the last layer
    positions: str = "learned"  # "learned" table or fixed "sinusoidal" (Speech2Text)
    position_offset: int = 2  # row of position 0 in the table (BART 2, GPT-2 0)
    pad_token_id: int | None = 1  # sinusoidal: pad tokens take the zero row `pad_token_id`
    embed_scale: float = 1.0  # sqrt(d_model) where `scale_embedding`
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> TextDecoderConfig:
        """From a decoder `config.json` dict (BART, mBART or GPT-2). Raises ValueError
        naming an unsupported `model_type` and the supported ones."""
        kind = hf.get("model_type")
        if kind in ("bart", "mbart"):
            d = hf.get("d_model", 1024)
            return cls(
                kind=kind, vocab_size=hf["vocab_size"], d_model=d,
                layers=hf.get("decoder_layers", 12), heads=hf.get("decoder_attention_heads", 16),
                ffn_dim=hf.get("decoder_ffn_dim", 4096),
                max_positions=hf.get("max_position_embeddings", 1024),
                activation=hf.get("activation_function", "gelu"), pre_norm=kind == "mbart",
                embed_norm=True, final_norm=kind == "mbart", positions="learned",
                position_offset=2, pad_token_id=hf.get("pad_token_id"),
                embed_scale=math.sqrt(d) if hf.get("scale_embedding") else 1.0,
            )  # fmt: skip
        if kind == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx"):
                raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
            if not hf.get("scale_attn_weights", True):
                raise ValueError("GPT-2 with scale_attn_weights=False is not supported")
            d = hf.get("n_embd", 768)
            return cls(
                kind=kind, vocab_size=hf["vocab_size"], d_model=d, layers=hf.get("n_layer", 12),
                heads=hf.get("n_head", 12), ffn_dim=hf.get("n_inner") or 4 * d,
                max_positions=hf.get("n_positions", 1024),
                activation=hf.get("activation_function", "gelu_new"), pre_norm=True,
                embed_norm=False, final_norm=True, positions="learned", position_offset=0,
                pad_token_id=hf.get("pad_token_id"),
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            )  # fmt: skip
        raise ValueError(
            f"unsupported decoder model_type {kind!r}; supported: {', '.join(SUPPORTED_DECODERS)}"
        )


# --------------------------------------------------------------------------- state


def init_cache(config: TextDecoderConfig, batch: int, max_len: int) -> DecoderCache:
    """Zeroed self-attention cache for `batch` rows of up to `max_len` tokens."""
    if max_len > config.max_positions:
        raise ValueError(f"max_len {max_len} > the decoder's {config.max_positions} positions")
    h, dh = config.heads, config.head_dim
    layers = tuple(
        LayerKV(keys=jnp.zeros((batch, h, dh, max_len)), values=jnp.zeros((batch, h, max_len, dh)))
        for _ in range(config.layers)
    )
    return DecoderCache(layers=layers, length=jnp.zeros((batch,), jnp.int32))


def sinusoidal_table(rows: int, dim: int, pad_row: int | None) -> np.ndarray:
    """fairseq/tensor2tensor sinusoids [rows, dim] ([sin | cos] halves), row `pad_row`
    zeroed; float32 arithmetic as transformers does it, so tables agree to the last bits."""
    half = dim // 2
    step = np.float32(math.log(10000) / (half - 1))
    inv = np.exp(np.arange(half, dtype=np.float32) * -step)
    t = np.arange(rows, dtype=np.float32)[:, None] * inv[None, :]
    table = np.concatenate([np.sin(t), np.cos(t)], axis=1)
    if dim % 2:
        table = np.concatenate([table, np.zeros((rows, 1), np.float32)], axis=1)
    if pad_row is not None:
        table[pad_row] = 0.0
    return table.astype(np.float32)


# --------------------------------------------------------------------------- layers


def _split(x: jax.Array, heads: int) -> jax.Array:
    return x.reshape(*x.shape[:2], heads, -1)


def _kv(p_k: Params, p_v: Params, x: jax.Array, heads: int) -> LayerKV:
    """x [B, T, D] -> keys [B, H, Dh, T], values [B, H, T, Dh] (Whisper's cache layout)."""
    return LayerKV(keys=_split(dense(p_k, x), heads).transpose(0, 2, 3, 1),
                   values=_split(dense(p_v, x), heads).transpose(0, 2, 1, 3))


def _attend(p_q: Params, p_o: Params, x: jax.Array, kv: LayerKV, mask: jax.Array,
            heads: int) -> jax.Array:
    """Queries from x [B, S, D] over kv; mask bool broadcastable to [B, H, S, T]."""
    q = _split(dense(p_q, x), heads)
    q = q * (q.shape[-1] ** -0.5)
    scores = jnp.einsum("bshd,bhdt->bhst", q, kv.keys)
    weights = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("bhst,bhtd->bshd", weights, kv.values)
    return dense(p_o, out.reshape(*out.shape[:2], -1))


def _write(buf: jax.Array, rows: jax.Array, at: jax.Array, axis: int) -> jax.Array:
    """Each batch row writes `rows` at its own offset `at[b]` along `axis` (of the row)."""

    def one(b: jax.Array, r: jax.Array, i: jax.Array) -> jax.Array:
        index: list[int | jax.Array] = [0] * b.ndim
        index[axis] = i
        return jax.lax.dynamic_update_slice(b, r.astype(b.dtype), index)

    return jax.vmap(one)(buf, rows, at)


def _layer(p: Params, c: TextDecoderConfig, x: jax.Array, kv: LayerKV, start: jax.Array,
           self_mask: jax.Array, cross: LayerKV, cross_mask: jax.Array
           ) -> tuple[jax.Array, LayerKV]:
    """One decoder layer on x [B, S, D]; writes the S new self-attention keys/values into
    kv at each row's `start`. Pre-LN normalizes each sub-layer's input, post-LN its sum."""
    eps = c.layer_norm_eps

    def norm_in(y: jax.Array, name: str) -> jax.Array:
        return layer_norm(p[name], y, eps) if c.pre_norm else y

    def norm_out(y: jax.Array, name: str) -> jax.Array:
        return y if c.pre_norm else layer_norm(p[name], y, eps)

    h = norm_in(x, "self_norm")
    new = _kv(p["k"], p["v"], h, c.heads)
    kv = LayerKV(keys=_write(kv.keys, new.keys, start, 2),
                 values=_write(kv.values, new.values, start, 1))
    x = norm_out(x + _attend(p["q"], p["o"], h, kv, self_mask, c.heads), "self_norm")

    h = norm_in(x, "cross_norm")
    x = norm_out(x + _attend(p["cq"], p["co"], h, cross, cross_mask, c.heads), "cross_norm")

    h = norm_in(x, "ffn_norm")
    ffn = dense(p["fc2"], activation(c.activation)(dense(p["fc1"], h)))
    return norm_out(x + ffn, "ffn_norm"), kv


def _embed(params: Params, c: TextDecoderConfig, tokens: jax.Array,
           positions: jax.Array) -> jax.Array:
    x = jnp.take(params["embed"], tokens, axis=0) * c.embed_scale
    if c.positions == "sinusoidal":
        # Speech2Text: position p sits at row pad + 1 + p; pad tokens read the zero row,
        # as transformers' incremental position ids do.
        table = jnp.asarray(sinusoidal_table(c.max_positions + c.position_offset + 1, c.d_model,
                                             c.pad_token_id))
        rows = positions + c.position_offset
        if c.pad_token_id is not None:
            rows = jnp.where(tokens == c.pad_token_id, c.pad_token_id, rows)
    else:
        table, rows = params["pos"], positions + c.position_offset
    x = x + jnp.take(table, rows, axis=0, mode="clip")
    return layer_norm(params["embed_norm"], x, c.layer_norm_eps) if c.embed_norm else x


def _cross_kv(params: Params, config: TextDecoderConfig, encoder_out: jax.Array,
              mask: jax.Array | None = None) -> CrossCache:
    """encoder_out [B, T, D] (already projected to d_model), mask bool [B, T] | None ->
    every layer's cross-attention keys/values, computed once per encoder output."""
    if mask is None:
        mask = jnp.ones(encoder_out.shape[:2], bool)
    layers = tuple(_kv(p["ck"], p["cv"], encoder_out, config.heads) for p in params["layers"])
    return CrossCache(layers=layers, mask=mask)


def _decode(params: Params, config: TextDecoderConfig, cache: DecoderCache, cross: CrossCache,
            tokens: jax.Array, num_valid: jax.Array | None = None,
            logits_at: jax.Array | None = None) -> tuple[jax.Array, DecoderCache]:
    """tokens int32 [B, S] -> (logits float32 [B, S, V], cache advanced by num_valid [B]).

    Row b's S new keys/values are written at cache.length[b]; tokens past num_valid[b] are
    padding the next call overwrites. `logits_at` int32 [B, K]: logits [B, K, V] of those
    positions only (models/whisper/model.py `decode`). Each S compiles once.
    """
    c = config
    tokens = tokens.astype(jnp.int32)
    b, s = tokens.shape
    if num_valid is None:
        num_valid = jnp.full((b,), s, jnp.int32)
    max_len = cache.layers[0].values.shape[2]
    positions = cache.length[:, None] + jnp.arange(s, dtype=jnp.int32)  # [B, S]
    x = _embed(params, c, tokens, positions)
    # Query at position p sees cached keys [0, p]: older entries plus this call's prefix.
    self_mask = (jnp.arange(max_len)[None, None, :] <= positions[:, :, None])[:, None]
    cross_mask = cross.mask[:, None, None, :]
    layers = []
    for p, kv, ckv in zip(params["layers"], cache.layers, cross.layers, strict=True):
        x, kv = _layer(p, c, x, kv, cache.length, self_mask, ckv, cross_mask)
        layers.append(kv)
    if c.final_norm:
        x = layer_norm(params["final_norm"], x, c.layer_norm_eps)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
    # [V, D]; tied unless stored apart
    head = params["lm_head"] if "lm_head" in params else params["embed"]
    # Contract [B*S, D] rows with the [V, D] table's last axis directly, so XLA does not
    # materialise a transposed copy of the table every step (as in models/whisper/model.py).
    flat = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), head, (((1,), (1,)), ((), ())))
    logits = flat.reshape(b, x.shape[1], -1)
    overflow = cache.length + s > max_len
    logits = jnp.where(overflow[:, None, None], jnp.nan, logits)
    return logits, DecoderCache(layers=tuple(layers), length=cache.length + num_valid)


cross_kv = jax.jit(_cross_kv, static_argnames="config")
decode = jax.jit(_decode, static_argnames="config", donate_argnames="cache")


@dataclasses.dataclass(frozen=True)
class TextDecoder:
    """`IncrementalDecoder` (models/decoding.py) over `params["decoder"]` of a speech
    model; `cross` is the `CrossCache` from `cross_kv`."""

    config: TextDecoderConfig
    max_len: int

    def init_cache(self, batch: int) -> DecoderCache:
        return init_cache(self.config, batch, self.max_len)

    def step(self, params: Any, cache: Any, cross: Any, tokens: jax.Array,
             num_valid: jax.Array, logits_at: jax.Array | None = None) -> tuple[jax.Array, Any]:
        return decode(params["decoder"], self.config, cache, cross, tokens, num_valid,
                      logits_at)


# --------------------------------------------------------------------------- conversion


def _get(t: Mapping[str, np.ndarray], name: str, used: set[str]) -> np.ndarray:
    if name not in t:
        raise KeyError(f"missing decoder tensor {name!r}")
    used.add(name)
    return np.asarray(t[name], np.float32)


def _check_unused(t: Mapping[str, np.ndarray], used: set[str], what: str) -> None:
    unused = sorted(set(t) - used)
    if unused:
        raise ValueError(f"unused tensors in the {what} decoder: {unused[:5]}")


def params_from_bart(config: TextDecoderConfig, tensors: Mapping[str, np.ndarray],
                     prefix: str = "model.decoder.", head: str = "lm_head.weight",
                     ignore: tuple[str, ...] = ()) -> Params:
    """BART / mBART / Speech2Text decoder weights (PyTorch names under `prefix`, output
    projection `head`) -> params. Raises KeyError for a missing tensor and ValueError for
    decoder tensors that were not used (other than `ignore`)."""
    used: set[str] = set(ignore)
    own = {k: v for k, v in tensors.items() if k.startswith(prefix) or k == head}

    def get(name: str) -> np.ndarray:
        return _get(own, prefix + name, used)

    def lin(name: str, bias: bool = True) -> Params:
        p = {"w": get(f"{name}.weight").T}
        if bias:
            p["b"] = get(f"{name}.bias")
        return p

    def norm(name: str) -> Params:
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    params: Params = {"embed": get("embed_tokens.weight")}
    if config.positions == "learned":
        params["pos"] = get("embed_positions.weight")
    elif prefix + "embed_positions.weights" in own:  # a saved sinusoid buffer: not needed
        used.add(prefix + "embed_positions.weights")
    if config.embed_norm:
        params["embed_norm"] = norm("layernorm_embedding")
    if config.final_norm:
        params["final_norm"] = norm("layer_norm")
    layers = []
    for i in range(config.layers):
        n = f"layers.{i}"
        layers.append({
            "self_norm": norm(f"{n}.self_attn_layer_norm"),
            "q": lin(f"{n}.self_attn.q_proj"), "k": lin(f"{n}.self_attn.k_proj"),
            "v": lin(f"{n}.self_attn.v_proj"), "o": lin(f"{n}.self_attn.out_proj"),
            "cross_norm": norm(f"{n}.encoder_attn_layer_norm"),
            "cq": lin(f"{n}.encoder_attn.q_proj"), "ck": lin(f"{n}.encoder_attn.k_proj"),
            "cv": lin(f"{n}.encoder_attn.v_proj"), "co": lin(f"{n}.encoder_attn.out_proj"),
            "ffn_norm": norm(f"{n}.final_layer_norm"),
            "fc1": lin(f"{n}.fc1"), "fc2": lin(f"{n}.fc2"),
        })  # fmt: skip
    params["layers"] = layers
    if head in own:
        w = _get(own, head, used)
        if not np.array_equal(w, params["embed"]):
            params["lm_head"] = w
    _check_unused(own, used, config.kind)
    return params


def params_from_gpt2(config: TextDecoderConfig, tensors: Mapping[str, np.ndarray],
                     prefix: str = "transformer.", head: str = "lm_head.weight") -> Params:
    """GPT-2 (`add_cross_attention=True`) weights -> the same params tree as BART's: the
    fused `c_attn` is split into q/k/v; GPT-2's Conv1D weights are already [in, out]."""
    used: set[str] = set()
    own = {k: v for k, v in tensors.items() if k.startswith(prefix) or k == head}
    d = config.d_model

    def get(name: str) -> np.ndarray:
        return _get(own, prefix + name, used)

    def conv(name: str) -> Params:
        return {"w": get(f"{name}.weight"), "b": get(f"{name}.bias")}

    def norm(name: str) -> Params:
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    def split(p: Params, n: int) -> list[Params]:
        return [{"w": p["w"][:, i * d:(i + 1) * d], "b": p["b"][i * d:(i + 1) * d]}
                for i in range(n)]

    params: Params = {"embed": get("wte.weight"), "pos": get("wpe.weight"),
                      "final_norm": norm("ln_f")}
    layers = []
    for i in range(config.layers):
        n = f"h.{i}"
        if prefix + f"{n}.crossattention.c_attn.weight" not in own:
            raise ValueError("GPT-2 decoder without cross-attention (add_cross_attention=False)")
        q, k, v = split(conv(f"{n}.attn.c_attn"), 3)
        ck, cv = split(conv(f"{n}.crossattention.c_attn"), 2)
        layers.append({
            "self_norm": norm(f"{n}.ln_1"), "q": q, "k": k, "v": v,
            "o": conv(f"{n}.attn.c_proj"),
            "cross_norm": norm(f"{n}.ln_cross_attn"),
            "cq": conv(f"{n}.crossattention.q_attn"), "ck": ck, "cv": cv,
            "co": conv(f"{n}.crossattention.c_proj"),
            "ffn_norm": norm(f"{n}.ln_2"), "fc1": conv(f"{n}.mlp.c_fc"),
            "fc2": conv(f"{n}.mlp.c_proj"),
        })  # fmt: skip
        for buf in (f"{n}.attn.bias", f"{n}.attn.masked_bias", f"{n}.crossattention.bias",
                    f"{n}.crossattention.masked_bias"):
            used.add(prefix + buf)  # old checkpoints store causal-mask buffers
    params["layers"] = layers
    if head in own:
        w = _get(own, head, used)
        if not np.array_equal(w, params["embed"]):
            params["lm_head"] = w
    _check_unused(own, used, "gpt2")
    return params


def params_from_hf(config: TextDecoderConfig, tensors: Mapping[str, np.ndarray],
                   prefix: str = "") -> Params:
    """A causal-LM decoder's weights (`{prefix}model.decoder.*` or `{prefix}transformer.*`,
    `{prefix}lm_head.weight`) -> params, by `config.kind`."""
    if config.kind == "gpt2":
        return params_from_gpt2(config, tensors, f"{prefix}transformer.", f"{prefix}lm_head.weight")
    return params_from_bart(config, tensors, f"{prefix}model.decoder.", f"{prefix}lm_head.weight")


def generate_ids(decoder: TextDecoder, params: Any, cross: CrossCache, *, start_token: int,
                 eos_token: int, forced_bos_token: int | None, max_new_tokens: int,
                 beam_size: int = 1) -> list[int]:
    """Token ids (end token excluded) for one encoded input, as transformers' `generate`
    does it: the decoder start token as prompt, an optional forced first token, greedy or
    beam search on the shared engine (`models/decoding.py`)."""
    prompt = jnp.asarray([[start_token]], jnp.int32)
    filters = () if forced_bos_token is None else (decoding.ForceTokens((forced_bos_token,)),)
    kw: dict[str, Any] = dict(eot=eos_token, max_new_tokens=max_new_tokens, renormalize=False,
                              filters=filters)
    if beam_size > 1:
        res = decoding.beam_search(decoder, params, cross, prompt, beams=beam_size, **kw)
    else:
        res = decoding.greedy_search(decoder, params, cross, prompt, **kw)
    return [int(t) for t in np.asarray(res.tokens[0])[: int(res.lengths[0])]]
