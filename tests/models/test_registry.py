"""Model lookup: names and folders, clear errors, converted params cached on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from models import registry
from models.checkpoint import ModelLoadError


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    config = transformers.WhisperConfig(
        vocab_size=51864, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=32,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("whisper_hf")
    transformers.WhisperForConditionalGeneration(config).save_pretrained(folder)
    # The embedded model's tokenizer fits any English-only Whisper vocabulary.
    tokenizer = registry.resolve_model("tiny.en") / "tokenizer.json"
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def _flat(params) -> dict:
    return traverse_util.flatten_dict(params, sep="/")


def test_params_are_converted_once_then_read_from_the_cache(whisper_folder, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("STREAMD_CACHE_DIR", str(tmp_path))
    first = registry.load_whisper(whisper_folder)
    cached = list((tmp_path / "params").glob("whisper-hf-*.npz"))
    assert len(cached) == 1
    # A second load must not read the checkpoint again.
    monkeypatch.setattr(registry, "read_hf_folder", lambda _: pytest.fail("re-converted"))
    second = registry.load_whisper(whisper_folder)
    assert second.config == first.config
    a, b = _flat(first.params), _flat(second.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_changed_checkpoint_is_converted_again(whisper_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMD_CACHE_DIR", str(tmp_path))
    registry.load_whisper(whisper_folder)
    (whisper_folder / "generation_config.json").touch()  # the folder's content changed
    registry.load_whisper(whisper_folder)
    assert len(list((tmp_path / "params").glob("whisper-hf-*.npz"))) == 2


def test_corrupt_cache_is_rebuilt(whisper_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMD_CACHE_DIR", str(tmp_path))
    registry.load_whisper(whisper_folder)
    (cached,) = (tmp_path / "params").glob("whisper-hf-*.npz")
    cached.write_bytes(b"not an npz")
    assert registry.load_whisper(whisper_folder).config.d_model == 16


def test_bad_model_names_say_what_was_expected(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an embedded model.*expected a Hugging"):
        registry.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="model_type 'bert'; supported: .*whisper"):
        registry.model_family(tmp_path)


def test_embedded_default_is_the_ct2_tiny_en():
    folder = registry.resolve_model(None)
    assert (folder / "model.bin").is_file() and registry.model_family(folder) == "whisper"
