"""wav2vec2 front end: the conv feature extractor (offline, and streamed with conv tails
and running statistics), the feature projection, frame masks and input normalization.

Streaming: each conv window ends at the end of a block of S inputs, so a conv keeps its
last `K - S` inputs (K < S: skips the first S - K of each chunk), and a delay line of
`fe_delay` raw samples aligns chunk boundaries with frame boundaries, so streamed features
equal offline features exactly. Group norm (base layout) normalizes over the whole
utterance offline; streaming uses running per-channel statistics over the audio seen so
far, which is NOT exact (the divergence is measured by the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import Params, activation, conv1d, dense, layer_norm
from models.wav2vec2.config import Wav2Vec2Config, num_frames
from models.wav2vec2.state import FeatureState


def _norm_act(p: Params, config: Wav2Vec2Config, i: int, x: jax.Array) -> jax.Array:
    """Per-frame part after conv i: layer norm (layer layout) and activation."""
    if config.feat_extract_norm == "layer":
        x = layer_norm(p["norm"], x)
    return activation(config.feat_extract_activation)(x)


def _conv(p: Params, config: Wav2Vec2Config, i: int, x: jax.Array) -> jax.Array:
    y = conv1d(x, p["w"], config.conv_stride[i])
    return y + p["b"] if "b" in p else y


def features(params: Params, config: Wav2Vec2Config, audio: jax.Array) -> jax.Array:
    """Offline conv feature extractor: audio [B, N] -> [B, T, conv_dim[-1]]."""
    x = audio[..., None]
    for i, p in enumerate(params["fe"]):
        x = _conv(p, config, i, x)
        if i == 0 and config.feat_extract_norm == "group":
            # one group per channel, statistics over the whole time axis
            mean = x.mean(1, keepdims=True)
            var = jnp.square(x - mean).mean(1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
        x = _norm_act(p, config, i, x)
    return x


def project(params: Params, config: Wav2Vec2Config, feats: jax.Array) -> jax.Array:
    p = params["proj"]
    return dense(p, layer_norm(p["norm"], feats, config.layer_norm_eps))


def frame_mask_from_audio_mask(config: Wav2Vec2Config, mask: jax.Array | None,
                               num_samples: int, batch: int) -> jax.Array:
    """Right-padded audio mask [B, N] -> frame mask [B, T] (as transformers computes it)."""
    t = int(num_frames(config, num_samples))
    if mask is None:
        return jnp.ones((batch, t), bool)
    n = mask.astype(jnp.int32).sum(-1)
    for k, s in zip(config.conv_kernel, config.conv_stride, strict=True):
        n = (n - k) // s + 1
    return jnp.arange(t)[None, :] < n[:, None]


def frame_valid(config: Wav2Vec2Config, index: jax.Array, num_samples: jax.Array) -> jax.Array:
    """Offline frame `index` [B, T] exists for a stream of `num_samples` [B] real samples."""
    end = index * config.total_stride + config.receptive_field
    return (index >= 0) & (end <= num_samples[:, None])


def stream_features(params: Params, config: Wav2Vec2Config, fs: FeatureState,
                     chunk: jax.Array, step: jax.Array, num_samples: jax.Array
                     ) -> tuple[jax.Array, FeatureState]:
    """chunk [B, S * C] -> the next C frames of conv features [B, C, conv_dim[-1]]."""
    x = jnp.concatenate([fs.carry, chunk], 1)
    carry = x[:, x.shape[1] - config.fe_delay:]
    x = x[:, : chunk.shape[1], None]
    tails, stats = [], fs.norm
    for i, p in enumerate(params["fe"]):
        k, s = config.conv_kernel[i], config.conv_stride[i]
        # Each window ends at the end of a block of S inputs: K > S reads the K - S
        # inputs before the block (the tail), K < S skips the first S - K of it.
        x = jnp.concatenate([fs.tails[i], x], 1) if k >= s else x[:, s - k:]
        tails.append(x[:, x.shape[1] - max(k - s, 0):])
        x = _conv(p, config, i, x)
        if i == 0 and config.feat_extract_norm == "group":
            # Running statistics over the valid first-conv outputs so far: offline
            # normalizes over the whole utterance, which a stream cannot know yet.
            n_out = x.shape[1]
            offset = (k - s + config.fe_delay) // s  # stream output j' is offline j' - offset
            j = step[:, None] * n_out + jnp.arange(n_out)[None, :] - offset
            stats = stats.update(x, (j >= 0) & (j * s + k <= num_samples[:, None]))
            x = stats.normalize(x, 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
        x = _norm_act(p, config, i, x)
    return x, FeatureState(carry=carry, tails=tuple(tails), norm=stats, audio=fs.audio)


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the utterance, as Wav2Vec2FeatureExtractor does."""
    audio = np.asarray(audio, np.float32)
    return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)
