"""wav2vec2 CTC: offline logits against transformers (PyTorch) on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from models import wav2vec2  # noqa: E402

TINY = dict(vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
            mask_time_prob=0.0)
LAYOUTS = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
    "adapter": dict(feat_extract_norm="layer", do_stable_layer_norm=True, add_adapter=True,
                    output_hidden_size=24, num_adapter_layers=2),
    "attn_adapter": dict(feat_extract_norm="layer", do_stable_layer_norm=True,
                         adapter_attn_dim=8),
}


def randomize(model, seed: int) -> None:
    """Perturbs every parameter and buffer (norms, biases, batch-norm stats) so that a
    wrong mapping cannot hide behind transformers' ones/zeros initialization."""
    gen = torch.Generator().manual_seed(seed)
    saved = model.state_dict(keep_vars=True)  # not the derived, non-persistent tables
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name not in saved or name.endswith("inv_freq") or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen) * 0.2
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            else:
                tensor.add_(noise)


def save_tiny(folder: Path, model_cls, config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


def torch_logits(model, audio: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(audio), **kwargs).logits.numpy()


def batch_audio(lengths: tuple[int, ...], seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    audio = np.zeros((len(lengths), max(lengths)), np.float32)
    mask = np.zeros(audio.shape, np.int32)
    for i, n in enumerate(lengths):
        audio[i, :n] = rng.standard_normal(n).astype(np.float32) * 0.5
        mask[i, :n] = 1
    return audio, mask


@pytest.fixture(scope="session", params=sorted(LAYOUTS))
def tiny_w2v(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"w2v_{request.param}")
    config = transformers.Wav2Vec2Config(**TINY, **LAYOUTS[request.param])
    model = save_tiny(folder, transformers.Wav2Vec2ForCTC, config)
    return request.param, folder, model


def test_offline_matches_transformers(tiny_w2v):
    name, folder, model = tiny_w2v
    config, params, vocab_dir = wav2vec2.load(folder)
    assert vocab_dir == folder
    assert config.do_stable_layer_norm == LAYOUTS[name]["do_stable_layer_norm"]
    audio, mask = batch_audio((16000, 9000))
    ours = np.asarray(wav2vec2.forward(params, config, audio, mask))
    ref = torch_logits(model, audio, mask)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # without a mask: one unpadded utterance
    ours = np.asarray(wav2vec2.forward(params, config, audio[:1, :12345], None))
    ref = torch_logits(model, audio[:1, :12345], None)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    if not config.add_adapter:
        assert ours.shape[1] == int(wav2vec2.num_frames(config, 12345))


def test_both_weight_norm_spellings_and_bin(tiny_w2v, tmp_path):
    """weight_g/weight_v (older checkpoints) and pytorch_model.bin load to the same logits."""
    name, folder, model = tiny_w2v
    tensors = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    assert any("parametrizations.weight.original0" in k for k in tensors)
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v
               for k, v in tensors.items()}
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in renamed.items()}, old / "pytorch_model.bin")
    audio, mask = batch_audio((8000,), seed=3)
    ref = torch_logits(model, audio, None)
    config, params, _ = wav2vec2.load(old)
    np.testing.assert_allclose(np.asarray(wav2vec2.forward(params, config, audio, None)), ref,
                               atol=1e-4, rtol=0)


def test_config_from_hf_json(tiny_w2v):
    name, folder, _ = tiny_w2v
    hf = json.loads((folder / "config.json").read_text())
    config = wav2vec2.Wav2Vec2Config.from_hf_config(hf)
    assert config.conv_kernel == tuple(hf["conv_kernel"])
    assert config.total_stride == 320 and config.receptive_field == 400
    assert config.fe_delay == 240 and config.fe_delay_frames == 1
    assert config.add_adapter == hf["add_adapter"]


def test_load_rejects_other_models(tmp_path):
    from models.checkpoint import ModelLoadError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    safetensors_numpy.save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError):
        wav2vec2.load(tmp_path)


def test_encoder_registry_by_model_type():
    """Each family's config names its registry entry; unknown types are named errors."""
    for model_type, encoder in wav2vec2.ENCODERS.items():
        assert encoder.config_class().model_type == model_type
        assert wav2vec2.encoder_for(encoder.config_class.tiny()) is encoder
    with pytest.raises(ValueError, match="supported: wav2vec2, wav2vec2-conformer"):
        wav2vec2.encoder_for(wav2vec2.Wav2Vec2Config(model_type="hubert"))
    with pytest.raises(ValueError, match="unsupported encoder model_type 'hubert'"):
        wav2vec2.config_from_hf({"model_type": "hubert"})
