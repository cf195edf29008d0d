"""`streamd transcribe --model HF_FOLDER [--stream]` with wav2vec2 / conformer CTC models:
the printed text equals transformers' greedy CTC decode of the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers

from streamd import cli

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'"]


def _config(kind: str):
    common = dict(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, pad_token_id=0,
    )  # fmt: skip
    if kind == "wav2vec2":
        return transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Config(**common)
    return transformers.Wav2Vec2ConformerForCTC, transformers.Wav2Vec2ConformerConfig(
        **common, conv_depthwise_kernel_size=7, position_embeddings_type="rotary")


@pytest.fixture(scope="module", params=["wav2vec2", "conformer"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    cls, config = _config(request.param)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # a wider head, so the argmax path spells varied text
        model.lm_head.weight.mul_(30.0)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<pad>", "unk_token": "<unk>", "word_delimiter_token": "|"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    return folder, model


@pytest.fixture(scope="module")
def wav(shared_manifest, tmp_path_factory) -> tuple[Path, np.ndarray]:
    entry = min(shared_manifest, key=lambda e: e["duration_s"])
    audio, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16000
    path = tmp_path_factory.mktemp("audio") / "utterance.wav"
    sf.write(path, audio, rate)
    return path, audio


def _reference_text(folder: Path, model: torch.nn.Module, audio: np.ndarray) -> str:
    extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
    inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ids = model(inputs.input_values).logits.argmax(-1)[0]
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"))
    return tokenizer.decode(ids)


def test_offline_text_equals_transformers(checkpoint, wav, capsys):
    folder, model = checkpoint
    path, audio = wav
    expected = _reference_text(folder, model, audio)
    assert len(expected.split()) >= 2, "the random model should spell several words"
    assert cli.main(["transcribe", "--json", "--model", str(folder), str(path)]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["text"] == expected


def test_stream_prints_partials_then_the_final(checkpoint, wav, capsys):
    folder, _ = checkpoint
    path, audio = wav
    assert cli.main(["transcribe", "--json", "--stream", "--model", str(folder), str(path)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    partials = [r["partial"] for r in records[:-1]]
    final = records[-1]
    assert len(partials) >= 2 and all(r["file"] == str(path) for r in records)
    changes = zip(partials, partials[1:], strict=False)
    assert all(a != b for a, b in changes), "only changes are printed"
    assert final["text"] == partials[-1] and final["text"]
    assert final["duration_s"] == pytest.approx(len(audio) / 16000, abs=1e-3)


def test_stream_flag_needs_a_ctc_model(wav, capsys):
    path, _ = wav
    assert cli.main(["transcribe", "--stream", str(path)]) == 2
    assert "--stream needs a CTC model" in capsys.readouterr().err
