"""Reading Hugging Face checkpoint folders into plain numpy state dicts.

Every model family converts from one input: PyTorch state-dict names
(`model.encoder.layers.0.fc1.weight`) mapped to float32 numpy arrays. This module turns
each on-disk format into that input:

- `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- `pytorch_model.bin` (or its shards; needs torch, which only the test extra installs);
- `flax_model.msgpack` (Hugging Face Flax naming, renamed to PyTorch naming here).

The config is `config.json` with the generation settings of `generation_config.json`
(which transformers' `save_pretrained` writes and `generate` prefers) laid over it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The top-level keys of generation_config.json that replace config.json's: transformers'
# `GenerationConfig` decoding settings, plus Whisper's generation keys.
GENERATION_KEYS = frozenset({
    # special tokens
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id",
    # length and search
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping",
    "num_beams", "num_return_sequences", "length_penalty", "repetition_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "do_sample", "temperature",
    "top_k", "top_p",
    # token suppression and forcing
    "suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "forced_decoder_ids",
    # Whisper's generation_config.json
    "no_timestamps_token_id", "is_multilingual", "lang_to_id", "task_to_id",
    "alignment_heads", "max_initial_timestamp_index", "prev_sot_token_id",
    "return_timestamps",
})  # fmt: skip
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
)


class ModelLoadError(Exception):
    """A model path that is missing, incomplete or unreadable; the message names the path
    and what was expected there."""


def read_hf_config(path: str | Path) -> dict:
    """The parsed `config.json` of a Hugging Face model folder, with the generation keys
    (`GENERATION_KEYS`) of its `generation_config.json`, if there is one, in place of
    config.json's: transformers' `from_pretrained` + `generate` decode with the generation
    config when the file exists. Only top-level keys are taken (a nested `decoder` config
    keeps its own), and a key the file sets to null is removed (unset, as in transformers).
    Keys the file leaves out keep config.json's value, where transformers would fall back
    to `GenerationConfig`'s defaults (in folders `save_pretrained` writes, the two agree).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(
            f"model path {folder} is not a folder; expected a Hugging Face model folder "
            f"with {CONFIG_FILE} and one of {', '.join(WEIGHT_FILES)}"
        )
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} is missing; expected the model's {CONFIG_FILE}")
    config = _read_json_object(config_path)
    generation_path = folder / GENERATION_CONFIG_FILE
    if generation_path.is_file():
        for key, value in _read_json_object(generation_path).items():
            if key not in GENERATION_KEYS:
                continue
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
    return config


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a JSON object (found a {type(value).__name__})")
    return value


def read_hf_folder(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a Hugging Face model folder.

    Returns `(config, tensors)`: `read_hf_config`'s config (config.json with
    generation_config.json's generation keys) and every weight as a float32
    (or integer, for counters) numpy array under its PyTorch state-dict name.
    """
    folder = Path(path)
    config = read_hf_config(folder)
    for name in WEIGHT_FILES:
        weight_path = folder / name
        if weight_path.is_file():
            try:
                tensors = _READERS[name](weight_path)
            except ModelLoadError:
                raise
            except Exception as exc:  # foreign exceptions become one clear error
                raise ModelLoadError(f"cannot read weights from {weight_path}: {exc}") from exc
            return config, tensors
    raise ModelLoadError(
        f"no weights in {folder}; expected one of {', '.join(WEIGHT_FILES)}"
    )


def _as_numpy(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    # The flax reader understands bfloat16, which numpy alone does not.
    from safetensors.flax import load_file

    return {name: _as_numpy(value) for name, value in load_file(str(path)).items()}


def _read_index(path: Path,
                reader: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    index = json.loads(path.read_text())
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise ModelLoadError(f"{shard_path} is missing; {path.name} lists it as a shard")
        tensors.update(reader(shard_path))
    return tensors


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(
            f"{path} is a PyTorch checkpoint and reading it needs torch "
            "(pip install torch); safetensors folders need nothing extra"
        ) from exc
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {name: _as_numpy(value.float() if value.is_floating_point() else value)
            for name, value in state.items()}


def _read_flax_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore

    tree = msgpack_restore(path.read_bytes())
    tensors: dict[str, np.ndarray] = {}
    _flatten_flax(tree, (), tensors)
    return tensors


def _flatten_flax(tree: dict, prefix: tuple[str, ...], out: dict[str, np.ndarray]) -> None:
    """Renames Hugging Face Flax parameters to their PyTorch spelling."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten_flax(value, (*prefix, str(key)), out)
            continue
        array = _as_numpy(value)
        leaf = str(key)
        if leaf == "kernel":
            leaf = "weight"
            if array.ndim == 2:  # Dense: [in, out] -> Linear [out, in]
                array = array.T
            elif array.ndim == 3:  # Conv: [width, in, out] -> Conv1d [out, in, width]
                array = array.transpose(2, 1, 0)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join((*prefix, leaf))] = np.ascontiguousarray(array)


_READERS = {
    "model.safetensors": _read_safetensors,
    "model.safetensors.index.json": lambda p: _read_index(p, _read_safetensors),
    "pytorch_model.bin": _read_torch_bin,
    "pytorch_model.bin.index.json": lambda p: _read_index(p, _read_torch_bin),
    "flax_model.msgpack": _read_flax_msgpack,
}
