"""The optional wav2vec2 adapter (`add_adapter`): an optional projection, then strided
Conv1d + GLU layers (kernel `adapter_kernel_size`, stride `adapter_stride`, padding 1)
between the encoder and the CTC head or a text decoder; offline and streamed.

Streaming: the strided convs keep input tails and emit
C' = chunk_frames / adapter_stride^num_adapter_layers outputs per call (chunk_frames must
be a multiple of `config.adapter_factor`; `StreamConfig.from_ms` makes it one).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import (
    Params,
    conv1d,
    conv_from_torch,
    dense,
    dense_from_torch,
    layer_norm,
    norm_from_torch,
)
from models.wav2vec2.config import StreamConfig, Wav2Vec2Config


def params_from_torch(config: Wav2Vec2Config, t: Mapping[str, np.ndarray]) -> Params:
    """The `adapter.*` weights (names without the model prefix) -> params."""
    adapter: Params = {"layers": [
        {"w": conv_from_torch(t[f"adapter.layers.{i}.conv.weight"]),
         "b": t[f"adapter.layers.{i}.conv.bias"]}
        for i in range(config.num_adapter_layers)]}
    if config.output_hidden_size != config.hidden_size:
        adapter["proj"] = dense_from_torch(t, "adapter.proj")
        adapter["proj_norm"] = norm_from_torch(t, "adapter.proj_layer_norm")
    return adapter


def adapter(params: Params, config: Wav2Vec2Config, x: jax.Array) -> jax.Array:
    """Optional adapter (offline): [B, T, D] -> [B, T', output_hidden_size]."""
    p = params["adapter"]
    if "proj" in p:
        x = layer_norm(p["proj_norm"], dense(p["proj"], x))
    for layer in p["layers"]:
        x = conv1d(x, layer["w"], config.adapter_stride, (1, 1)) + layer["b"]
        x = jax.nn.glu(x, axis=-1)
    return x


def plan(config: Wav2Vec2Config, stream: StreamConfig) -> list[tuple[int, int, int]]:
    """Static geometry of the streamed adapter convs: per layer (inputs per call m, input
    offset, tail length). Call `step` feeds inputs [step * m + offset, ... + m) and the conv
    emits the m / stride outputs whose last input has arrived, so it keeps `tail` inputs."""
    k, s, pad = config.adapter_kernel_size, config.adapter_stride, 1  # transformers: padding=1
    m, off = stream.chunk_frames, -config.fe_delay_frames - stream.right_frames
    levels = []
    for _ in range(config.num_adapter_layers if config.add_adapter else 0):
        if m % s:
            raise ValueError(f"chunk_frames must be a multiple of {s}^{config.num_adapter_layers}"
                             " with an adapter")
        next_off = (off + m - k + pad) // s - m // s + 1
        levels.append((m, off, off - s * next_off + pad))
        m, off = m // s, next_off
    levels.append((m, off, 0))  # the output level
    return levels


def lengths(config: Wav2Vec2Config, frames: jax.Array) -> list[jax.Array]:
    """Positions per adapter level for `frames` [B] encoder frames: the outputs of the
    offline convs (padding 1 each side); for kernel 3 that is transformers' length rule."""
    k, s = config.adapter_kernel_size, config.adapter_stride
    out = [frames]
    for _ in range(config.num_adapter_layers if config.add_adapter else 0):
        n = out[-1]
        out.append(jnp.where(n > 0, jnp.maximum((n + 2 - k) // s + 1, 0), 0))
    return out


def stream_adapter(params: Params, config: Wav2Vec2Config, stream: StreamConfig,
                   x: jax.Array, step: jax.Array, tails: tuple[jax.Array, ...],
                   level_lengths: list[jax.Array]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One streamed call of the adapter: x [B, chunk_frames, D] of encoder frames, `step`
    [B] calls so far, `tails` the convs' input tails, `level_lengths` from `lengths`.
    Returns (x [B, C', output_hidden_size], new tails)."""
    p = params["adapter"]
    if "proj" in p:
        x = layer_norm(p["proj_norm"], dense(p["proj"], x))
    new_tails = []
    for layer, (m, off, _), tail, length in zip(p["layers"], plan(config, stream), tails,
                                                level_lengths, strict=False):
        index = step[:, None] * m + off + jnp.arange(m)[None, :]
        # outside the utterance the conv reads zero padding, as offline
        x = jnp.where(((index >= 0) & (index < length[:, None]))[..., None], x, 0.0)
        x = jnp.concatenate([tail, x], 1)
        new_tails.append(x[:, x.shape[1] - tail.shape[1]:])
        x = conv1d(x, layer["w"], config.adapter_stride) + layer["b"]
        x = jax.nn.glu(x, axis=-1)
    return x, tuple(new_tails)
