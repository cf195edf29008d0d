"""wav2vec2 sizes and streaming shapes: `Wav2Vec2Config` (one per checkpoint, static and
hashable) and `StreamConfig` (chunk, left context and look-ahead in encoder frames).

Frames: nothing assumes the base models' layout (7 convs, total stride 320 = 20 ms,
receptive field 400). An encoder frame is `config.total_stride` samples (the product of
`conv_stride`), sees `config.receptive_field` samples (from `conv_kernel`/`conv_stride`),
and an output frame is `config.output_stride` samples (times the adapter's strides);
`config.frame_s` is its duration in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self

import numpy as np

SAMPLE_RATE = 16_000  # Hz; the rate of every wav2vec2 feature extractor


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """Sizes and layout of a wav2vec2 CTC model; defaults are wav2vec2-base-960h."""

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"  # "group" (base) or "layer" (large)
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False  # pre-LN layers + final LN (large models)
    add_adapter: bool = False
    adapter_kernel_size: int = 3
    adapter_stride: int = 2
    num_adapter_layers: int = 3
    output_hidden_size: int = 768
    adapter_attn_dim: int | None = None
    pad_token_id: int = 0
    model_type: str = "wav2vec2"

    @classmethod
    def from_hf_config(cls, hf: dict) -> Self:
        """From a Hugging Face `config.json` dict (unknown keys are ignored)."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in hf and hf[field.name] is not None:
                value = hf[field.name]
                kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        if hf.get("output_hidden_size") is None:
            kwargs["output_hidden_size"] = kwargs.get("hidden_size", cls.hidden_size)
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> Self:
        """A few-thousand-parameter config with the real conv strides, for tests."""
        base: dict[str, Any] = dict(
            vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, output_hidden_size=32,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_stride(self) -> int:
        """Audio samples per encoder frame (320 = 20 ms at 16 kHz)."""
        return math.prod(self.conv_stride)

    @property
    def adapter_factor(self) -> int:
        """Encoder frames per output frame: adapter_stride^num_adapter_layers (1: none)."""
        return self.adapter_stride ** self.num_adapter_layers if self.add_adapter else 1

    @property
    def output_stride(self) -> int:
        """Audio samples per output (logit) frame: the total stride times the adapter's."""
        return self.total_stride * self.adapter_factor

    @property
    def frame_s(self) -> float:
        """Seconds per output (logit) frame, for word times (0.02 for the base models)."""
        return self.output_stride / SAMPLE_RATE

    @property
    def receptive_field(self) -> int:
        """Audio samples seen by one encoder frame (400 for the base models)."""
        field, step = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride, strict=True):
            field += (k - 1) * step
            step *= s
        return field

    @property
    def fe_delay_frames(self) -> int:
        """Frames of the streamed feature extractor that precede offline frame 0."""
        return -(-(self.receptive_field - self.total_stride) // self.total_stride)

    @property
    def fe_delay(self) -> int:
        """Raw samples held back so that the conv tails line up with offline frames."""
        return self.fe_delay_frames * self.total_stride - (
            self.receptive_field - self.total_stride)

    @property
    def pos_conv_left(self) -> int:
        """Left context frames of the positional conv (the conformer has none: 0)."""
        return self.num_conv_pos_embeddings // 2

    @property
    def pos_conv_right(self) -> int:
        """Right context frames the positional conv needs to be exact (63 for K=128)."""
        k = self.num_conv_pos_embeddings
        return k - 1 - k // 2

    @property
    def pads_exactly(self) -> bool:
        """Whether right-padded audio with a mask encodes exactly as unpadded audio: not
        with group norm (statistics over the padding) or the adapter's convs (which read
        padded frames, as transformers does)."""
        return self.feat_extract_norm == "layer" and not self.add_adapter


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Static streaming shape: chunk, attention left context and look-ahead, in encoder
    frames (of `total_stride` samples each; with an adapter, chunk_frames is a multiple of
    `adapter_factor`).

    Defaults: for the base models' 20 ms frames, 320 ms chunks, 5.12 s of left context,
    320 ms of look-ahead; other layouts should use `from_ms`, which keeps these durations
    whatever the frame. `normalize`: zero-mean unit-variance input with running
    statistics, for models whose feature extractor has `do_normalize` (offline callers
    normalize the whole utterance instead).
    """

    chunk_frames: int = 16
    left_frames: int = 256
    right_frames: int = 16
    normalize: bool = False

    @classmethod
    def from_ms(cls, config: Wav2Vec2Config, chunk_ms: float = 320, left_ms: float = 5120,
                right_ms: float = 320, normalize: bool = False) -> StreamConfig:
        """Durations -> frames of this model. The chunk is rounded to the nearest whole
        number of output frames (`config.output_stride` samples: the total conv stride,
        times the adapter's), at least one; left context and look-ahead to the nearest
        whole number of encoder frames (`total_stride` samples). Raises ValueError for a
        chunk that is not positive or a negative context."""
        if not chunk_ms > 0:
            raise ValueError(f"the chunk must be longer than 0 ms (got {chunk_ms})")
        if left_ms < 0 or right_ms < 0:
            raise ValueError(f"left context and look-ahead must be >= 0 ms "
                             f"(got {left_ms}, {right_ms})")

        def frames(ms: float, samples: int) -> int:
            return int(math.floor(ms * SAMPLE_RATE / 1000 / samples + 0.5))

        chunk = max(frames(chunk_ms, config.output_stride), 1) * config.adapter_factor
        return cls(chunk_frames=chunk, left_frames=frames(left_ms, config.total_stride),
                   right_frames=frames(right_ms, config.total_stride), normalize=normalize)


def chunk_samples(config: Wav2Vec2Config, stream: StreamConfig) -> int:
    """Audio samples of one streaming chunk: chunk_frames * total_stride."""
    return stream.chunk_frames * config.total_stride


def num_frames(config: Wav2Vec2Config, num_samples: np.ndarray | int) -> np.ndarray:
    """Encoder frames for `num_samples` of audio (the conv output-length formula)."""
    n = np.asarray(num_samples)
    for k, s in zip(config.conv_kernel, config.conv_stride, strict=True):
        n = np.maximum((n - k) // s + 1, 0)
    return n
