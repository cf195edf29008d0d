"""wav2vec2 CTC encoder in JAX, offline and streaming (wav2vec2-conformer reuses the parts).

Both Hugging Face layouts: `feat_extract_norm="group"` with post-LN transformer layers
(base models) and `"layer"` with pre-LN "stable layer norm" layers (large models). The
model is a pure function of a nested-dict `params` pytree and a static, hashable config.

Public API
- `Wav2Vec2Config.from_hf_config(dict)`, `Wav2Vec2Config.tiny()` (tests).
- `load(folder) -> (config, params, vocab_files_dir)`: either family, by `model_type`.
- `params_from_state_dict(config, tensors)`: PyTorch state-dict names -> params.
- `forward(params, config, audio [B, N], mask [B, N] | None) -> logits [B, T, V]`
  (jitted; `config` static), `num_frames(config, num_samples)`; `encode(...)` is the
  same without the CTC head.
- Streaming: `StreamConfig` (`StreamConfig.from_ms(config, chunk_ms, left_ms, right_ms)`
  turns durations into this model's frames), `chunk_samples(config, stream)`,
  `init_state(config, batch, stream) -> StreamState`,
  `encode_chunk(params, state, chunk [B, chunk_samples], num_valid [B] | None)
  -> (ChunkOutput(logits [B, C', V], mask [B, C']), state)`,
  `pending_chunks(state)`, `reset_slots`, `stack_states`, `unstack_state`,
  `prepare_stream(params, config, stream)` (optional per-window constants).

Frames: nothing assumes the base models' layout (7 convs, total stride 320 = 20 ms,
receptive field 400). An encoder frame is `config.total_stride` samples (the product of
`conv_stride`), sees `config.receptive_field` samples (from `conv_kernel`/`conv_stride`),
and an output frame is `config.output_stride` samples (times the adapter's strides);
`config.frame_s` is its duration in seconds.

Streaming scheme (all shapes static; one compile per (config, StreamConfig, batch size)):
- Feature extractor: each conv window ends at the end of a block of S inputs, so a conv
  keeps its last `K - S` inputs (K < S: skips the first S - K of each chunk), and a delay line of
  `fe_delay` raw samples aligns chunk boundaries with frame boundaries, so streamed
  features equal offline features exactly. Group norm (base layout) normalizes over the
  whole utterance offline; streaming uses running per-channel statistics over the audio
  seen so far, which is NOT exact (the divergence is measured by the tests).
- Encoder: each call appends `chunk_frames` new frames and runs the layers on a window of
  `chunk_frames + right_frames` frames; the first `chunk_frames` are emitted and their
  keys/values (and conformer conv inputs) are cached for `left_frames` frames of left
  context. The `right_frames` look-ahead frames are recomputed next call. Caches are
  shifted arrays of static size (concatenate + slice), not ring buffers, so a slot's
  frame index, mask and relative distance are fixed functions of its position.
- Latency: emitted frame g needs audio up to frame g + right_frames + 1, i.e.
  chunk + (right_frames + 1) * total_stride samples (20 ms frames for the base models).
  The positional convolution (kernel K = num_conv_pos_embeddings) is exact only with
  right_frames >= K - 1 - K // 2 (63 for the base models' 128); with less, its missing right
  context is read as zeros. Attention is bidirectional offline, so streaming equals
  offline only when left and right context cover the utterance.
- End of a segment: pass `num_valid < chunk_samples` for the last audio, then call
  `encode_chunk` with `num_valid = 0` `pending_chunks(state)` more times; outputs whose
  mask is False are not frames of the utterance. Start the next segment with
  `reset_slots(state, slots)` (or a fresh `init_state`); `keep_statistics=True` carries
  the running group-norm statistics over, which helps base models (see the tests).
- The adapter (`add_adapter`) streams too: its strided convs keep input tails and emit
  C' = chunk_frames / adapter_stride^num_adapter_layers outputs per call (chunk_frames
  must be a multiple of `config.adapter_factor`; `StreamConfig.from_ms` makes it one).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Params = dict[str, Any]
SAMPLE_RATE = 16_000  # Hz; the rate of every wav2vec2 feature extractor
_NEG = -1e30  # finite "minus infinity": a query with every key masked stays finite

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


# ----------------------------------------------------------------------------- config


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
    def from_hf_config(cls, hf: dict) -> Wav2Vec2Config:
        """From a Hugging Face `config.json` dict (unknown keys are ignored)."""
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in hf and hf[field.name] is not None:
                value = hf[field.name]
                kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        if hf.get("output_hidden_size") is None:
            kwargs["output_hidden_size"] = kwargs.get("hidden_size", cls.hidden_size)
        return cls(**kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> Wav2Vec2Config:
        """A few-thousand-parameter config with the real conv strides, for tests."""
        base = dict(
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
    def is_conformer(self) -> bool:
        return self.model_type == "wav2vec2-conformer"

    @property
    def pos_conv_left(self) -> int:
        """Left context frames of the positional conv (0: none, as in the conformer)."""
        return 0 if self.is_conformer else self.num_conv_pos_embeddings // 2

    @property
    def pos_conv_right(self) -> int:
        """Right context frames the positional conv needs to be exact (63 for K=128)."""
        k = self.num_conv_pos_embeddings
        return 0 if self.is_conformer else k - 1 - k // 2


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


# ----------------------------------------------------------------------------- loading


def _weight_normed(t: dict[str, np.ndarray], name: str) -> np.ndarray:
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


def _dense_p(t: dict[str, np.ndarray], name: str, bias: bool = True) -> Params:
    p = {"w": t[f"{name}.weight"].T}
    if bias:
        p["b"] = t[f"{name}.bias"]
    return p


def _norm_p(t: dict[str, np.ndarray], name: str) -> Params:
    return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}


def _conv_w(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv1d weight [O, I/groups, K] -> [K, I/groups, O]."""
    return np.transpose(w, (2, 1, 0))


