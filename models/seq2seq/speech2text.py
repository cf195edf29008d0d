"""Speech2Text (fairseq S2T, transformers' `Speech2TextForConditionalGeneration`) in JAX.

Filterbank features (models/seq2seq/s2t_features.py) -> Conv1d+GLU subsampler (stride 2 per
layer) -> scaled, plus sinusoidal positions -> pre-LN transformer encoder -> the shared
text decoder (models/seq2seq/text_decoders.py, S2T layout) driven by models/decoding.py.

Public API
- `Speech2TextConfig.from_hf_config(dict)`; `params_from_hf(config, tensors)`.
- `encode(params, config, feats [B, T, F], lengths [B]) -> (hidden [B, T', D], mask [B, T'])`
  (jitted; one compile per (B, T)); `output_length(config, T)`.
- `decoder(config, max_len) -> TextDecoder` (the `IncrementalDecoder`), `cross_kv`.
- `load(folder) -> Speech2TextModel`; `transcribe(model, audio_16k, beam_size=1) -> str`;
  `generate(model, audio_16k, beam_size=1, max_new_tokens=None) -> list[int]`.

Padding to a bucket is exact: after every subsampling conv the frames past the row's
length are zeroed, so a padded row computes what the unpadded utterance would.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.checkpoint import ModelLoadError, read_hf_folder
from models.layers import activation, conv1d, dense, layer_norm
from models.seq2seq import s2t_features, text_decoders
from models.seq2seq.text_decoders import TextDecoder, TextDecoderConfig, generate_ids

Params = dict[str, Any]
FEATURE_BUCKET = 256  # feature frames (2.56 s): transcribe pads to a multiple, one compile each


@dataclasses.dataclass(frozen=True)
class Speech2TextConfig:
    """Encoder sizes, special ids and the decoder's layout; defaults are s2t-small."""

    d_model: int = 256
    encoder_layers: int = 12
    encoder_heads: int = 4
    encoder_ffn_dim: int = 2048
    activation: str = "relu"
    conv_kernel_sizes: tuple[int, ...] = (5, 5)
    conv_channels: int = 1024
    input_features: int = 80  # input_feat_per_channel * input_channels
    max_source_positions: int = 6000
    embed_scale: float = 16.0  # sqrt(d_model) when scale_embedding
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None  # multilingual models' target-language token
    max_new_tokens: int = 199  # default generation length (max_length - 1)
    decoder: TextDecoderConfig = TextDecoderConfig()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> Speech2TextConfig:
        """From a transformers `Speech2TextConfig` dict (unknown keys ignored)."""
        d = hf.get("d_model", 256)
        scale = math.sqrt(d) if hf.get("scale_embedding", True) else 1.0
        pad = hf.get("pad_token_id", 1)
        eos = hf.get("eos_token_id", 2)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        act = hf.get("activation_function", "relu")
        dec = TextDecoderConfig(
            kind="speech_to_text", vocab_size=hf.get("vocab_size", 10000), d_model=d,
            layers=hf.get("decoder_layers", 6), heads=hf.get("decoder_attention_heads", 4),
            ffn_dim=hf.get("decoder_ffn_dim", 2048),
            max_positions=hf.get("max_target_positions", 1024), activation=act,
            pre_norm=True, embed_norm=False, final_norm=True, positions="sinusoidal",
            position_offset=pad + 1, pad_token_id=pad, embed_scale=scale,
        )  # fmt: skip
        return cls(
            d_model=d, encoder_layers=hf.get("encoder_layers", 12),
            encoder_heads=hf.get("encoder_attention_heads", 4),
            encoder_ffn_dim=hf.get("encoder_ffn_dim", 2048), activation=act,
            conv_kernel_sizes=tuple(hf.get("conv_kernel_sizes", (5, 5))),
            conv_channels=hf.get("conv_channels", 1024),
            input_features=hf.get("input_feat_per_channel", 80) * hf.get("input_channels", 1),
            max_source_positions=hf.get("max_source_positions", 6000), embed_scale=scale,
            pad_token_id=pad, eos_token_id=eos,
            decoder_start_token_id=hf.get("decoder_start_token_id", 2),
            forced_bos_token_id=hf.get("forced_bos_token_id"),
            max_new_tokens=max(1, min(hf.get("max_length") or 200, dec.max_positions) - 1),
            decoder=dec,
        )  # fmt: skip


