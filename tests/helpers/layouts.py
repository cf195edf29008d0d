"""Tiny random CTC checkpoints whose layouts are not wav2vec2-base's (issue 11), saved
with transformers' `save_pretrained`, and transformers' greedy decode as the reference.

    folder = save_layout(tmp_path / "w2v_s544", "w2v_s544")
    expected = reference_text(folder, audio)   # argmax of the PyTorch logits, decoded

Every layout changes what the base model fixes: the number of feature-extractor convs,
their strides (total stride != 320) and kernels (some shorter than their stride), the
positional conv, the conformer's position type, the adapter's stride and kernel.
`exact_stream`: streaming with left context and look-ahead covering the file gives
exactly the offline logits (layer-norm feature extractor, no input normalization); the
group-norm layout streams with running statistics, which the existing streaming tests
accept as a bounded divergence (tests/models/wav2vec2/test_wav2vec2_streaming.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .daemon import CTC_VOCAB

TINY = dict(vocab_size=len(CTC_VOCAB), hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=48, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, pad_token_id=0)


@dataclass(frozen=True)
class Layout:
    family: str  # "wav2vec2" or "conformer"
    config: dict[str, Any] = field(default_factory=dict)
    do_normalize: bool = False  # preprocessor_config.json
    exact_stream: bool = True
    seed: int = 0


LAYOUTS: dict[str, Layout] = {
    # The example: three convs, strides 5, 4, 4 (80 samples = 5 ms frames), the
    # last kernel (3) shorter than its stride (4); large-model layer norms.
    "w2v_s544": Layout("wav2vec2", dict(
        conv_dim=(16,) * 3, conv_stride=(5, 4, 4), conv_kernel=(10, 3, 3),
        feat_extract_norm="layer", do_stable_layer_norm=True)),
    # Five convs (5 ms frames, receptive field 120), an even positional conv of 12 in 2
    # groups, post-LN layers on a layer-norm front end.
    "w2v_s52222": Layout("wav2vec2", dict(
        conv_dim=(16,) * 5, conv_stride=(5, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 2),
        num_conv_pos_embeddings=12, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=False), seed=1),
    # Conformer with relative positions, strides 4, 4, 4 (64 samples = 4 ms frames) and
    # kernels longer than, equal to and shorter than their strides.
    "conformer_s444": Layout("conformer", dict(
        conv_dim=(16,) * 3, conv_stride=(4, 4, 4), conv_kernel=(8, 4, 3),
        feat_extract_norm="layer", conv_depthwise_kernel_size=5, hidden_act="swish",
        position_embeddings_type="relative")),
    # An adapter of two stride-3, kernel-5 convs on the 5 ms front end: output frames of
    # 720 samples (45 ms), so a 320 ms chunk rounds to 7 of them (315 ms).
    "w2v_adapter": Layout("wav2vec2", dict(
        conv_dim=(16,) * 3, conv_stride=(5, 4, 4), conv_kernel=(10, 3, 3),
        feat_extract_norm="layer", do_stable_layer_norm=True, add_adapter=True,
        output_hidden_size=24, num_adapter_layers=2, adapter_stride=3,
        adapter_kernel_size=5)),
    # Base-style group norm and utterance normalization on four convs of total stride 135
    # (8.4375 ms frames; 320 ms rounds to 38 frames, 320.625 ms), positional conv 9.
    "w2v_s5333_group": Layout("wav2vec2", dict(
        conv_dim=(16,) * 4, conv_stride=(5, 3, 3, 3), conv_kernel=(10, 3, 3, 3),
        num_conv_pos_embeddings=9, num_conv_pos_embedding_groups=2,
        feat_extract_norm="group", do_stable_layer_norm=False),
        do_normalize=True, exact_stream=False),
}


def _classes(family: str):
    import transformers

    if family == "conformer":
        return transformers.Wav2Vec2ConformerConfig, transformers.Wav2Vec2ConformerForCTC
    return transformers.Wav2Vec2Config, transformers.Wav2Vec2ForCTC


def write_ctc_tokenizer(folder: Path, do_normalize: bool = True) -> None:
    """vocab.json (CTC_VOCAB), tokenizer_config.json and preprocessor_config.json."""
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CTC_VOCAB)}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<pad>", "unk_token": "<unk>", "word_delimiter_token": "|"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": do_normalize}))


def save_layout(folder: Path, name: str) -> Path:
    """The layout `name` as a seeded tiny random CTC folder (same weights every call). The
    head is scaled so the argmax path spells varied text, and never picks <s>, </s> or
    <unk> (the text is letters and spaces)."""
    import torch

    layout = LAYOUTS[name]
    config_cls, model_cls = _classes(layout.family)
    torch.manual_seed(layout.seed)
    model = model_cls(config_cls(**{**TINY, **layout.config})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        model.lm_head.bias[1:4] = -1e4  # <s>, </s>, <unk>
    model.save_pretrained(folder)
    write_ctc_tokenizer(folder, layout.do_normalize)
    return folder


def reference_text(folder: Path, audio: np.ndarray) -> str:
    """transformers' greedy CTC decode of 16 kHz `audio` with the folder's model: the
    feature extractor as the folder configures it, argmax of the PyTorch logits,
    `Wav2Vec2CTCTokenizer.decode`."""
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    family = "conformer" if config["model_type"] == "wav2vec2-conformer" else "wav2vec2"
    model = _classes(family)[1].from_pretrained(folder).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(folder)
    inputs = extractor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ids = model(inputs.input_values).logits.argmax(-1)[0]
    return transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json")).decode(ids)