def _prefix(tensors: dict[str, np.ndarray], candidates: tuple[str, ...]) -> str:
    for prefix in candidates:
        if any(k.startswith(prefix + ".") for k in tensors):
            return prefix + "."
    return ""


def params_from_state_dict(config: Wav2Vec2Config, tensors: dict[str, np.ndarray]) -> Params:
    """Maps a (Conformer)ForCTC PyTorch state dict to our params (numpy leaves)."""
    base = _prefix(tensors, ("wav2vec2", "wav2vec2_conformer"))
    t = {k[len(base):]: np.asarray(v, np.float32) for k, v in tensors.items()
         if k.startswith(base)}
    fe = []
    for i in range(len(config.conv_dim)):
        name = f"feature_extractor.conv_layers.{i}"
        layer = {"w": _conv_w(t[f"{name}.conv.weight"])}
        if config.conv_bias:
            layer["b"] = t[f"{name}.conv.bias"]
        if config.feat_extract_norm == "layer" or i == 0:
            layer["norm"] = _norm_p(t, f"{name}.layer_norm")
        fe.append(layer)
    params: Params = {
        "fe": fe,
        "proj": {"norm": _norm_p(t, "feature_projection.layer_norm"),
                 **_dense_p(t, "feature_projection.projection")},
        "enc_norm": _norm_p(t, "encoder.layer_norm"),
    }
    if config.is_conformer:
        from models import wav2vec2_conformer

        params["layers"] = [wav2vec2_conformer.layer_params(config, t, f"encoder.layers.{i}")
                            for i in range(config.num_hidden_layers)]
    else:
        params["pos_conv"] = {"w": _conv_w(_weight_normed(t, "encoder.pos_conv_embed.conv")),
                              "b": t["encoder.pos_conv_embed.conv.bias"]}
        params["layers"] = [_layer_params(config, t, f"encoder.layers.{i}")
                            for i in range(config.num_hidden_layers)]
    if config.add_adapter:
        adapter: Params = {"layers": [
            {"w": _conv_w(t[f"adapter.layers.{i}.conv.weight"]),
             "b": t[f"adapter.layers.{i}.conv.bias"]}
            for i in range(config.num_adapter_layers)]}
        if config.output_hidden_size != config.hidden_size:
            adapter["proj"] = _dense_p(t, "adapter.proj")
            adapter["proj_norm"] = _norm_p(t, "adapter.proj_layer_norm")
        params["adapter"] = adapter
    if "lm_head.weight" in tensors:  # absent in encoders of seq2seq models
        params["head"] = _dense_p(tensors, "lm_head")
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _layer_params(config: Wav2Vec2Config, t: dict[str, np.ndarray], name: str) -> Params:
    layer = {
        "q": _dense_p(t, f"{name}.attention.q_proj"),
        "k": _dense_p(t, f"{name}.attention.k_proj"),
        "v": _dense_p(t, f"{name}.attention.v_proj"),
        "o": _dense_p(t, f"{name}.attention.out_proj"),
        "attn_norm": _norm_p(t, f"{name}.layer_norm"),
        "ff_in": _dense_p(t, f"{name}.feed_forward.intermediate_dense"),
        "ff_out": _dense_p(t, f"{name}.feed_forward.output_dense"),
        "ff_norm": _norm_p(t, f"{name}.final_layer_norm"),
    }
    if config.do_stable_layer_norm and config.adapter_attn_dim is not None:
        layer["adapter"] = {"norm": _norm_p(t, f"{name}.adapter_layer.norm"),
                            "l1": _dense_p(t, f"{name}.adapter_layer.linear_1"),
                            "l2": _dense_p(t, f"{name}.adapter_layer.linear_2")}
    return layer


