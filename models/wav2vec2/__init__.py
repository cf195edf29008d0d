"""wav2vec2 and wav2vec2-conformer CTC encoders in JAX, offline and streaming.

Both Hugging Face layouts: `feat_extract_norm="group"` with post-LN transformer layers
(base models) and `"layer"` with pre-LN "stable layer norm" layers (large models). The
model is a pure function of a nested-dict `params` pytree and a static, hashable config.

Modules: `config` (sizes, stream shapes), `state` (streaming pytrees), `frontend` (conv
feature extractor, projection, masks), `adapter`, the encoders `transformer` and
`conformer` (picked by `model_type` in `encoders.ENCODERS`), `params` (loading),
`offline` (`encode`, `forward`) and `streaming` (`init_state`, `encode_chunk`, ...).
Callers import the names below from `models.wav2vec2`.

Public API
- `Wav2Vec2Config.from_hf_config(dict)`, `Wav2Vec2Config.tiny()` (tests);
  `Wav2Vec2ConformerConfig` likewise.
- `load(folder) -> (config, params, vocab_files_dir)`: either family, by `model_type`.
- `params_from_state_dict(config, tensors)`: PyTorch state-dict names -> params.
- `forward(params, config, audio [B, N], mask [B, N] | None) -> logits [B, T, V]`
  (jitted; `config` static), `num_frames(config, num_samples)`; `encode(...)` is the
  same without the CTC head; `features` and `project` are its conv front end.
- Streaming: `StreamConfig` (`StreamConfig.from_ms(config, chunk_ms, left_ms, right_ms)`
  turns durations into this model's frames), `chunk_samples(config, stream)`,
  `init_state(config, batch, stream) -> StreamState`,
  `encode_chunk(params, state, chunk [B, chunk_samples], num_valid [B] | None)
  -> (ChunkOutput(logits [B, C', V], mask [B, C']), state)`,
  `pending_chunks(state)`, `reset_slots`, `stack_states`, `unstack_state`,
  `prepare_stream(params, config, stream)` (optional per-window constants).
- Input: `normalize_audio(audio)`, `extractor_normalizes(folder)`.
"""

from models.wav2vec2.config import (
    SAMPLE_RATE,
    StreamConfig,
    Wav2Vec2Config,
    chunk_samples,
    num_frames,
)
from models.wav2vec2.conformer import Wav2Vec2ConformerConfig
from models.wav2vec2.encoders import ENCODERS, encoder_for
from models.wav2vec2.frontend import (
    features,
    frame_mask_from_audio_mask,
    normalize_audio,
    project,
)
from models.wav2vec2.offline import encode, forward
from models.wav2vec2.params import (
    config_from_hf,
    extractor_normalizes,
    load,
    params_from_state_dict,
)
from models.wav2vec2.state import ChunkOutput, StreamState
from models.wav2vec2.streaming import (
    encode_chunk,
    init_state,
    pending_chunks,
    prepare_stream,
    reset_slots,
    stack_states,
    unstack_state,
)

__all__ = [
    "ENCODERS", "SAMPLE_RATE", "ChunkOutput", "StreamConfig", "StreamState",
    "Wav2Vec2Config", "Wav2Vec2ConformerConfig", "chunk_samples", "config_from_hf",
    "encode", "encode_chunk", "encoder_for", "extractor_normalizes", "features",
    "frame_mask_from_audio_mask", "forward", "project", "init_state", "load", "normalize_audio",
    "num_frames", "params_from_state_dict", "pending_chunks", "prepare_stream",
    "reset_slots", "stack_states", "unstack_state",
]
