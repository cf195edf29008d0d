"""Checkpoint folder reading: every format yields the PyTorch state dict, exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from flax.serialization import msgpack_serialize

from models.checkpoint import ModelLoadError, read_hf_config, read_hf_folder


@pytest.fixture(scope="module")
def tiny_whisper() -> transformers.WhisperForConditionalGeneration:
    config = transformers.WhisperConfig(
        vocab_size=120, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=50, max_target_positions=40,
        num_mel_bins=8, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


def _expected(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_bin"])
def test_reads_saved_pretrained_folder(tmp_path, tiny_whisper, safe):
    tiny_whisper.save_pretrained(tmp_path, safe_serialization=safe)
    config, tensors = read_hf_folder(tmp_path)
    assert config["model_type"] == "whisper"
    expected = _expected(tiny_whisper)
    # Tied weights may be stored once; every stored tensor must equal the model's.
    assert set(tensors) <= set(expected)
    assert "model.encoder.conv1.weight" in tensors
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_reads_flax_msgpack_with_pytorch_names(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(4, 6)).astype(np.float32)  # flax [in, out]
    conv = rng.normal(size=(3, 4, 5)).astype(np.float32)  # flax [width, in, out]
    scale = rng.normal(size=(6,)).astype(np.float32)
    tree = {
        "model": {
            "layers": {"0": {"fc1": {"kernel": dense, "bias": scale}}},
            "conv1": {"kernel": conv},
            "layer_norm": {"scale": scale},
            "embed_tokens": {"embedding": dense},
        }
    }
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    _, tensors = read_hf_folder(tmp_path)
    np.testing.assert_array_equal(tensors["model.layers.0.fc1.weight"], dense.T)
    np.testing.assert_array_equal(tensors["model.layers.0.fc1.bias"], scale)
    np.testing.assert_array_equal(tensors["model.conv1.weight"], conv.transpose(2, 1, 0))
    np.testing.assert_array_equal(tensors["model.layer_norm.weight"], scale)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], dense)


def test_missing_and_bad_folders_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not a folder"):
        read_hf_folder(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=str(tmp_path) + ".*expected one of"):
        read_hf_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read weights from .*model.safetensors"):
        read_hf_folder(tmp_path)


def test_generation_config_overrides_generation_keys(tmp_path):
    """generation_config.json's top-level generation keys replace config.json's (null:
    removed); its other keys, and nested configs, are left alone."""
    config = {
        "model_type": "speech-encoder-decoder", "d_model": 32, "max_length": 200,
        "decoder_start_token_id": 2, "forced_bos_token_id": 9, "eos_token_id": 2,
        "decoder": {"model_type": "mbart", "decoder_start_token_id": 2},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_hf_config(tmp_path) == config  # no generation_config.json: config.json
    generation = {
        "_from_model_config": False, "transformers_version": "5.0.0", "d_model": 64,
        "decoder_start_token_id": 0, "max_length": 20, "forced_bos_token_id": None,
        "suppress_tokens": [1, 3], "no_timestamps_token_id": 7,
        "decoder": {"decoder_start_token_id": 5},
    }  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    merged = read_hf_config(tmp_path)
    expected = {k: v for k, v in config.items() if k != "forced_bos_token_id"}
    expected.update(decoder_start_token_id=0, max_length=20, suppress_tokens=[1, 3],
                    no_timestamps_token_id=7)
    assert merged == expected


def test_reads_saved_generation_config(tmp_path, tiny_whisper):
    """What save_pretrained writes to generation_config.json reaches read_hf_folder."""
    tiny_whisper.save_pretrained(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    generation.update(max_length=30, decoder_start_token_id=3)
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    config, _ = read_hf_folder(tmp_path)
    assert (config["max_length"], config["decoder_start_token_id"]) == (30, 3)
    assert json.loads((tmp_path / "config.json").read_text())["decoder_start_token_id"] == 1


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff"], ids=["syntax", "list", "bytes"])
def test_bad_generation_config_names_the_file(tmp_path, text):
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    (tmp_path / "generation_config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelLoadError, match=r"generation_config\.json is not"):
        read_hf_config(tmp_path)
    with pytest.raises(ModelLoadError, match=r"generation_config\.json is not"):
        read_hf_folder(tmp_path)
