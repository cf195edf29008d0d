"""Loading wav2vec2 / wav2vec2-conformer CTC checkpoints: PyTorch state-dict names -> our
params (a nested dict of arrays), a Hugging Face folder -> (config, params)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.layers import Params, conv_from_torch, dense_from_torch, norm_from_torch
from models.wav2vec2 import adapter
from models.wav2vec2.config import Wav2Vec2Config
from models.wav2vec2.encoders import ENCODERS, encoder_for


def _prefix(tensors: Mapping[str, np.ndarray], candidates: tuple[str, ...]) -> str:
    for prefix in candidates:
        if any(k.startswith(prefix + ".") for k in tensors):
            return prefix + "."
    return ""


def params_from_state_dict(config: Wav2Vec2Config, tensors: Mapping[str, np.ndarray]) -> Params:
    """Maps a (Conformer)ForCTC PyTorch state dict to our params (numpy leaves)."""
    base = _prefix(tensors, ("wav2vec2", "wav2vec2_conformer"))
    t = {k[len(base):]: np.asarray(v, np.float32) for k, v in tensors.items()
         if k.startswith(base)}
    fe = []
    for i in range(len(config.conv_dim)):
        name = f"feature_extractor.conv_layers.{i}"
        layer: Params = {"w": conv_from_torch(t[f"{name}.conv.weight"])}
        if config.conv_bias:
            layer["b"] = t[f"{name}.conv.bias"]
        if config.feat_extract_norm == "layer" or i == 0:
            layer["norm"] = norm_from_torch(t, f"{name}.layer_norm")
        fe.append(layer)
    params: Params = {
        "fe": fe,
        "proj": {"norm": norm_from_torch(t, "feature_projection.layer_norm"),
                 **dense_from_torch(t, "feature_projection.projection")},
        "enc_norm": norm_from_torch(t, "encoder.layer_norm"),
    }
    params.update(encoder_for(config).params_from_torch(config, t))
    if config.add_adapter:
        params["adapter"] = adapter.params_from_torch(config, t)
    if "lm_head.weight" in tensors:  # absent in encoders of seq2seq models
        params["head"] = dense_from_torch(tensors, "lm_head")
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def config_from_hf(hf: dict) -> Wav2Vec2Config:
    """The config of a wav2vec2-family `config.json` dict, by its `model_type`; ValueError
    names an unsupported type and the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in ENCODERS:
        raise ValueError(f"unsupported encoder model_type {model_type!r}; supported: "
                         f"{', '.join(ENCODERS)}")
    return ENCODERS[model_type].config_class.from_hf_config(hf)


def load(folder: str | Path) -> tuple[Wav2Vec2Config, Params, Path]:
    """Loads a Hugging Face wav2vec2 / wav2vec2-conformer CTC folder.

    Returns `(config, params, vocab_files_dir)`; params are device arrays, and the vocabulary
    files (vocab.json, tokenizer_config.json) are read from `vocab_files_dir` by the caller.
    Raises `models.checkpoint.ModelLoadError` for unreadable folders or unknown types.
    """
    from models.checkpoint import ModelLoadError, read_hf_folder

    hf, tensors = read_hf_folder(folder)
    model_type = hf.get("model_type")
    if model_type not in ENCODERS:
        raise ModelLoadError(f"{folder}: model_type {model_type!r} is not a wav2vec2 CTC model")
    config = config_from_hf(hf)
    if "lm_head.weight" not in tensors:
        raise ModelLoadError(f"{folder}: no lm_head.weight; not a CTC checkpoint")
    try:
        params = params_from_state_dict(config, tensors)
    except KeyError as exc:
        raise ModelLoadError(f"{folder}: weight {exc} missing for this config") from exc
    return config, jax.tree.map(jnp.asarray, params), Path(folder)


def extractor_normalizes(folder: str | Path) -> bool:
    """Whether the folder's feature extractor normalizes audio (`do_normalize` in
    preprocessor_config.json; true when the file or key is absent, as transformers)."""
    pre = Path(folder) / "preprocessor_config.json"
    return bool(json.loads(pre.read_text()).get("do_normalize", True)) if pre.is_file() else True
