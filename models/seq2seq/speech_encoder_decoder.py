"""Speech encoder-decoder (transformers' `SpeechEncoderDecoderModel`) in JAX.

A wav2vec2 or wav2vec2-conformer encoder (models/wav2vec2/, encoder part only: conv
features, projection, transformer or conformer layers, optional adapter), an optional
linear `enc_to_dec_proj` when the encoder's width differs from the decoder's, and a text
decoder with cross-attention (models/seq2seq/text_decoders.py: BART, mBART or GPT-2), searched by
the shared engine in models/decoding.py.

Public API
- `SpeechEncoderDecoderConfig.from_hf_config(dict)`; `params_from_hf(config, tensors)`.
- `encode(params, config, audio [B, N], mask [B, N] | None) -> (hidden [B, T, D_dec],
  frame_mask [B, T])` (jitted; one compile per (B, N)).
- `cross_kv(params, config, hidden, mask) -> CrossCache`; `decoder(config, max_len)`.
- `load(folder) -> SpeechEncoderDecoder`;
  `transcribe(model, audio_16k, beam_size=1) -> str`; `generate(...) -> list[int]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import wav2vec2
from models.checkpoint import ModelLoadError, read_hf_folder
from models.layers import dense
from models.seq2seq import text_decoders
from models.seq2seq.text_decoders import TextDecoder, TextDecoderConfig, generate_ids

Params = dict[str, Any]
SUPPORTED_ENCODERS = tuple(wav2vec2.ENCODERS)  # "wav2vec2", "wav2vec2-conformer"
AUDIO_BUCKET = 32000  # samples (2 s): generate pads to a multiple where that is exact


@dataclasses.dataclass(frozen=True)
class SpeechEncoderDecoderConfig:
    """Encoder and decoder configs plus the special ids generation uses."""

    encoder: wav2vec2.Wav2Vec2Config
    decoder: TextDecoderConfig
    project: bool  # an enc_to_dec_proj Linear(encoder width, decoder width) exists
    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int | None = None
    forced_bos_token_id: int | None = None  # e.g. an mBART target-language token
    max_new_tokens: int = 255  # default generation length (max_length - 1)

    @property
    def pads_exactly(self) -> bool:
        """Whether right-padded audio with a mask encodes exactly as unpadded audio: not for
        group norm (statistics over the padding), the conformer's conv module or the
        adapter's convs, which read padded frames as transformers does."""
        return self.encoder.pads_exactly

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> SpeechEncoderDecoderConfig:
        """From a `speech-encoder-decoder` config.json dict. ValueError names an
        unsupported encoder or decoder type and the supported ones."""
        enc_hf, dec_hf = hf.get("encoder") or {}, hf.get("decoder") or {}
        enc = wav2vec2.config_from_hf(enc_hf)
        dec = TextDecoderConfig.from_hf_config(dec_hf)
        enc_width = enc.output_hidden_size  # transformers compares this, not hidden_size

        def pick(key: str) -> Any:
            value = hf.get(key)
            value = dec_hf.get(key) if value is None else value
            return value[0] if isinstance(value, (list, tuple)) else value

        start, eos = pick("decoder_start_token_id"), pick("eos_token_id")
        if start is None or eos is None:
            raise ValueError("config.json needs decoder_start_token_id and eos_token_id")
        project = enc_width != dec.d_model and dec_hf.get("cross_attention_hidden_size") is None
        max_length = hf.get("max_length") or 256
        return cls(encoder=enc, decoder=dec, project=project, decoder_start_token_id=start,
                   eos_token_id=eos, pad_token_id=pick("pad_token_id"),
                   forced_bos_token_id=pick("forced_bos_token_id"),
                   max_new_tokens=max(1, min(max_length, dec.max_positions) - 1))


# --------------------------------------------------------------------------- encoder


