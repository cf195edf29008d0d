"""Streaming wav2vec2: cached state per stream, one jitted step per chunk.

Encoder: each call appends `chunk_frames` new frames and runs the layers on a window of
`chunk_frames + right_frames` frames; the first `chunk_frames` are emitted and their
keys/values (and conformer conv inputs) are cached for `left_frames` frames of left
context. The `right_frames` look-ahead frames are recomputed next call. Caches are shifted
arrays of static size (concatenate + slice), not ring buffers, so a slot's frame index,
mask and relative distance are fixed functions of its position. All shapes are static:
one compile per (config, StreamConfig, batch size).

Latency: emitted frame g needs audio up to frame g + right_frames + 1, i.e.
chunk + (right_frames + 1) * total_stride samples (20 ms frames for the base models).
Attention is bidirectional offline, so streaming equals offline only when left and right
context cover the utterance.

End of a segment: pass `num_valid < chunk_samples` for the last audio, then call
`encode_chunk` with `num_valid = 0` `pending_chunks(state)` more times; outputs whose mask
is False are not frames of the utterance. Start the next segment with
`reset_slots(state, slots)` (or a fresh `init_state`); `keep_statistics=True` carries the
running group-norm statistics over, which helps base models (see the tests).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import Params, dense
from models.wav2vec2 import adapter
from models.wav2vec2.config import StreamConfig, Wav2Vec2Config
from models.wav2vec2.encoders import encoder_for
from models.wav2vec2.frontend import frame_valid, project, stream_features
from models.wav2vec2.state import ChunkOutput, FeatureState, RunningStats, StreamState

_DEFAULT_STREAM = StreamConfig()


def init_state(config: Wav2Vec2Config, batch: int,
               stream: StreamConfig = _DEFAULT_STREAM) -> StreamState:
    """Fresh state for `batch` streams (each at the start of a segment)."""
    f32 = jnp.float32
    width = config.output_hidden_size if config.add_adapter else config.hidden_size
    adapter_tails = tuple(jnp.zeros((batch, tail, width), f32)
                          for _, _, tail in adapter.plan(config, stream)[:-1])
    tails = []
    c_in = 1
    for k, s, c in zip(config.conv_kernel, config.conv_stride, config.conv_dim, strict=True):
        tails.append(jnp.zeros((batch, max(k - s, 0), c_in), f32))
        c_in = c
    feats = FeatureState(
        carry=jnp.zeros((batch, config.fe_delay), f32), tails=tuple(tails),
        norm=RunningStats.zeros(batch, config.conv_dim[0]), audio=RunningStats.zeros(batch, 1))
    d = config.hidden_size
    return StreamState(
        features=feats,
        frames=jnp.zeros((batch, config.pos_conv_left + stream.right_frames, d), f32),
        layers=encoder_for(config).init_layers(config, batch, stream), adapter=adapter_tails,
        step=jnp.zeros((batch,), jnp.int32), num_samples=jnp.zeros((batch,), jnp.int32),
        ended=jnp.zeros((batch,), bool), config=config, stream=stream)


def _encode_chunk(params: Params, state: StreamState, chunk: jax.Array,
                  num_valid: jax.Array | None = None) -> tuple[ChunkOutput, StreamState]:
    config, stream = state.config, state.stream
    c, r, left = stream.chunk_frames, stream.right_frames, stream.left_frames
    n = chunk.shape[1]
    if n != c * config.total_stride:
        raise ValueError(f"chunk has {n} samples; this state takes {c * config.total_stride} "
                         f"({c} frames of the model's total conv stride {config.total_stride})")
    if num_valid is None:
        num_valid = jnp.full((chunk.shape[0],), n, jnp.int32)
    num_valid = jnp.where(state.ended, 0, jnp.clip(num_valid, 0, n)).astype(jnp.int32)
    sample_valid = jnp.arange(n)[None, :] < num_valid[:, None]
    chunk = jnp.where(sample_valid, chunk, 0.0)
    num_samples = state.num_samples + num_valid
    ended = state.ended | (num_valid < n)
    fs = state.features
    if stream.normalize:  # running zero-mean, unit-variance (HF does it per utterance)
        audio = fs.audio.update(chunk[..., None], sample_valid)
        chunk = jnp.where(sample_valid, audio.normalize(chunk[..., None], 1e-7)[..., 0], 0.0)
        fs = dataclasses.replace(fs, audio=audio)

    feats, fstate = stream_features(params, config, fs, chunk, state.step, num_samples)
    # offline index of the new frames, then of the window [E, E + C + R) and its keys
    new_index = state.step[:, None] * c + jnp.arange(c)[None, :] - config.fe_delay_frames
    h = project(params, config, feats)
    h = jnp.where(frame_valid(config, new_index, num_samples)[..., None], h, 0.0)
    frames = jnp.concatenate([state.frames, h], 1)
    start = state.step * c - config.fe_delay_frames - r  # E
    key_index = start[:, None] + jnp.arange(-left, c + r)[None, :]
    x, layers = encoder_for(config).encoder_window(params, config, stream, frames,
                                                   state.layers, key_index, num_samples)
    x = x[:, :c]
    plan = adapter.plan(config, stream)
    lengths = adapter.lengths(config, jnp.asarray(
        (num_samples - config.receptive_field) // config.total_stride + 1).clip(0))
    tails: tuple[jax.Array, ...] = ()
    if config.add_adapter:
        x, tails = adapter.stream_adapter(params, config, stream, x, state.step,
                                          state.adapter, lengths)
    m, off, _ = plan[-1]
    index = state.step[:, None] * m + off + jnp.arange(m)[None, :]
    out_mask = (index >= 0) & (index < lengths[-1][:, None])
    logits = dense(params["head"], x)
    new_state = StreamState(
        features=fstate, frames=frames[:, c:], layers=layers, adapter=tails,
        step=state.step + 1,
        num_samples=num_samples, ended=ended, config=config, stream=stream)
    return ChunkOutput(logits=logits, mask=out_mask), new_state


encode_chunk = jax.jit(_encode_chunk, donate_argnums=1)
encode_chunk.__doc__ = """One streaming step (jitted, state donated: do not reuse it).

