"""Key/value caches of the incremental text decoders (Whisper's, and the text decoders of
models/seq2seq): one small struct per layer, every leaf batch first, so batching rows is
`jax.tree.map(jnp.stack, ...)` and a beam reorder is `jax.tree.map(lambda x: x[idx], c)`."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class LayerKV:
    """Keys [B, H, Dh, L] and values [B, H, L, Dh] of one attention layer.

    Stored in the operand layouts of XLA's batched matmuls (q.k and w.v) because XLA on
    CPU otherwise copies the whole cache into those layouts on every decode step
    (measured: several times slower steps with a 1500-frame cross cache).
    """

    keys: jax.Array
    values: jax.Array


@struct.dataclass
class DecoderCache:
    """Self-attention cache of every decoder layer plus each row's filled length.

    Every leaf has the batch axis first, so `jax.tree.map(lambda x: x[idx], cache)`
    reorders or selects rows (beams).
    """

    layers: tuple[LayerKV, ...]  # one per decoder layer, L = max_len
    length: jax.Array  # int32 [B]: positions [0, length) hold valid keys/values


@struct.dataclass
class CrossCache:
    """Cross-attention keys/values of every decoder layer for one batch of encoder outputs."""

    layers: tuple[LayerKV, ...]  # one per decoder layer, L = T
    mask: jax.Array  # bool [B, T]: True where the encoder frame is real (not padding)
