"""wav2vec2-conformer CTC: offline logits against transformers on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_wav2vec2 import TINY, batch_audio, save_tiny, torch_logits  # noqa: E402

from models import wav2vec2  # noqa: E402

CONFORMER = dict(TINY, conv_depthwise_kernel_size=7, hidden_act="swish",
                 conformer_conv_dropout=0.0, max_source_positions=64)
POSITIONS = ("rotary", "relative", None)


@pytest.fixture(scope="session", params=POSITIONS, ids=str)
def tiny_conformer(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"conformer_{request.param}")
    config = transformers.Wav2Vec2ConformerConfig(
        **CONFORMER, position_embeddings_type=request.param,
        feat_extract_norm="layer" if request.param == "rotary" else "group")
    model = save_tiny(folder, transformers.Wav2Vec2ConformerForCTC, config, seed=5)
    return request.param, folder, model


def test_offline_matches_transformers(tiny_conformer):
    kind, folder, model = tiny_conformer
    config, params, _ = wav2vec2.load(folder)
    assert isinstance(config, wav2vec2.Wav2Vec2ConformerConfig)
    assert config.position_embeddings_type == kind
    audio, mask = batch_audio((16000, 7000), seed=7)
    ours = np.asarray(wav2vec2.forward(params, config, audio, mask))
    ref = torch_logits(model, audio, mask)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # longer than max_source_positions frames: transformers extends its tables, so do we
    long = batch_audio((32000,), seed=8)[0]
    np.testing.assert_allclose(np.asarray(wav2vec2.forward(params, config, long, None)),
                               torch_logits(model, long, None), atol=1e-4, rtol=0)


def test_config_none_position_type(tiny_conformer):
    kind, folder, _ = tiny_conformer
    hf = json.loads((folder / "config.json").read_text())
    config = wav2vec2.Wav2Vec2ConformerConfig.from_hf_config(hf)
    assert config.position_embeddings_type == kind
    assert wav2vec2.encoder_for(config) is wav2vec2.ENCODERS["wav2vec2-conformer"]
    assert config.pos_conv_left == 0
    assert config.conv_depthwise_kernel_size == 7