chunk [B, chunk_frames * total_stride] float32 of new audio; num_valid [B] int32 real samples in
it (None: all). Returns (ChunkOutput(logits [B, C', V], mask [B, C']) with
C' = chunk_frames / adapter_factor,
new state). The logits are offline frames [E, E + chunk_frames) with
E = step * chunk_frames - fe_delay_frames - right_frames: the first calls emit only
masked frames while the look-ahead fills. One compile per (config, StreamConfig, batch);
passing num_valid=None is a separate trace from passing an array, so pick one."""


def prepare_stream(params: Params, config: Wav2Vec2Config, stream: StreamConfig) -> Params:
    """Optional: params with per-window constants precomputed for `encode_chunk` (the
    relative-position conformer's projected distance tables; others unchanged). Same
    results, fewer FLOPs per chunk; prepared params are a different pytree (one compile)."""
    return encoder_for(config).prepare_stream(params, config, stream)


def pending_chunks(state: StreamState) -> np.ndarray:
    """Calls with `num_valid = 0` still needed per stream to emit its last frame [B]."""
    config, stream = state.config, state.stream
    ns = np.asarray(state.num_samples)
    frames = np.maximum((ns - config.receptive_field) // config.total_stride + 1, 0)
    length = np.asarray(adapter.lengths(config, jnp.asarray(frames))[-1])
    m, off, _ = adapter.plan(config, stream)[-1]
    need = length - (np.asarray(state.step) * m + off)
    return np.maximum(-(-need // m), 0)


def reset_slots(state: StreamState, slots: jax.Array,
                keep_statistics: bool = False) -> StreamState:
    """Restarts the streams where `slots` [B] bool is set (a new segment in that slot);
    the others are untouched. `keep_statistics`: keep those slots' running group-norm and
    input statistics, so a new segment of the same speaker/session starts from them
    instead of from its own first chunk. Jittable (`keep_statistics` static)."""
    fresh = init_state(state.config, state.step.shape[0], state.stream)
    if keep_statistics:
        fresh = dataclasses.replace(fresh, features=dataclasses.replace(
            fresh.features, norm=state.features.norm, audio=state.features.audio))

    def pick(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(slots.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

    return jax.tree.map(pick, fresh, state)


def stack_states(states: list[StreamState]) -> StreamState:
    """Joins batch-1 (or any) states along the batch axis."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *states)


def unstack_state(state: StreamState) -> list[StreamState]:
    """Splits a batched state into batch-1 states."""
    batch = state.step.shape[0]
    return [jax.tree.map(lambda a, i=i: a[i:i + 1], state) for i in range(batch)]
