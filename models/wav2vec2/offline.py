"""Offline wav2vec2: the whole utterance in one call (`encode`, jitted `forward`)."""

from __future__ import annotations

import jax

from models.layers import Params, dense
from models.wav2vec2.adapter import adapter
from models.wav2vec2.config import Wav2Vec2Config
from models.wav2vec2.encoders import encoder_for
from models.wav2vec2.frontend import features, frame_mask_from_audio_mask, project


def encode(params: Params, config: Wav2Vec2Config, audio: jax.Array,
           mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Offline encoder without the CTC head (not jitted; for seq2seq encoders too):
    audio [B, N], mask [B, N] | None -> (hidden [B, T, D], frame_mask [B, T]); with an
    adapter the hidden states are the adapter's [B, T', output_hidden_size] and the
    frame mask is that of the encoder frames."""
    frame_mask = frame_mask_from_audio_mask(config, mask, audio.shape[1], audio.shape[0])
    x = project(params, config, features(params, config, audio))
    x = encoder_for(config).encode_offline(params, config, x, frame_mask)
    if config.add_adapter:
        x = adapter(params, config, x)
    return x, frame_mask


def _forward(params: Params, config: Wav2Vec2Config, audio: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
    return dense(params["head"], encode(params, config, audio, mask)[0])


forward = jax.jit(_forward, static_argnums=1)
forward.__doc__ = """Offline CTC logits: audio [B, N] float32 (normalized as the HF feature
extractor does), mask [B, N] (1 = real sample, right padding) or None -> logits [B, T, V].
Frames past a row's length are padding (see `num_frames`). Jitted; `config` static."""
