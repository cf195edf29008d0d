"""The wav2vec2 transformer encoder: a grouped positional conv, then post-LN layers (base
layout) or pre-LN "stable layer norm" layers with a final norm (large layout), offline
and streamed over a window with cached keys/values.

Streaming: the positional conv (kernel K = num_conv_pos_embeddings) reads
`pos_conv_left` frames before the window and is exact only with
right_frames >= K - 1 - K // 2 (63 for the base models' 128); with less, its missing
right context is read as zeros.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import (
    Params,
    activation,
    attend,
    conv1d,
    conv_from_torch,
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

# ----------------------------------------------------------------------------- loading


def _weight_normed(t: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Folds weight norm (dim=2, either spelling) of a conv into a plain weight."""
    spellings = [(f"{name}.weight_g", f"{name}.weight_v"),
                 (f"{name}.parametrizations.weight.original0",
                  f"{name}.parametrizations.weight.original1")]
    for g_name, v_name in spellings:
        if g_name in t:
            g, v = t[g_name], t[v_name]
            norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(0, 1), keepdims=True))
            return (g * v / norm).astype(np.float32)
    return t[f"{name}.weight"]


def _layer_params(config: Wav2Vec2Config, t: Mapping[str, np.ndarray], name: str) -> Params:
    layer = {
        "q": dense_from_torch(t, f"{name}.attention.q_proj"),
        "k": dense_from_torch(t, f"{name}.attention.k_proj"),
        "v": dense_from_torch(t, f"{name}.attention.v_proj"),
        "o": dense_from_torch(t, f"{name}.attention.out_proj"),
        "attn_norm": norm_from_torch(t, f"{name}.layer_norm"),
        "ff_in": dense_from_torch(t, f"{name}.feed_forward.intermediate_dense"),
        "ff_out": dense_from_torch(t, f"{name}.feed_forward.output_dense"),
        "ff_norm": norm_from_torch(t, f"{name}.final_layer_norm"),
    }
    if config.do_stable_layer_norm and config.adapter_attn_dim is not None:
        layer["adapter"] = {"norm": norm_from_torch(t, f"{name}.adapter_layer.norm"),
                            "l1": dense_from_torch(t, f"{name}.adapter_layer.linear_1"),
                            "l2": dense_from_torch(t, f"{name}.adapter_layer.linear_2")}
    return layer


def params_from_torch(config: Wav2Vec2Config, t: Mapping[str, np.ndarray]) -> Params:
    """The encoder's weights (names without the model prefix) -> `{"pos_conv", "layers"}`."""
    return {
        "pos_conv": {"w": conv_from_torch(_weight_normed(t, "encoder.pos_conv_embed.conv")),
                     "b": t["encoder.pos_conv_embed.conv.bias"]},
        "layers": [_layer_params(config, t, f"encoder.layers.{i}")
                   for i in range(config.num_hidden_layers)],
    }


# ----------------------------------------------------------------------------- layers


