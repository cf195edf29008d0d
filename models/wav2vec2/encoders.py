"""The encoders between the wav2vec2 front end and its head, by HF `model_type`.

Each entry is one family's parts with the same signatures, so the offline forward, the
streaming driver and the loader call `encoder_for(config)` instead of branching on the
family. Adding a family: a module with these functions, and one line in `ENCODERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np

from models.layers import Params
from models.wav2vec2 import conformer, transformer
from models.wav2vec2.config import StreamConfig, Wav2Vec2Config
from models.wav2vec2.state import LayerState


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One encoder family. Shapes: x [B, T, D] projected features, frame_mask [B, T];
    see `models.wav2vec2.transformer` for each function's contract."""

    config_class: type[Wav2Vec2Config]
    # (config, state dict without the model prefix) -> the encoder's params
    params_from_torch: Callable[[Wav2Vec2Config, Mapping[str, np.ndarray]], Params]
    # (params, config, x, frame_mask) -> hidden [B, T, D]
    encode_offline: Callable[[Params, Wav2Vec2Config, jax.Array, jax.Array], jax.Array]
    # (config, batch, stream) -> empty per-layer streaming state
    init_layers: Callable[[Wav2Vec2Config, int, StreamConfig], tuple[LayerState, ...]]
    # (params, config, stream, frames, layers, key_index, num_samples) -> (x, layers)
    encoder_window: Callable[..., tuple[jax.Array, tuple[LayerState, ...]]]
    # (params, config, stream) -> params with per-window constants precomputed
    prepare_stream: Callable[[Params, Wav2Vec2Config, StreamConfig], Params]


ENCODERS: dict[str, Encoder] = {
    "wav2vec2": Encoder(
        config_class=Wav2Vec2Config,
        params_from_torch=transformer.params_from_torch,
        encode_offline=transformer.encode_offline,
        init_layers=transformer.init_layers,
        encoder_window=transformer.encoder_window,
        prepare_stream=transformer.prepare_stream,
    ),
    "wav2vec2-conformer": Encoder(
        config_class=conformer.Wav2Vec2ConformerConfig,
        params_from_torch=conformer.params_from_torch,
        encode_offline=conformer.encode_offline,
        init_layers=conformer.init_layers,
        encoder_window=conformer.encoder_window,
        prepare_stream=conformer.prepare_stream,
    ),
}


def encoder_for(config: Wav2Vec2Config) -> Encoder:
    """The encoder of `config.model_type`; ValueError names the supported ones."""
    try:
        return ENCODERS[config.model_type]
    except KeyError:
        raise ValueError(f"unknown wav2vec2 encoder model_type {config.model_type!r}; "
                         f"supported: {', '.join(ENCODERS)}") from None