def _encode(params: Params, config: SpeechEncoderDecoderConfig, audio: jax.Array,
            mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """audio float [B, N] (normalized as the wav2vec2 feature extractor does), mask
    [B, N] | None -> (encoder states projected to the decoder width [B, T, D], frame mask
    bool [B, T])."""
    c = config.encoder
    x, frame_mask = wav2vec2.encode(params["encoder"], c, audio, mask)  # without the CTC head
    if c.add_adapter:
        frame_mask = _adapter_mask(c, frame_mask, x.shape[1])
    if config.project:
        x = dense(params["enc_to_dec"], x)
    return x, frame_mask


def _adapter_mask(c: wav2vec2.Wav2Vec2Config, frame_mask: jax.Array, t: int) -> jax.Array:
    n = frame_mask.sum(-1)
    for _ in range(c.num_adapter_layers):  # each adapter conv: kernel k, stride s, padding 1
        n = (n + 2 - c.adapter_kernel_size) // c.adapter_stride + 1
    return jnp.arange(t)[None, :] < n[:, None]


encode = jax.jit(_encode, static_argnames="config")


def cross_kv(params: Params, config: SpeechEncoderDecoderConfig, hidden: jax.Array,
             mask: jax.Array | None = None) -> Any:
    """Cross-attention keys/values of every decoder layer (a `CrossCache`)."""
    return text_decoders.cross_kv(params["decoder"], config.decoder, hidden, mask)


def decoder(config: SpeechEncoderDecoderConfig, max_len: int) -> TextDecoder:
    """The `IncrementalDecoder` for `models.decoding` searches (params: the whole model's)."""
    return TextDecoder(config.decoder, max_len)


# --------------------------------------------------------------------------- conversion


def params_from_hf(config: SpeechEncoderDecoderConfig,
                   tensors: Mapping[str, np.ndarray]) -> Params:
    """Params from a `SpeechEncoderDecoderModel` state dict (`encoder.*`, `decoder.*`,
    `enc_to_dec_proj.*`). KeyError names a missing tensor."""
    enc_t = {k.removeprefix("encoder."): np.asarray(v) for k, v in tensors.items()
             if k.startswith("encoder.")}
    # wav2vec2's converter reads a CTC head; the encoder has none, so give it a stand-in
    # and drop it again.
    width = config.encoder.output_hidden_size if config.encoder.add_adapter \
        else config.encoder.hidden_size
    enc_t.setdefault("lm_head.weight", np.zeros((1, width), np.float32))
    enc_t.setdefault("lm_head.bias", np.zeros((1,), np.float32))
    enc = wav2vec2.params_from_state_dict(config.encoder, enc_t)
    enc.pop("head")
    params: Params = {
        "encoder": enc,
        "decoder": text_decoders.params_from_hf(config.decoder, tensors, prefix="decoder."),
    }
    if config.project:
        if "enc_to_dec_proj.weight" not in tensors:
            raise KeyError("enc_to_dec_proj.weight")
        params["enc_to_dec"] = {"w": np.asarray(tensors["enc_to_dec_proj.weight"], np.float32).T,
                                "b": np.asarray(tensors["enc_to_dec_proj.bias"], np.float32)}
    return params


# --------------------------------------------------------------------------- recognizer


@dataclasses.dataclass(frozen=True)
class SpeechEncoderDecoder:
    """A loaded speech encoder-decoder: sizes, params, input normalization, tokenizer."""

    config: SpeechEncoderDecoderConfig
    params: Params
    do_normalize: bool = True  # zero-mean unit-variance audio, as the feature extractor
    tokenizer: Any = None  # tokenizers.Tokenizer from the decoder's tokenizer.json
    folder: Path | None = None


def load(folder: str | Path) -> SpeechEncoderDecoder:
    """Loads a Hugging Face `speech-encoder-decoder` folder (config.json, weights, optional
    generation_config.json, whose generation keys win as in transformers' `generate`,
    preprocessor_config.json and tokenizer.json). ModelLoadError names what is wrong,
    including an unsupported encoder or decoder type."""
    folder = Path(folder)
    hf, tensors = read_hf_folder(folder)
    if hf.get("model_type") != "speech-encoder-decoder":
        raise ModelLoadError(
            f"{folder}: model_type {hf.get('model_type')!r}, not speech-encoder-decoder")
    try:
        config = SpeechEncoderDecoderConfig.from_hf_config(hf)
        params = params_from_hf(config, tensors)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc
    do_normalize = wav2vec2.extractor_normalizes(folder)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return SpeechEncoderDecoder(config, jax.tree.map(jnp.asarray, params), do_normalize,
                                tokenizer, folder)


normalize = wav2vec2.normalize_audio  # the wav2vec2 feature extractor's normalization


def generate(model: SpeechEncoderDecoder, audio_16k: np.ndarray, beam_size: int = 1,
             max_new_tokens: int | None = None, bucket: int = AUDIO_BUCKET) -> list[int]:
    """Token ids (end token excluded) for one utterance of 16 kHz float audio.

    Where padding is exact (`config.pads_exactly`) the audio is padded to a multiple of
    `bucket` samples (one encoder compile per bucket); otherwise each audio length
    compiles once. A `forced_bos_token_id` is forced as the first token.
    """
    c = model.config
    audio = normalize(audio_16k) if model.do_normalize else np.asarray(audio_16k, np.float32)
    n = audio.shape[0]
    if c.pads_exactly and bucket > 0:
        padded = max(bucket, -(-n // bucket) * bucket)
        mask = jnp.asarray(np.arange(padded)[None] < n)
        audio = np.pad(audio, (0, padded - n))
    else:
        mask = None
    hidden, frames = encode(model.params, c, jnp.asarray(audio[None]), mask)
    cross = cross_kv(model.params, c, hidden, frames)
    steps = c.max_new_tokens if max_new_tokens is None else max_new_tokens
    return generate_ids(
        decoder(c, 1 + steps), model.params, cross, start_token=c.decoder_start_token_id,
        eos_token=c.eos_token_id, forced_bos_token=c.forced_bos_token_id,
        max_new_tokens=steps, beam_size=beam_size,
    )  # fmt: skip


def transcribe(model: SpeechEncoderDecoder, audio_16k: np.ndarray, beam_size: int = 1,
               max_new_tokens: int | None = None) -> str:
    """Text of one utterance of 16 kHz float audio (greedy, or beam search)."""
    if model.tokenizer is None:
        raise ModelLoadError(f"{model.folder}: no tokenizer.json (the decoder's tokenizer)")
    ids = generate(model, audio_16k, beam_size, max_new_tokens)
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()
