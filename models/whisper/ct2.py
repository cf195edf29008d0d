"""Reading a CTranslate2 Whisper model folder as a transformers Whisper checkpoint.

A CTranslate2 folder (`model.bin`, `config.json`, `tokenizer.json`/`vocabulary.txt`) is
turned into what every family converter takes: a transformers-style config dict and
float32 numpy arrays under transformers' PyTorch state-dict names. Then the same
`models.whisper.params.params_from_hf` serves both Hugging Face and CTranslate2 folders.

`model.bin` layout (little-endian; a string is a uint16 byte count including a final
NUL, then the bytes): uint32 format version, string spec name, uint32 spec revision
(version >= 2), uint32 variable count; per variable: string name, uint8 rank, rank x
uint32 dims, uint8 dtype code, uint32 byte count, raw data; then uint32 alias count and
(alias, target) string pairs (version >= 3).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from models.checkpoint import ModelLoadError

MODEL_FILE = "model.bin"
# CTranslate2's DataType enum order.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_BFLOAT16 = 5


class _Reader:
    """Cursor over the bytes of model.bin; every read checks the bounds."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ModelLoadError(
                f"{self.path} is truncated: wanted {n} bytes at offset {self.pos}, "
                f"file has {len(self.data)}; expected a complete CTranslate2 model.bin"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("H"))
        return raw.rstrip(b"\0").decode("utf-8")


def read_ct2_model_bin(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parses a CTranslate2 `model.bin`.

    Returns `(spec_name, variables)`: arrays in their stored dtype (bfloat16 widened to
    float32), aliases resolved to the array they name.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read {path}: {exc}; expected a CTranslate2 model.bin"
        ) from exc
    r = _Reader(data, path)
    version = r.unpack("I")
    if not 1 <= version <= 6:
        raise ModelLoadError(
            f"{path}: binary version {version} is not a CTranslate2 model.bin version (1..6)"
        )
    spec = r.string()
    if version >= 2:
        r.unpack("I")  # spec revision: the layout below does not depend on it
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        code = r.unpack("B")
        raw = r.take(r.unpack("I"))
        if code == _BFLOAT16:
            # bfloat16 is the high half of a float32.
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif code in _DTYPES:
            arr = np.frombuffer(raw, _DTYPES[code])
        else:
            raise ModelLoadError(f"{path}: variable {name} has unknown dtype code {code}")
        if arr.size != int(np.prod(shape)):
            raise ModelLoadError(f"{path}: variable {name} holds {arr.size} values, not {shape}")
        variables[name] = arr.reshape(shape)
    if version >= 3:
        for _ in range(r.unpack("I")):
            alias, target = r.string(), r.string()
            if target not in variables:
                raise ModelLoadError(f"{path}: alias {alias} names missing variable {target}")
            variables[alias] = variables[target]
    return spec, variables


def _float_weights(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 copies of every weight; int8/int16 weights divided by their `_scale`."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale") or value.ndim == 0:
            continue  # scales are folded in below; 0-d entries are config flags
        if value.dtype.kind == "f":
            out[name] = value.astype(np.float32)
            continue
        scale = variables.get(name + "_scale")
        if scale is None:
            continue  # integer variables without a scale are flags, not weights
        # CTranslate2 quantizes as q = round(w * scale), one scale per output row.
        scale = np.asarray(scale, np.float32).reshape((-1,) + (1,) * (value.ndim - 1))
        out[name] = value.astype(np.float32) / scale
    return out


def _scalar(variables: dict[str, np.ndarray], name: str, path: Path) -> int:
    if name not in variables:
        raise ModelLoadError(f"{path}: variable {name} is missing; expected a WhisperSpec model")
    return int(np.asarray(variables[name]).reshape(()))


def _count_layers(weights: dict[str, np.ndarray], side: str) -> int:
    found = {int(m.group(1)) for k in weights if (m := re.match(side + r"/layer_(\d+)/", k))}
    return max(found) + 1 if found else 0


