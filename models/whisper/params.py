"""Whisper parameters: random ones for tests (`init_params`) and the conversion of a
transformers `WhisperForConditionalGeneration` state dict (`params_from_hf`), which serves
Hugging Face and CTranslate2 folders alike (models/whisper/ct2.py renames to HF names)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.whisper.model import Decoder, Encoder, Params, WhisperConfig

# --------------------------------------------------------------------------- random


def init_params(config: WhisperConfig, key: jax.Array) -> Params:
    """Random parameters with the same tree as `params_from_hf` (for tests and benchmarks)."""

    @jax.jit  # one compiled init instead of hundreds of eager ops
    def init(key: jax.Array) -> Params:
        k_enc, k_dec = jax.random.split(key)
        mel = jnp.zeros((1, config.n_mels, 4), jnp.float32)
        enc = Encoder(config).init(k_enc, mel)["params"]
        tokens, states = jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, config.d_model))
        dec = Decoder(config).init(k_dec, tokens, states, method="init_all")["params"]
        return {"encoder": enc, "decoder": dec}

    return init(key)


# --------------------------------------------------------------------------- conversion


def params_from_hf(
    config: WhisperConfig, tensors: Mapping[str, np.ndarray], dtype: Any = jnp.float32
) -> Params:
    """Params from a transformers `WhisperForConditionalGeneration` state dict.

    tensors: PyTorch names (`model.encoder.conv1.weight`, ...; the `model.` prefix is
    optional) to numpy arrays. `proj_out.weight` may be absent (it is tied to
    `model.decoder.embed_tokens.weight`); if present it must equal it. Arrays are cast to
    `dtype`. Raises KeyError naming any missing tensor and ValueError on a shape mismatch
    or on tensors that were not used.
    """
    src = {k.removeprefix("model."): np.asarray(v) for k, v in tensors.items()}
    used: set[str] = set()
    d, hd = config.d_model, config.d_model // config.encoder_heads
    dec_hd = config.d_model // config.decoder_heads

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in src:
            raise KeyError(f"missing tensor {name!r} in the Whisper state dict")
        used.add(name)
        value = src[name]
        if value.shape != shape:
            raise ValueError(f"{name}: shape {value.shape}, expected {shape}")
        return value

    def cast(tree: Any) -> Any:
        return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)

    def linear(name: str, n_in: int, n_out: int) -> dict:
        weight = get(f"{name}.weight", (n_out, n_in))
        return {"kernel": weight.T, "bias": get(f"{name}.bias", (n_out,))}

    def norm(name: str) -> dict:
        return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}

    def attention(name: str, heads: int, head_dim: int) -> dict:
        def split(proj: str, bias: bool) -> dict:
            # torch [H*Dh, D] (out, in) -> DenseGeneral kernel [D, H, Dh]
            w = get(f"{name}.{proj}.weight", (d, d)).T.reshape(d, heads, head_dim)
            out: dict[str, np.ndarray] = {"kernel": w}
            if bias:
                out["bias"] = get(f"{name}.{proj}.bias", (d,)).reshape(heads, head_dim)
            return out

        out_w = get(f"{name}.out_proj.weight", (d, d)).T.reshape(heads, head_dim, d)
        return {
            "q_proj": split("q_proj", True),
            "k_proj": split("k_proj", False),
            "v_proj": split("v_proj", True),
            "out_proj": {"kernel": out_w, "bias": get(f"{name}.out_proj.bias", (d,))},
        }

    def conv(name: str, n_in: int) -> dict:
        w = get(f"{name}.weight", (d, n_in, 3))
        return {"kernel": w.transpose(2, 1, 0), "bias": get(f"{name}.bias", (d,))}

    def mlp(prefix: str, ffn: int) -> dict:
        return {"fc1": linear(f"{prefix}.fc1", d, ffn), "fc2": linear(f"{prefix}.fc2", ffn, d)}

    enc: dict = {
        "conv1": conv("encoder.conv1", config.n_mels),
        "conv2": conv("encoder.conv2", d),
        "embed_positions": get("encoder.embed_positions.weight", (config.max_source_positions, d)),
        "layer_norm": norm("encoder.layer_norm"),
    }
    for i in range(config.encoder_layers):
        p = f"encoder.layers.{i}"
        enc[f"layers_{i}"] = {
            "self_attn_layer_norm": norm(f"{p}.self_attn_layer_norm"),
            "self_attn": attention(f"{p}.self_attn", config.encoder_heads, hd),
            "final_layer_norm": norm(f"{p}.final_layer_norm"),
            "mlp": mlp(p, config.encoder_ffn_dim),
        }

    embed = get("decoder.embed_tokens.weight", (config.vocab_size, d))
    if "proj_out.weight" in src:
        used.add("proj_out.weight")
        if not np.array_equal(src["proj_out.weight"], embed):
            raise ValueError("proj_out.weight differs from embed_tokens: untied heads unsupported")
    dec: dict = {
        "embed_tokens": {"embedding": embed},
        "embed_positions": get("decoder.embed_positions.weight", (config.max_target_positions, d)),
        "layer_norm": norm("decoder.layer_norm"),
    }
    for i in range(config.decoder_layers):
        p = f"decoder.layers.{i}"
        dec[f"layers_{i}"] = {
            "self_attn_layer_norm": norm(f"{p}.self_attn_layer_norm"),
            "self_attn": attention(f"{p}.self_attn", config.decoder_heads, dec_hd),
            "encoder_attn_layer_norm": norm(f"{p}.encoder_attn_layer_norm"),
            "encoder_attn": attention(f"{p}.encoder_attn", config.decoder_heads, dec_hd),
            "final_layer_norm": norm(f"{p}.final_layer_norm"),
            "mlp": mlp(p, config.decoder_ffn_dim),
        }

    unused = sorted(set(src) - used)
    if unused:
        raise ValueError(f"unused tensors in the Whisper state dict: {unused[:5]}")
    return cast({"encoder": enc, "decoder": dec})
