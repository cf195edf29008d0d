"""wav2vec2 streaming state: typed pytrees, batch axis first on every array, so batching
streams is `jax.tree.map(jnp.concatenate, ...)` (see `streaming.stack_states`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.wav2vec2.config import StreamConfig, Wav2Vec2Config


@struct.dataclass
class RunningStats:
    """Per-stream running mean and variance over time (Chan's parallel merge)."""

    count: jax.Array  # [B] values seen
    mean: jax.Array  # [B, C]
    m2: jax.Array  # [B, C] sum of squared deviations

    @classmethod
    def zeros(cls, batch: int, channels: int) -> RunningStats:
        return cls(count=jnp.zeros((batch,), jnp.float32),
                   mean=jnp.zeros((batch, channels), jnp.float32),
                   m2=jnp.zeros((batch, channels), jnp.float32))

    def update(self, x: jax.Array, valid: jax.Array) -> RunningStats:
        """Merges the valid steps of x [B, T, C] (valid [B, T])."""
        valid = valid[..., None]
        n_b = valid[..., 0].sum(1).astype(jnp.float32)
        mean_b = jnp.where(valid, x, 0.0).sum(1) / jnp.maximum(n_b, 1.0)[:, None]
        m2_b = jnp.where(valid, jnp.square(x - mean_b[:, None]), 0.0).sum(1)
        total = self.count + n_b
        delta = mean_b - self.mean
        w = (n_b / jnp.maximum(total, 1.0))[:, None]
        return RunningStats(count=total, mean=self.mean + delta * w,
                            m2=self.m2 + m2_b + jnp.square(delta) * (self.count[:, None] * w))

    def normalize(self, x: jax.Array, eps: float) -> jax.Array:
        var = self.m2 / jnp.maximum(self.count, 1.0)[:, None]
        return (x - self.mean[:, None]) * jax.lax.rsqrt(var[:, None] + eps)


@struct.dataclass
class FeatureState:
    """Streaming feature extractor: exact conv tails plus running statistics."""

    carry: jax.Array  # [B, fe_delay] raw samples held back to align frames
    tails: tuple[jax.Array, ...]  # per conv: its last max(K - S, 0) inputs [B, K - S, C_in]
    norm: RunningStats  # first-conv outputs, channels conv_dim[0] (group-norm layout)
    audio: RunningStats  # raw samples, 1 channel (StreamConfig.normalize)


@struct.dataclass
class LayerState:
    """One encoder layer's left context: keys/values of the last `left_frames` emitted
    frames, and (conformer) the depthwise-conv input of the last (K - 1) / 2 emitted frames."""

    k: jax.Array  # [B, left_frames, H, Dh]
    v: jax.Array  # [B, left_frames, H, Dh]
    conv_tail: jax.Array | None  # [B, (K_dw - 1) // 2, D] or None


@struct.dataclass
class StreamState:
    """Everything a stream carries between chunks; batch axis first on every array."""

    features: FeatureState
    frames: jax.Array  # [B, pos_conv_left + right_frames, D] projected frames not yet final
    layers: tuple[LayerState, ...]
    adapter: tuple[jax.Array, ...]  # per adapter conv: input tail [B, tail, width] (or ())
    step: jax.Array  # [B] int32: chunks consumed
    num_samples: jax.Array  # [B] int32: real samples received in this segment
    ended: jax.Array  # [B] bool: a short chunk was seen; later audio is ignored
    config: Wav2Vec2Config = struct.field(pytree_node=False)
    stream: StreamConfig = struct.field(pytree_node=False)


@struct.dataclass
class ChunkOutput:
    logits: jax.Array  # [B, out_frames, V]; out_frames = chunk_frames / adapter_stride^layers
    mask: jax.Array  # [B, out_frames] bool: True where the frame belongs to the utterance


def push(cache: jax.Array, new: jax.Array) -> jax.Array:
    """Shifts `new` [B, n, ...] into a fixed-size cache [B, L, ...] (oldest frames drop)."""
    size = cache.shape[1]
    if size == 0:
        return cache
    return jnp.concatenate([cache, new], 1)[:, -size:]