def load(folder: str | Path) -> tuple[Wav2Vec2Config, Params, Path]:
    """Loads a Hugging Face wav2vec2 / wav2vec2-conformer CTC folder.

    Returns `(config, params, vocab_files_dir)`; params are device arrays, and the vocabulary
    files (vocab.json, tokenizer_config.json) are read from `vocab_files_dir` by the caller.
    Raises `models.checkpoint.ModelLoadError` for unreadable folders or unknown types.
    """
    from models.checkpoint import ModelLoadError, read_hf_folder

    hf, tensors = read_hf_folder(folder)
    model_type = hf.get("model_type")
    if model_type == "wav2vec2":
        config = Wav2Vec2Config.from_hf_config(hf)
    elif model_type == "wav2vec2-conformer":
        from models.wav2vec2_conformer import Wav2Vec2ConformerConfig

        config = Wav2Vec2ConformerConfig.from_hf_config(hf)
    else:
        raise ModelLoadError(f"{folder}: model_type {model_type!r} is not a wav2vec2 CTC model")
    if "lm_head.weight" not in tensors:
        raise ModelLoadError(f"{folder}: no lm_head.weight; not a CTC checkpoint")
    try:
        params = params_from_state_dict(config, tensors)
    except KeyError as exc:
        raise ModelLoadError(f"{folder}: weight {exc} missing for this config") from exc
    return config, jax.tree.map(jnp.asarray, params), Path(folder)


# ----------------------------------------------------------------------------- layers