def _encoder_layer(p: Params, config: Wav2Vec2Config, x: jax.Array, cache_k: jax.Array,
                   cache_v: jax.Array, key_mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One transformer layer on x [B, T, D] attending to [cache (L) ; x (T)].

    Returns (x_out, k, v) with this layer's keys/values of x [B, T, H, Dh] for the cache.
    """
    eps, h = config.layer_norm_eps, config.num_attention_heads
    a_in = layer_norm(p["attn_norm"], x, eps) if config.do_stable_layer_norm else x
    q = heads(dense(p["q"], a_in), h)
    k = heads(dense(p["k"], a_in), h)
    v = heads(dense(p["v"], a_in), h)
    attn = dense(p["o"], attend(q, jnp.concatenate([cache_k, k], 1),
                                jnp.concatenate([cache_v, v], 1), key_mask))
    act = config.hidden_act
    if config.do_stable_layer_norm:  # pre-LN ("stable layer norm")
        x = x + attn
        x = x + feed_forward(p["ff_in"], p["ff_out"], layer_norm(p["ff_norm"], x, eps), act)
        if "adapter" in p:
            a = p["adapter"]
            x = x + dense(a["l2"], jax.nn.relu(dense(a["l1"], layer_norm(a["norm"], x))))
    else:  # post-LN
        x = layer_norm(p["attn_norm"], x + attn, eps)
        x = layer_norm(p["ff_norm"], x + feed_forward(p["ff_in"], p["ff_out"], x, act), eps)
    return x, k, v


def pos_conv(params: Params, config: Wav2Vec2Config, x: jax.Array,
             padding: tuple[int, int]) -> jax.Array:
    """Weight-normed grouped positional conv + activation; output has T_in + sum(padding)
    - K + 1 frames (padding (K//2, K-1-K//2) gives torch's "same" conv with one frame dropped).
    """
    p = params["pos_conv"]
    y = conv1d(x, p["w"], padding=padding, groups=config.num_conv_pos_embedding_groups)
    return activation(config.feat_extract_activation)(y + p["b"])


# ----------------------------------------------------------------------------- encoder


def encode_offline(params: Params, config: Wav2Vec2Config, x: jax.Array,
                   frame_mask: jax.Array) -> jax.Array:
    """Transformer encoder on projected features x [B, T, D] with frame_mask [B, T]."""
    x = jnp.where(frame_mask[..., None], x, 0.0)
    k = config.num_conv_pos_embeddings
    x = x + pos_conv(params, config, x, (k // 2, k - 1 - k // 2))
    if not config.do_stable_layer_norm:
        x = layer_norm(params["enc_norm"], x, config.layer_norm_eps)
    b, h, dh = x.shape[0], config.num_attention_heads, config.head_dim
    empty = jnp.zeros((b, 0, h, dh), x.dtype)
    for p in params["layers"]:
        x, _, _ = _encoder_layer(p, config, x, empty, empty, frame_mask)
    if config.do_stable_layer_norm:
        x = layer_norm(params["enc_norm"], x, config.layer_norm_eps)
    return x


def init_layers(config: Wav2Vec2Config, batch: int,
                stream: StreamConfig) -> tuple[LayerState, ...]:
    """Empty key/value caches of `left_frames` frames per layer."""
    f32 = jnp.float32
    h, dh = config.num_attention_heads, config.head_dim
    return tuple(
        LayerState(k=jnp.zeros((batch, stream.left_frames, h, dh), f32),
                   v=jnp.zeros((batch, stream.left_frames, h, dh), f32), conv_tail=None)
        for _ in range(config.num_hidden_layers))


def encoder_window(params: Params, config: Wav2Vec2Config, stream: StreamConfig,
                   frames: jax.Array, layers: tuple[LayerState, ...], key_index: jax.Array,
                   num_samples: jax.Array) -> tuple[jax.Array, tuple[LayerState, ...]]:
    """Streaming encoder over the window x = frames[:, -(C + R):] of projected frames
    `frames` [B, P + C + R, D] (P = pos_conv_left, the positional conv's left context);
    `key_index` [B, L + C + R] is the offline frame of every key slot (cache, then window).
    """
    c, r = stream.chunk_frames, stream.right_frames
    x = frames[:, -(c + r):]
    x = x + pos_conv(params, config, frames, (0, config.pos_conv_right))[:, -(c + r):]
    if not config.do_stable_layer_norm:
        x = layer_norm(params["enc_norm"], x, config.layer_norm_eps)
    key_mask = frame_valid(config, key_index, num_samples)
    new_layers = []
    for p, ls in zip(params["layers"], layers, strict=True):
        x, k, v = _encoder_layer(p, config, x, ls.k, ls.v, key_mask)
        new_layers.append(LayerState(k=push(ls.k, k[:, :c]), v=push(ls.v, v[:, :c]),
                                     conv_tail=None))
    if config.do_stable_layer_norm:
        x = layer_norm(params["enc_norm"], x, config.layer_norm_eps)
    return x, tuple(new_layers)


def prepare_stream(params: Params, config: Wav2Vec2Config, stream: StreamConfig) -> Params:
    """Nothing to precompute for this encoder: `params` unchanged."""
    return params
