"""The wav2vec2-conformer encoder: conformer blocks on the wav2vec2 front end.

The feature extractor, feature projection, adapter, CTC head, loading and the streaming
driver are the wav2vec2 package's (`models.wav2vec2.encoders` picks this encoder by
`model_type`); this module holds the conformer parts: its config, position embeddings
("rotary", "relative" Transformer-XL style, or None), blocks with two half-step
feed-forwards, self-attention, the convolution module (pointwise + GLU, depthwise conv,
batch norm with running stats, swish, pointwise) and the final norm.

As in transformers, the encoder's positional conv weights exist in checkpoints but are
not used, so the conformer needs no positional-conv look-ahead. In streaming, each
block's depthwise conv keeps the GLU output of the last (K - 1) / 2 emitted frames; its
right context comes from the look-ahead frames (zeros past them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import (
    Params,
    activation,
    attend,
    dense,
    dense_from_torch,
    feed_forward,
    heads,
    layer_norm,
    norm_from_torch,
)
from models.wav2vec2.config import StreamConfig, Wav2Vec2Config
from models.wav2vec2.frontend import frame_valid
from models.wav2vec2.state import LayerState, push


@dataclasses.dataclass(frozen=True)
class Wav2Vec2ConformerConfig(Wav2Vec2Config):
    """wav2vec2 config plus the conformer fields; defaults follow transformers."""

    position_embeddings_type: str | None = "relative"  # "rotary", "relative" or None
    rotary_embedding_base: int = 10000
    max_source_positions: int = 5000
    conv_depthwise_kernel_size: int = 31
    model_type: str = "wav2vec2-conformer"

    @classmethod
    def from_hf_config(cls, hf: dict) -> Wav2Vec2ConformerConfig:
        config = super().from_hf_config(hf)
        # None is a real choice here ("no position embeddings"), not "use the default"
        return dataclasses.replace(
            config, model_type="wav2vec2-conformer",
            position_embeddings_type=hf.get("position_embeddings_type", "relative"))

    @classmethod
    def tiny(cls, **overrides: Any) -> Wav2Vec2ConformerConfig:
        base = dict(conv_depthwise_kernel_size=7, hidden_act="swish")
        base.update(overrides)
        return super().tiny(**base)

    @property
    def pos_conv_left(self) -> int:
        """The conformer has no positional conv: no left context."""
        return 0

    @property
    def pos_conv_right(self) -> int:
        """... and no positional-conv look-ahead."""
        return 0

    @property
    def pads_exactly(self) -> bool:
        """Never: the conv module reads padded frames, as transformers does."""
        return False


def _conformer(config: Wav2Vec2Config) -> Wav2Vec2ConformerConfig:
    """`config` typed as what it is: `encoders.ENCODERS` routes only "wav2vec2-conformer"
    configs (its `config_class`, this module's config) to this module's functions, whose
    signatures are the `Encoder` contract's."""
    return cast(Wav2Vec2ConformerConfig, config)


def _layer_params(config: Wav2Vec2ConformerConfig, t: Mapping[str, np.ndarray],
                  name: str) -> Params:
    """One conformer block's PyTorch weights (prefix `name`) -> params."""
    cm = f"{name}.conv_module"
    p = {
        "ffn1_norm": norm_from_torch(t, f"{name}.ffn1_layer_norm"),
        "ffn1_in": dense_from_torch(t, f"{name}.ffn1.intermediate_dense"),
        "ffn1_out": dense_from_torch(t, f"{name}.ffn1.output_dense"),
        "attn_norm": norm_from_torch(t, f"{name}.self_attn_layer_norm"),
        "q": dense_from_torch(t, f"{name}.self_attn.linear_q"),
        "k": dense_from_torch(t, f"{name}.self_attn.linear_k"),
        "v": dense_from_torch(t, f"{name}.self_attn.linear_v"),
        "o": dense_from_torch(t, f"{name}.self_attn.linear_out"),
        "conv": {
            "norm": norm_from_torch(t, f"{cm}.layer_norm"),
            "pw1": {"w": t[f"{cm}.pointwise_conv1.weight"][:, :, 0].T},
            "dw": np.transpose(t[f"{cm}.depthwise_conv.weight"], (2, 1, 0)),  # [K, 1, D]
            "bn": {"scale": t[f"{cm}.batch_norm.weight"], "bias": t[f"{cm}.batch_norm.bias"],
                   "mean": t[f"{cm}.batch_norm.running_mean"],
                   "var": t[f"{cm}.batch_norm.running_var"]},
            "pw2": {"w": t[f"{cm}.pointwise_conv2.weight"][:, :, 0].T},
        },
        "ffn2_norm": norm_from_torch(t, f"{name}.ffn2_layer_norm"),
        "ffn2_in": dense_from_torch(t, f"{name}.ffn2.intermediate_dense"),
        "ffn2_out": dense_from_torch(t, f"{name}.ffn2.output_dense"),
        "final_norm": norm_from_torch(t, f"{name}.final_layer_norm"),
    }
    if config.position_embeddings_type == "relative":
        p["pos"] = {"w": t[f"{name}.self_attn.linear_pos.weight"].T,
                    "u": t[f"{name}.self_attn.pos_bias_u"],
                    "v": t[f"{name}.self_attn.pos_bias_v"]}
    return p


def params_from_torch(config: Wav2Vec2Config, t: Mapping[str, np.ndarray]) -> Params:
    """The encoder's weights (names without the model prefix) -> `{"layers"}`."""
    return {"layers": [_layer_params(_conformer(config), t, f"encoder.layers.{i}")
                       for i in range(config.num_hidden_layers)]}


# ----------------------------------------------------------------------------- positions


def _rotate(config: Wav2Vec2ConformerConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding of x [B, T, D] at absolute frame `positions` [B, T], applied per
    head to the block input (before the q/k projections, as transformers does)."""
    dh = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rotary_embedding_base)
                      ** (np.arange(0, dh, 2).astype(np.float32) / np.float32(dh)))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]  # [B, T, 1, Dh]
    xh = heads(x, config.num_attention_heads)
    half = dh // 2
    rotated = jnp.concatenate([-xh[..., half:], xh[..., :half]], -1)
    return (xh * jnp.cos(emb) + rotated * jnp.sin(emb)).reshape(x.shape)


def _relative_table(d_model: int, rel: np.ndarray) -> np.ndarray:
    """Sinusoid of relative distance (query - key) [N] -> [N, D] (sin even, cos odd)."""
    div = np.exp(np.arange(0, d_model, 2).astype(np.float32)
                 * np.float32(-(math.log(10000.0) / d_model)))
    angle = rel.astype(np.float32)[:, None] * div[None, :]
    table = np.zeros((len(rel), d_model), np.float32)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    return table


def _distance_table(p: Params, config: Wav2Vec2Config, values: np.ndarray) -> jax.Array:
    """W_pos pe(d) for the distances `values` [N] -> [N, H, Dh]."""
    table = jnp.asarray(_relative_table(config.hidden_size, values)) @ p["w"]
    return table.reshape(len(values), config.num_attention_heads, config.head_dim)


def _relative_bias(p: Params, config: Wav2Vec2Config, q: jax.Array, q_pos: np.ndarray,
                   k_pos: np.ndarray) -> jax.Array:
    """Transformer-XL position term ((q + bias_v) . W_pos pe(i - j)) * scale -> [B, H, Tq, Tk].

    Slot positions are static (only distances matter), so the gather index is a constant;
    `p["table"]` (from `prepare_stream`) replaces the projection when it fits.
    """
    rel = q_pos[:, None] - k_pos[None, :]
    lo = int(rel.min())
    values = np.arange(lo, int(rel.max()) + 1)
    table = p.get("table")
    if table is None or table.shape[0] != len(values):
        table = _distance_table(p, config, values)
    scores = jnp.einsum("bqhd,nhd->bhqn", q + p["v"], table)
    scores = scores[:, :, np.arange(len(q_pos))[:, None], rel - lo]
    return scores * (config.head_dim ** -0.5)


def prepare_stream(params: Params, config: Wav2Vec2Config, stream: StreamConfig) -> Params:
    """Params with each relative-position block's projected distance table for the
    streaming window precomputed (it depends only on the weights and the window, and
    costs about as much as the rest of a block per chunk). Other models: unchanged."""
    config = _conformer(config)
    if config.position_embeddings_type != "relative":
        return params
    left, width = stream.left_frames, stream.chunk_frames + stream.right_frames
    values = np.arange(-(width - 1), left + width)  # query slot - key slot
    layers = [dict(p, pos=dict(p["pos"], table=_distance_table(p["pos"], config, values)))
              for p in params["layers"]]
    return dict(params, layers=layers)


# ----------------------------------------------------------------------------- block


def _conv_module(p: Params, config: Wav2Vec2ConformerConfig, x: jax.Array, tail: jax.Array,
                 mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Convolution module on x [B, T, D] with left context `tail` [B, P, D] (zeros offline)
    and zeros on the right. Returns (output [B, T, D], GLU output [B, T, D] for the tail)."""
    glu = jax.nn.glu(dense(p["pw1"], layer_norm(p["norm"], x)), axis=-1)
    if mask is not None:  # streaming: frames outside the utterance read as zero padding
        glu = jnp.where(mask[..., None], glu, 0.0)
    pad = (config.conv_depthwise_kernel_size - 1) // 2
    x = jnp.pad(jnp.concatenate([tail, glu], 1), ((0, 0), (0, pad), (0, 0)))
    # depthwise conv as a sum of shifted products: ~15x faster than XLA's grouped conv on CPU
    t = glu.shape[1]
    y = sum(x[:, i:i + t] * p["dw"][i, 0] for i in range(config.conv_depthwise_kernel_size))
    bn = p["bn"]
    y = (y - bn["mean"]) * jax.lax.rsqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
    return dense(p["pw2"], activation(config.hidden_act)(y)), glu


def _conv_tail(ls: LayerState) -> jax.Array:
    """The layer's depthwise-conv tail, which conformer layers always carry (`init_layers`;
    only the transformer's are None)."""
    assert ls.conv_tail is not None
    return ls.conv_tail


def _block(p: Params, config: Wav2Vec2ConformerConfig, x: jax.Array, ls: LayerState,
           key_mask: jax.Array, positions: jax.Array, q_pos: np.ndarray, k_pos: np.ndarray,
           conv_mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One conformer block on x [B, T, D] attending to [cached keys ; x].

    Returns (x_out, k, v, glu) for the caches. positions [B, T]: absolute frame (rotary);
    q_pos/k_pos: static slot positions of queries/keys (relative).
    """
    act, h = config.hidden_act, config.num_attention_heads
    x = x + 0.5 * feed_forward(p["ffn1_in"], p["ffn1_out"], layer_norm(p["ffn1_norm"], x), act)
    a = layer_norm(p["attn_norm"], x)
    qk_in = _rotate(config, a, positions) if config.position_embeddings_type == "rotary" else a
    q = heads(dense(p["q"], qk_in), h)
    k = heads(dense(p["k"], qk_in), h)
    v = heads(dense(p["v"], a), h)
    bias = None
    if config.position_embeddings_type == "relative":
        bias = _relative_bias(p["pos"], config, q, q_pos, k_pos)
        q = q + p["pos"]["u"]
    attn = attend(q, jnp.concatenate([ls.k, k], 1), jnp.concatenate([ls.v, v], 1),
                  key_mask, bias)
    x = x + dense(p["o"], attn)
    conv, glu = _conv_module(p["conv"], config, x, _conv_tail(ls), conv_mask)
    x = x + conv
    x = x + 0.5 * feed_forward(p["ffn2_in"], p["ffn2_out"], layer_norm(p["ffn2_norm"], x), act)
    return layer_norm(p["final_norm"], x), k, v, glu


def encode_offline(params: Params, config: Wav2Vec2Config, x: jax.Array,
                   frame_mask: jax.Array) -> jax.Array:
    """Conformer encoder on projected features x [B, T, D] with frame_mask [B, T]."""
    config = _conformer(config)
    b, t, d = x.shape
    x = jnp.where(frame_mask[..., None], x, 0.0)
    hh, dh = config.num_attention_heads, config.head_dim
    pad = (config.conv_depthwise_kernel_size - 1) // 2
    empty = LayerState(k=jnp.zeros((b, 0, hh, dh)), v=jnp.zeros((b, 0, hh, dh)),
                       conv_tail=jnp.zeros((b, pad, d)))
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    slots = np.arange(t)
    for p in params["layers"]:
        # transformers does not mask padded frames in the conv module; neither do we
        x, _, _, _ = _block(p, config, x, empty, frame_mask, positions, slots, slots, None)
    return layer_norm(params["enc_norm"], x, config.layer_norm_eps)


def init_layers(config: Wav2Vec2Config, batch: int,
                stream: StreamConfig) -> tuple[LayerState, ...]:
    """Empty key/value caches of `left_frames` frames and depthwise-conv tails per block."""
    config = _conformer(config)
    f32 = jnp.float32
    h, dh, d = config.num_attention_heads, config.head_dim, config.hidden_size
    conv_tail = (config.conv_depthwise_kernel_size - 1) // 2
    return tuple(
        LayerState(k=jnp.zeros((batch, stream.left_frames, h, dh), f32),
                   v=jnp.zeros((batch, stream.left_frames, h, dh), f32),
                   conv_tail=jnp.zeros((batch, conv_tail, d), f32))
        for _ in range(config.num_hidden_layers))


def encoder_window(params: Params, config: Wav2Vec2Config, stream: StreamConfig,
                   frames: jax.Array, layers: tuple[LayerState, ...], key_index: jax.Array,
                   num_samples: jax.Array) -> tuple[jax.Array, tuple[LayerState, ...]]:
    """Streaming conformer encoder over the window x = frames[:, -(C + R):] of projected
    frames; `key_index` [B, L + C + R] is the offline frame of every key slot (cache, then
    window)."""
    config = _conformer(config)
    c, r, left = stream.chunk_frames, stream.right_frames, stream.left_frames
    x = frames[:, -(c + r):]
    key_mask = frame_valid(config, key_index, num_samples)
    win_mask = key_mask[:, left:]
    positions = key_index[:, left:]
    k_pos = np.arange(key_index.shape[1])
    q_pos = k_pos[left:]
    new_layers = []
    for p, ls in zip(params["layers"], layers, strict=True):
        x, k, v, glu = _block(p, config, x, ls, key_mask, positions, q_pos, k_pos, win_mask)
        new_layers.append(LayerState(k=push(ls.k, k[:, :c]), v=push(ls.v, v[:, :c]),
                                     conv_tail=push(_conv_tail(ls), glu[:, :c])))
    return layer_norm(params["enc_norm"], x, config.layer_norm_eps), tuple(new_layers)