def dense(p: Params, x: jax.Array) -> jax.Array:
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def layer_norm(p: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def conv1d(x: jax.Array, w: jax.Array, stride: int = 1, padding: tuple[int, int] = (0, 0),
           groups: int = 1) -> jax.Array:
    """x [B, T, Cin], w [K, Cin/groups, Cout] -> [B, T', Cout]."""
    return jax.lax.conv_general_dilated(
        x, w, (stride,), [padding], dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups)


def activation(name: str):
    return _ACTIVATIONS[name]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
           bias: jax.Array | None = None) -> jax.Array:
    """q [B, Tq, H, Dh], k/v [B, Tk, H, Dh], key_mask [B, Tk] -> [B, Tq, H * Dh]."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(key_mask[:, None, None, :], scores, _NEG)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(*out.shape[:2], -1)


def heads(x: jax.Array, num_heads: int) -> jax.Array:
    return x.reshape(*x.shape[:2], num_heads, -1)


def feed_forward(p_in: Params, p_out: Params, x: jax.Array, act: str) -> jax.Array:
    return dense(p_out, activation(act)(dense(p_in, x)))


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


def _fe_norm_act(p: Params, config: Wav2Vec2Config, i: int, x: jax.Array) -> jax.Array:
    """Per-frame part after conv i: layer norm (layer layout) and activation."""
    if config.feat_extract_norm == "layer":
        x = layer_norm(p["norm"], x)
    return activation(config.feat_extract_activation)(x)


def _conv_fe(p: Params, config: Wav2Vec2Config, i: int, x: jax.Array) -> jax.Array:
    y = conv1d(x, p["w"], config.conv_stride[i])
    return y + p["b"] if "b" in p else y


def features(params: Params, config: Wav2Vec2Config, audio: jax.Array) -> jax.Array:
    """Offline conv feature extractor: audio [B, N] -> [B, T, conv_dim[-1]]."""
    x = audio[..., None]
    for i, p in enumerate(params["fe"]):
        x = _conv_fe(p, config, i, x)
        if i == 0 and config.feat_extract_norm == "group":
            # one group per channel, statistics over the whole time axis
            mean = x.mean(1, keepdims=True)
            var = jnp.square(x - mean).mean(1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
        x = _fe_norm_act(p, config, i, x)
    return x


def project(params: Params, config: Wav2Vec2Config, feats: jax.Array) -> jax.Array:
    p = params["proj"]
    return dense(p, layer_norm(p["norm"], feats, config.layer_norm_eps))


def pos_conv(params: Params, config: Wav2Vec2Config, x: jax.Array,
             padding: tuple[int, int]) -> jax.Array:
    """Weight-normed grouped positional conv + activation; output has T_in + sum(padding)
    - K + 1 frames (padding (K//2, K-1-K//2) gives torch's "same" conv with one frame dropped).
    """
    p = params["pos_conv"]
    y = conv1d(x, p["w"], padding=padding, groups=config.num_conv_pos_embedding_groups)
    return activation(config.feat_extract_activation)(y + p["b"])


def adapter(params: Params, config: Wav2Vec2Config, x: jax.Array) -> jax.Array:
    """Optional adapter (offline only): [B, T, D] -> [B, T', output_hidden_size]."""
    p = params["adapter"]
    if "proj" in p:
        x = layer_norm(p["proj_norm"], dense(p["proj"], x))
    for layer in p["layers"]:
        x = conv1d(x, layer["w"], config.adapter_stride, (1, 1)) + layer["b"]
        x = jax.nn.glu(x, axis=-1)
    return x


def _encode_offline(params: Params, config: Wav2Vec2Config, x: jax.Array,
                    frame_mask: jax.Array) -> jax.Array:
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


def encode(params: Params, config: Wav2Vec2Config, audio: jax.Array,
           mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Offline encoder without the CTC head (not jitted; for seq2seq encoders too):
    audio [B, N], mask [B, N] | None -> (hidden [B, T, D], frame_mask [B, T]); with an
    adapter the hidden states are the adapter's [B, T', output_hidden_size] and the
    frame mask is that of the encoder frames."""
    frame_mask = frame_mask_from_audio_mask(config, mask, audio.shape[1], audio.shape[0])
    x = project(params, config, features(params, config, audio))
    if config.is_conformer:
        from models import wav2vec2_conformer

        x = wav2vec2_conformer.encode_offline(params, config, x, frame_mask)
    else:
        x = _encode_offline(params, config, x, frame_mask)
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


# ----------------------------------------------------------------------------- streaming


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


def _adapter_plan(config: Wav2Vec2Config, stream: StreamConfig) -> list[tuple[int, int, int]]:
    """Static geometry of the streamed adapter convs: per layer (inputs per call m, input
    offset, tail length). Call `step` feeds inputs [step * m + offset, ... + m) and the conv
    emits the m / stride outputs whose last input has arrived, so it keeps `tail` inputs."""
    k, s, pad = config.adapter_kernel_size, config.adapter_stride, 1  # transformers: padding=1
    m, off = stream.chunk_frames, -config.fe_delay_frames - stream.right_frames
    plan = []
    for _ in range(config.num_adapter_layers if config.add_adapter else 0):
        if m % s:
            raise ValueError(f"chunk_frames must be a multiple of {s}^{config.num_adapter_layers}"
                             " with an adapter")
        next_off = (off + m - k + pad) // s - m // s + 1
        plan.append((m, off, off - s * next_off + pad))
        m, off = m // s, next_off
    plan.append((m, off, 0))  # the output level
    return plan


def _adapter_lengths(config: Wav2Vec2Config, frames: jax.Array) -> list[jax.Array]:
    """Positions per adapter level for `frames` [B] encoder frames: the outputs of the
    offline convs (padding 1 each side); for kernel 3 that is transformers' length rule."""
    k, s = config.adapter_kernel_size, config.adapter_stride
    lengths = [frames]
    for _ in range(config.num_adapter_layers if config.add_adapter else 0):
        n = lengths[-1]
        lengths.append(jnp.where(n > 0, jnp.maximum((n + 2 - k) // s + 1, 0), 0))
    return lengths


def init_state(config: Wav2Vec2Config, batch: int,
               stream: StreamConfig = StreamConfig()) -> StreamState:
    """Fresh state for `batch` streams (each at the start of a segment)."""
    f32 = jnp.float32
    width = config.output_hidden_size if config.add_adapter else config.hidden_size
    adapter_tails = tuple(jnp.zeros((batch, tail, width), f32)
                          for _, _, tail in _adapter_plan(config, stream)[:-1])
    tails = []
    c_in = 1
    for k, s, c in zip(config.conv_kernel, config.conv_stride, config.conv_dim, strict=True):
        tails.append(jnp.zeros((batch, max(k - s, 0), c_in), f32))
        c_in = c
    feats = FeatureState(
        carry=jnp.zeros((batch, config.fe_delay), f32), tails=tuple(tails),
        norm=RunningStats.zeros(batch, config.conv_dim[0]), audio=RunningStats.zeros(batch, 1))
    h, dh, d = config.num_attention_heads, config.head_dim, config.hidden_size
    conv_tail = None
    if config.is_conformer:
        conv_tail = (config.conv_depthwise_kernel_size - 1) // 2
    layers = tuple(
        LayerState(k=jnp.zeros((batch, stream.left_frames, h, dh), f32),
                   v=jnp.zeros((batch, stream.left_frames, h, dh), f32),
                   conv_tail=None if conv_tail is None else jnp.zeros((batch, conv_tail, d), f32))
        for _ in range(config.num_hidden_layers))
    return StreamState(
        features=feats,
        frames=jnp.zeros((batch, config.pos_conv_left + stream.right_frames, d), f32),
        layers=layers, adapter=adapter_tails, step=jnp.zeros((batch,), jnp.int32),
        num_samples=jnp.zeros((batch,), jnp.int32), ended=jnp.zeros((batch,), bool),
        config=config, stream=stream)


def frame_valid(config: Wav2Vec2Config, index: jax.Array, num_samples: jax.Array) -> jax.Array:
    """Offline frame `index` [B, T] exists for a stream of `num_samples` [B] real samples."""
    end = index * config.total_stride + config.receptive_field
    return (index >= 0) & (end <= num_samples[:, None])


def _stream_features(params: Params, config: Wav2Vec2Config, fs: FeatureState,
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
        x = _conv_fe(p, config, i, x)
        if i == 0 and config.feat_extract_norm == "group":
            # Running statistics over the valid first-conv outputs so far: offline
            # normalizes over the whole utterance, which a stream cannot know yet.
            n_out = x.shape[1]
            offset = (k - s + config.fe_delay) // s  # stream output j' is offline j' - offset
            j = step[:, None] * n_out + jnp.arange(n_out)[None, :] - offset
            stats = stats.update(x, (j >= 0) & (j * s + k <= num_samples[:, None]))
            x = stats.normalize(x, 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
        x = _fe_norm_act(p, config, i, x)
    return x, FeatureState(carry=carry, tails=tuple(tails), norm=stats, audio=fs.audio)


def _push(cache: jax.Array, new: jax.Array) -> jax.Array:
    """Shifts `new` [B, n, ...] into a fixed-size cache [B, L, ...] (oldest frames drop)."""
    size = cache.shape[1]
    if size == 0:
        return cache
    return jnp.concatenate([cache, new], 1)[:, -size:]


def _encoder_window(params: Params, config: Wav2Vec2Config, stream: StreamConfig,
                    x: jax.Array, frames: jax.Array, layers: tuple[LayerState, ...],
                    index: jax.Array, num_samples: jax.Array
                    ) -> tuple[jax.Array, tuple[LayerState, ...]]:
    """wav2vec2 encoder over the window x [B, C + R, D] (after positional conv input
    `frames` [B, P + C + R, D]); `index` [B, L + C + R] offline frame of each key."""
    c, r = stream.chunk_frames, stream.right_frames
    x = x + pos_conv(params, config, frames, (0, config.pos_conv_right))[:, -(c + r):]
    if not config.do_stable_layer_norm:
        x = layer_norm(params["enc_norm"], x, config.layer_norm_eps)
    key_mask = frame_valid(config, index, num_samples)
    new_layers = []
    for p, ls in zip(params["layers"], layers, strict=True):
        x, k, v = _encoder_layer(p, config, x, ls.k, ls.v, key_mask)
        new_layers.append(LayerState(k=_push(ls.k, k[:, :c]), v=_push(ls.v, v[:, :c]),
                                     conv_tail=None))
    if config.do_stable_layer_norm:
        x = layer_norm(params["enc_norm"], x, config.layer_norm_eps)
    return x, tuple(new_layers)


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
        fs = fs.replace(audio=audio)

    feats, fstate = _stream_features(params, config, fs, chunk, state.step, num_samples)
    # offline index of the new frames, then of the window [E, E + C + R) and its keys
    new_index = state.step[:, None] * c + jnp.arange(c)[None, :] - config.fe_delay_frames
    h = project(params, config, feats)
    h = jnp.where(frame_valid(config, new_index, num_samples)[..., None], h, 0.0)
    frames = jnp.concatenate([state.frames, h], 1)
    start = state.step * c - config.fe_delay_frames - r  # E
    key_index = start[:, None] + jnp.arange(-left, c + r)[None, :]
    x = frames[:, -(c + r):]
    if config.is_conformer:
        from models import wav2vec2_conformer

        x, layers = wav2vec2_conformer.encoder_window(
            params, config, stream, x, state.layers, key_index, num_samples)
    else:
        x, layers = _encoder_window(params, config, stream, x, frames, state.layers,
                                    key_index, num_samples)
    x = x[:, :c]
    plan = _adapter_plan(config, stream)
    lengths = _adapter_lengths(config, jnp.asarray(
        (num_samples - config.receptive_field) // config.total_stride + 1).clip(0))
    tails = []
    if config.add_adapter:
        p = params["adapter"]
        if "proj" in p:
            x = layer_norm(p["proj_norm"], dense(p["proj"], x))
        for layer, (m, off, _), tail, length in zip(p["layers"], plan, state.adapter,
                                                    lengths, strict=False):
            index = state.step[:, None] * m + off + jnp.arange(m)[None, :]
            # outside the utterance the conv reads zero padding, as offline
            x = jnp.where(((index >= 0) & (index < length[:, None]))[..., None], x, 0.0)
            x = jnp.concatenate([tail, x], 1)
            tails.append(x[:, x.shape[1] - tail.shape[1]:])
            x = conv1d(x, layer["w"], config.adapter_stride) + layer["b"]
            x = jax.nn.glu(x, axis=-1)
    m, off, _ = plan[-1]
    index = state.step[:, None] * m + off + jnp.arange(m)[None, :]
    out_mask = (index >= 0) & (index < lengths[-1][:, None])
    logits = dense(params["head"], x)
    new_state = StreamState(
        features=fstate, frames=frames[:, c:], layers=layers, adapter=tuple(tails),
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
    if not config.is_conformer:
        return params
    from models import wav2vec2_conformer

    return wav2vec2_conformer.prepare_stream(params, config, stream)


def pending_chunks(state: StreamState) -> np.ndarray:
    """Calls with `num_valid = 0` still needed per stream to emit its last frame [B]."""
    config, stream = state.config, state.stream
    ns = np.asarray(state.num_samples)
    frames = np.maximum((ns - config.receptive_field) // config.total_stride + 1, 0)
    length = np.asarray(_adapter_lengths(config, jnp.asarray(frames))[-1])
    m, off, _ = _adapter_plan(config, stream)[-1]
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
        fresh = fresh.replace(features=fresh.features.replace(
            norm=state.features.norm, audio=state.features.audio))

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


# ----------------------------------------------------------------------------- input


def extractor_normalizes(folder: str | Path) -> bool:
    """Whether the folder's feature extractor normalizes audio (`do_normalize` in
    preprocessor_config.json; true when the file or key is absent, as transformers)."""
    import json

    pre = Path(folder) / "preprocessor_config.json"
    return bool(json.loads(pre.read_text()).get("do_normalize", True)) if pre.is_file() else True


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the utterance, as Wav2Vec2FeatureExtractor does."""
    audio = np.asarray(audio, np.float32)
    return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)