def _rename(weights: dict[str, np.ndarray], n_enc: int, n_dec: int) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper names -> transformers `WhisperForConditionalGeneration` names."""
    out: dict[str, np.ndarray] = {}

    def norm(src: str, dst: str) -> None:
        out[dst + ".weight"] = weights[src + "/gamma"]
        out[dst + ".bias"] = weights[src + "/beta"]

    def linear(src: str, dst: str) -> None:
        out[dst + ".weight"] = weights[src + "/weight"]
        out[dst + ".bias"] = weights[src + "/bias"]

    def split(src: str, dsts: list[str]) -> None:
        # Fused projections are row-concatenated [q; k; v] (or [k; v]). The key rows of
        # the bias are zeros put there by the converter: Whisper's k_proj has no bias
        # (a key bias adds the same q.b to every score, so softmax ignores it anyway).
        ws = np.split(weights[src + "/weight"], len(dsts))
        bs = np.split(weights[src + "/bias"], len(dsts))
        for dst, w, b in zip(dsts, ws, bs, strict=True):
            out[dst + ".weight"] = w
            if not dst.endswith("k_proj"):
                out[dst + ".bias"] = b

    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        linear(f"encoder/conv{i}", f"{e}.conv{i}")
    out[f"{e}.embed_positions.weight"] = weights["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", f"{e}.layer_norm")
    for i in range(n_enc):
        s, t = f"encoder/layer_{i}", f"{e}.layers.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        split(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{t}.fc1")
        linear(f"{s}/ffn/linear_1", f"{t}.fc2")
    out[f"{d}.embed_tokens.weight"] = weights["decoder/embeddings/weight"]
    out[f"{d}.embed_positions.weight"] = weights["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", f"{d}.layer_norm")
    for i in range(n_dec):
        s, t = f"decoder/layer_{i}", f"{d}.layers.{i}"
        norm(f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        split(f"{s}/self_attention/linear_0", [f"{t}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{s}/self_attention/linear_1", f"{t}.self_attn.out_proj")
        norm(f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
        linear(f"{s}/attention/linear_0", f"{t}.encoder_attn.q_proj")
        split(f"{s}/attention/linear_1", [f"{t}.encoder_attn.{p}_proj" for p in "kv"])
        linear(f"{s}/attention/linear_2", f"{t}.encoder_attn.out_proj")
        norm(f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{t}.fc1")
        linear(f"{s}/ffn/linear_1", f"{t}.fc2")
    # CTranslate2 stores the tied output projection as an alias of the embeddings.
    out["proj_out.weight"] = weights.get(
        "decoder/projection/weight", out[f"{d}.embed_tokens.weight"]
    )
    return out


def _special_ids(folder: Path) -> dict[str, int]:
    """Special token ids by content, from tokenizer.json's added tokens (or vocabulary.txt)."""
    ids: dict[str, int] = {}
    try:
        if (folder / "tokenizer.json").is_file():
            for tok in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]:
                ids[tok["content"]] = tok["id"]
        else:
            # CTranslate2 writes vocabulary.json (newer) or vocabulary.txt, one token a line.
            if (folder / "vocabulary.json").is_file():
                tokens = json.loads((folder / "vocabulary.json").read_text())
            else:
                tokens = (folder / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
            ids = {t: i for i, t in enumerate(tokens) if t.startswith("<|") and t.endswith("|>")}
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read special tokens from {folder}: {exc}") from exc
    missing = [
        t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>") if t not in ids
    ]
    if missing:
        raise ModelLoadError(
            f"{folder}: special tokens {missing} not found; expected tokenizer.json or "
            f"vocabulary.txt of a Whisper model"
        )
    return ids


def read_ct2_whisper(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a CTranslate2 Whisper folder.

    Returns `(hf_config, tensors)`: a dict shaped like a transformers Whisper
    `config.json` (plus the generation keys `no_timestamps_token_id`, `is_multilingual`,
    `lang_ids`, `alignment_heads`), and float32 arrays under transformers'
    `WhisperForConditionalGeneration` state-dict names, loadable with strict
    `load_state_dict`. Raises `ModelLoadError` for a missing or malformed folder.
    """
    folder = Path(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(
            f"{model_path} is missing; expected a CTranslate2 Whisper folder with "
            f"{MODEL_FILE}, config.json and tokenizer.json"
        )
    spec, variables = read_ct2_model_bin(model_path)
    if spec != "WhisperSpec":
        raise ModelLoadError(f"{model_path} holds a {spec!r} model; expected 'WhisperSpec'")
    ct2_config: dict = {}
    if (folder / "config.json").is_file():
        try:
            ct2_config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc

    weights = _float_weights(variables)
    n_enc, n_dec = _count_layers(weights, "encoder"), _count_layers(weights, "decoder")
    try:
        tensors = _rename(weights, n_enc, n_dec)
    except KeyError as exc:
        raise ModelLoadError(f"{model_path}: Whisper variable {exc} is missing") from exc
    vocab_size, d_model = tensors["model.decoder.embed_tokens.weight"].shape
    specials = _special_ids(folder)
    eot, sot = specials["<|endoftext|>"], specials["<|startoftranscript|>"]
    no_ts = specials["<|notimestamps|>"]
    hf_config = {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": int(vocab_size),
        "num_mel_bins": int(tensors["model.encoder.conv1.weight"].shape[1]),
        "d_model": int(d_model),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": _scalar(variables, "encoder/num_heads", model_path),
        "decoder_attention_heads": _scalar(variables, "decoder/num_heads", model_path),
        "encoder_ffn_dim": int(tensors["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(tensors["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(tensors["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(tensors["model.decoder.embed_positions.weight"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": eot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "decoder_start_token_id": sot,
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or []),
        "no_timestamps_token_id": no_ts,
        "is_multilingual": bool(vocab_size >= 51865),
        # CTranslate2 writes lang_ids even for English-only models; they mean nothing there.
        "lang_ids": list(ct2_config.get("lang_ids") or []) if vocab_size >= 51865 else [],
        "alignment_heads": [list(h) for h in ct2_config.get("alignment_heads") or []],
    }
    return hf_config, tensors