def output_length(config: Speech2TextConfig, frames: Any) -> Any:
    """Encoder frames for `frames` feature frames (each conv: stride 2, padding k // 2)."""
    n = frames
    for k in config.conv_kernel_sizes:
        n = (n + 2 * (k // 2) - k) // 2 + 1
    return n


# --------------------------------------------------------------------------- encoder


def _encoder_layer(p: Params, c: Speech2TextConfig, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = layer_norm(p["attn_norm"], x)
    split = lambda y: y.reshape(*y.shape[:2], c.encoder_heads, -1)  # noqa: E731
    q = split(dense(p["q"], h)) * (c.head_dim**-0.5)
    k, v = split(dense(p["k"], h)), split(dense(p["v"], h))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    scores = jnp.where(mask[:, None, None, :], scores, np.finfo(np.float32).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = x + dense(p["o"], out.reshape(*out.shape[:2], -1))
    h = layer_norm(p["ffn_norm"], x)
    return x + dense(p["fc2"], activation(c.activation)(dense(p["fc1"], h)))


def _encode(params: Params, config: Speech2TextConfig, feats: jax.Array,
            lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """feats float [B, T, F] (frames past lengths [B] are padding) -> (hidden [B, T', D],
    mask bool [B, T'])."""
    p, c = params["encoder"], config
    x, n = feats.astype(jnp.float32), lengths.astype(jnp.int32)
    x = jnp.where((jnp.arange(x.shape[1]) < n[:, None])[..., None], x, 0.0)
    for conv, k in zip(p["conv"], c.conv_kernel_sizes, strict=True):
        x = jax.nn.glu(conv1d(x, conv["w"], 2, (k // 2, k // 2)) + conv["b"], axis=-1)
        n = (n + 2 * (k // 2) - k) // 2 + 1
        # Zero what lies past the row's end, as the unpadded conv's zero padding would be.
        x = jnp.where((jnp.arange(x.shape[1]) < n[:, None])[..., None], x, 0.0)
    mask = jnp.arange(x.shape[1])[None, :] < n[:, None]
    if x.shape[1] > c.max_source_positions:
        raise ValueError(f"{x.shape[1]} encoder frames > max_source_positions")
    # Only the rows this length reads (values do not depend on the table's size).
    table = text_decoders.sinusoidal_table(x.shape[1] + c.pad_token_id + 1, c.d_model,
                                           c.pad_token_id)
    rows = jnp.where(mask, jnp.arange(x.shape[1]) + c.pad_token_id + 1, c.pad_token_id)
    x = x * c.embed_scale + jnp.take(jnp.asarray(table), rows, axis=0)
    for layer in p["layers"]:
        x = _encoder_layer(layer, c, x, mask)
    return layer_norm(p["norm"], x), mask


encode = jax.jit(_encode, static_argnames="config")


def cross_kv(params: Params, config: Speech2TextConfig, hidden: jax.Array,
             mask: jax.Array | None = None) -> Any:
    """Cross-attention keys/values of every decoder layer (a `CrossCache`)."""
    return text_decoders.cross_kv(params["decoder"], config.decoder, hidden, mask)


def decoder(config: Speech2TextConfig, max_len: int) -> TextDecoder:
    """The `IncrementalDecoder` for `models.decoding` searches (params: the whole model's)."""
    return TextDecoder(config.decoder, max_len)


# --------------------------------------------------------------------------- conversion


def params_from_hf(config: Speech2TextConfig, tensors: Mapping[str, np.ndarray]) -> Params:
    """Params from a `Speech2TextForConditionalGeneration` state dict (PyTorch names).
    Raises KeyError naming a missing tensor, ValueError for unused ones."""
    used: set[str] = set()
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}

    def get(name: str) -> np.ndarray:
        if name not in t:
            raise KeyError(f"missing tensor {name!r} in the Speech2Text state dict")
        used.add(name)
        return t[name]

    def lin(name: str) -> Params:
        return {"w": get(f"{name}.weight").T, "b": get(f"{name}.bias")}

    def norm(name: str) -> Params:
        return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}

    e = "model.encoder"
    enc: Params = {
        "conv": [{"w": get(f"{e}.conv.conv_layers.{i}.weight").transpose(2, 1, 0),
                  "b": get(f"{e}.conv.conv_layers.{i}.bias")}
                 for i in range(len(config.conv_kernel_sizes))],
        "layers": [{
            "attn_norm": norm(f"{e}.layers.{i}.self_attn_layer_norm"),
            "q": lin(f"{e}.layers.{i}.self_attn.q_proj"),
            "k": lin(f"{e}.layers.{i}.self_attn.k_proj"),
            "v": lin(f"{e}.layers.{i}.self_attn.v_proj"),
            "o": lin(f"{e}.layers.{i}.self_attn.out_proj"),
            "ffn_norm": norm(f"{e}.layers.{i}.final_layer_norm"),
            "fc1": lin(f"{e}.layers.{i}.fc1"), "fc2": lin(f"{e}.layers.{i}.fc2"),
        } for i in range(config.encoder_layers)],
        "norm": norm(f"{e}.layer_norm"),
    }  # fmt: skip
    for name in t:  # sinusoid buffers, if a checkpoint stored them, are recomputed
        if name.startswith(e) and name.endswith("embed_positions.weights"):
            used.add(name)
    dec = text_decoders.params_from_bart(config.decoder, t)
    used |= {k for k in t if k.startswith("model.decoder.") or k == "lm_head.weight"}
    unused = sorted(set(t) - used)
    if unused:
        raise ValueError(f"unused tensors in the Speech2Text state dict: {unused[:5]}")
    return {"encoder": enc, "decoder": dec}


# --------------------------------------------------------------------------- tokenizer


class S2TTokenizer:
    """transformers' `Speech2TextTokenizer` for decoding: fairseq ids (vocab.json) mapped
    to sentencepiece pieces, joined by the sentencepiece model; special tokens (and
    `<lang:xx>` codes) are dropped or, if kept, written as they are."""

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

    def __init__(self, vocab: Mapping[str, int], spm_path: str | Path,
                 upper_case: bool = False) -> None:
        import sentencepiece

        self._pieces = {i: piece for piece, i in vocab.items()}
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
        self._upper = upper_case  # do_lower_case applies to encoding only
        self._special = {t for t in vocab if t in self.SPECIALS or t.startswith("<lang:")}
        self.special_ids = {vocab[t] for t in self._special}

    @classmethod
    def from_folder(cls, folder: str | Path) -> S2TTokenizer:
        """From vocab.json, sentencepiece.bpe.model and tokenizer_config.json (optional)."""
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(json.loads((folder / "vocab.json").read_text()),
                   folder / "sentencepiece.bpe.model", bool(cfg.get("do_upper_case")))

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        pieces = [self._pieces.get(int(i), "<unk>") for i in ids
                  if not (skip_special_tokens and int(i) in self.special_ids)]
        out, run = [], []
        for piece in pieces + [None]:
            if piece is not None and piece not in self._special:
                run.append(piece)
                continue
            text = self._sp.decode_pieces(run)  # special tokens break sentencepiece runs
            out.append(text.upper() if self._upper else text)
            if piece is not None:
                out.append(piece + " ")
            run = []
        return "".join(out).strip()


# --------------------------------------------------------------------------- recognizer


@dataclasses.dataclass(frozen=True)
class Speech2TextModel:
    """A loaded Speech2Text model: sizes, params, front end and tokenizer."""

    config: Speech2TextConfig
    params: Params
    front_end: s2t_features.FrontEndConfig
    tokenizer: S2TTokenizer | None
    folder: Path | None = None


def load(folder: str | Path) -> Speech2TextModel:
    """Loads a Hugging Face `speech_to_text` folder (config.json, weights, optional
    generation_config.json, whose generation keys win as in transformers' `generate`,
    preprocessor_config.json, vocab.json + sentencepiece.bpe.model). ModelLoadError if
    anything is missing or does not fit."""
    folder = Path(folder)
    hf, tensors = read_hf_folder(folder)
    if hf.get("model_type") != "speech_to_text":
        raise ModelLoadError(f"{folder}: model_type {hf.get('model_type')!r}, not speech_to_text")
    config = Speech2TextConfig.from_hf_config(hf)
    try:
        params = params_from_hf(config, tensors)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc
    pre = folder / "preprocessor_config.json"
    front = s2t_features.FrontEndConfig.from_hf(json.loads(pre.read_text())) if pre.is_file() \
        else s2t_features.FrontEndConfig()
    tokenizer = None
    if (folder / "vocab.json").is_file() and (folder / "sentencepiece.bpe.model").is_file():
        tokenizer = S2TTokenizer.from_folder(folder)
    return Speech2TextModel(config, jax.tree.map(jnp.asarray, params), front, tokenizer, folder)


def generate(model: Speech2TextModel, audio_16k: np.ndarray, beam_size: int = 1,
             max_new_tokens: int | None = None, bucket: int = FEATURE_BUCKET) -> list[int]:
    """Token ids (end token excluded) for one utterance of 16 kHz float audio."""
    c = model.config
    feats = s2t_features.features(np.asarray(audio_16k, np.float32), model.front_end)
    n = feats.shape[0]
    padded = max(bucket, -(-n // bucket) * bucket)
    feats = np.pad(feats, ((0, padded - n), (0, 0)))[None]
    hidden, mask = encode(model.params, c, jnp.asarray(feats), jnp.asarray([n], jnp.int32))
    cross = cross_kv(model.params, c, hidden, mask)
    steps = c.max_new_tokens if max_new_tokens is None else max_new_tokens
    return generate_ids(
        decoder(c, 1 + steps), model.params, cross, start_token=c.decoder_start_token_id,
        eos_token=c.eos_token_id, forced_bos_token=c.forced_bos_token_id,
        max_new_tokens=steps, beam_size=beam_size,
    )  # fmt: skip


def transcribe(model: Speech2TextModel, audio_16k: np.ndarray, beam_size: int = 1,
               max_new_tokens: int | None = None) -> str:
    """Text of one utterance of 16 kHz float audio (greedy, or beam search)."""
    if model.tokenizer is None:
        raise ModelLoadError(f"{model.folder}: no vocab.json + sentencepiece.bpe.model")
    return model.tokenizer.decode(generate(model, audio_16k, beam_size, max_new_tokens)).strip()
