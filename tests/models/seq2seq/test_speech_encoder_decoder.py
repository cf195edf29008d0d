"""models/seq2seq/speech_encoder_decoder.py against transformers' SpeechEncoderDecoderModel on tiny
random checkpoints (wav2vec2 + BART with a projection, wav2vec2 + GPT-2, conformer + mBART)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")
tokenizers = pytest.importorskip("tokenizers")

from models import decoding  # noqa: E402
from models.checkpoint import ModelLoadError  # noqa: E402
from models.seq2seq import speech_encoder_decoder as sed  # noqa: E402
from streamd import cli  # noqa: E402

ATOL = 1e-4
VOCAB, START, EOS, PAD = 64, 0, 2, 1
MAX_NEW = 16  # one decoder length (MAX_NEW + 1) everywhere: fewer compiles


def _encoder(kind: str):
    """kind: "wav2vec2" (group norm, post-LN), "wav2vec2-layer" (layer norm, pre-LN: pads
    exactly, so generate() pads it to a bucket) or "wav2vec2-conformer"."""
    common = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        vocab_size=12,
    )  # fmt: skip
    if kind == "wav2vec2":
        return transformers.Wav2Vec2Config(**common)
    if kind == "wav2vec2-layer":
        return transformers.Wav2Vec2Config(**common, feat_extract_norm="layer",
                                           do_stable_layer_norm=True)
    return transformers.Wav2Vec2ConformerConfig(
        **common, conv_depthwise_kernel_size=7, hidden_act="swish",
        position_embeddings_type="rotary")


def _decoder(kind: str):
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            add_cross_attention=True, is_decoder=True, bos_token_id=START, eos_token_id=EOS,
            pad_token_id=PAD)
    # encoder_layers = decoder_layers: transformers sizes its cache by num_hidden_layers,
    # which BART reads from encoder_layers.
    cls = transformers.BartConfig if kind == "bart" else transformers.MBartConfig
    return cls(
        vocab_size=VOCAB, d_model=24, decoder_layers=2, decoder_attention_heads=4,
        decoder_ffn_dim=48, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
        max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
        scale_embedding=kind == "mbart", bos_token_id=START, eos_token_id=EOS,
        pad_token_id=PAD, forced_eos_token_id=None,
    )  # fmt: skip


CASES = {"w2v2-bart": ("wav2vec2", "bart"), "w2v2-gpt2": ("wav2vec2-layer", "gpt2"),
         "conformer-mbart": ("wav2vec2-conformer", "mbart")}


@pytest.fixture(scope="session", params=list(CASES))
def hf(request, tmp_path_factory: pytest.TempPathFactory):
    """(case, torch model, our loaded model, folder) for one tiny checkpoint on disk."""
    enc_kind, dec_kind = CASES[request.param]
    config = transformers.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        _encoder(enc_kind), _decoder(dec_kind))
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = START, EOS, PAD
    torch.manual_seed(0)
    model = transformers.SpeechEncoderDecoderModel(config=config).eval()
    with torch.no_grad():  # widen the decoder's tiny init so attention is not uniform
        for name, p in model.named_parameters():
            if name.startswith("decoder.") and "norm" not in name and "ln_" not in name:
                p.add_(torch.randn_like(p) * 0.15)
    folder: Path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    # A word-level tokenizer.json: "w0" ... "w63", with the special ids named.
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok.add_special_tokens([tokenizers.AddedToken(f"w{i}", special=True) for i in (0, 1, 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    ours = sed.load(folder)
    assert ours.config.project == (dec_kind != "gpt2")
    assert ours.config.pads_exactly == (enc_kind == "wav2vec2-layer")
    return request.param, model, ours, folder


@pytest.fixture(scope="session")
def audio(shared_manifest: list[dict]) -> np.ndarray:
    entry = min(shared_manifest, key=lambda e: e["duration_s"])
    samples, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16000
    # From 1 s to the end of the 1.54 s recording (LJ002-0020): its last 0.54 s.
    return samples[16000:32000]


def _encode(ours, audio: np.ndarray):
    x = sed.normalize(audio)[None]
    hidden, mask = sed.encode(ours.params, ours.config, jnp.asarray(x))
    return hidden, mask, sed.cross_kv(ours.params, ours.config, hidden, mask)


def test_logits_match_transformers(hf, audio: np.ndarray) -> None:
    _, model, ours, _ = hf
    tokens = np.array([[START, 5, 17, 40, 3, 9, 33, 12]], np.int64)
    with torch.no_grad():
        out = model(input_values=torch.from_numpy(sed.normalize(audio)[None]),
                    decoder_input_ids=torch.from_numpy(tokens))
        ref_hidden = model.encoder(torch.from_numpy(sed.normalize(audio)[None]))[0]
        if hasattr(model, "enc_to_dec_proj"):
            ref_hidden = model.enc_to_dec_proj(ref_hidden)
    hidden, _, cross = _encode(ours, audio)
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden.numpy(), atol=ATOL)
    dec = sed.decoder(ours.config, MAX_NEW + 1)
    logits, _ = dec.step(ours.params, dec.init_cache(1), cross, jnp.asarray(tokens, jnp.int32),
                         jnp.asarray([tokens.shape[1]], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=ATOL)


def test_incremental_equals_teacher_forced(hf, audio: np.ndarray) -> None:
    _, _, ours, _ = hf
    _, _, cross = _encode(ours, audio)
    tokens = jnp.asarray([[START, 5, 17, 40, 3, 9, 33, 12]], jnp.int32)
    dec = sed.decoder(ours.config, MAX_NEW + 1)
    full, _ = dec.step(ours.params, dec.init_cache(1), cross, tokens, jnp.asarray([8]))
    logits, cache = dec.step(ours.params, dec.init_cache(1), cross, tokens[:, :2],
                             jnp.asarray([2]))
    steps = [logits]
    for i in range(2, 8):
        logits, cache = dec.step(ours.params, cache, cross, tokens[:, i:i + 1], jnp.asarray([1]))
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1),
                               np.asarray(full), atol=1e-5)


def test_greedy_generation_matches_transformers(hf, audio: np.ndarray) -> None:
    name, model, ours, _ = hf
    max_new = MAX_NEW
    with torch.no_grad():
        ref = model.generate(
            input_values=torch.from_numpy(sed.normalize(audio)[None]), max_new_tokens=max_new,
            do_sample=False, num_beams=1, decoder_start_token_id=START, eos_token_id=EOS,
            pad_token_id=PAD, forced_eos_token_id=None, forced_bos_token_id=None,
        )[0].numpy()  # fmt: skip
    ref = [int(t) for t in ref[1:]]
    if EOS in ref:
        ref = ref[: ref.index(EOS)]
    assert len(ref) > 3, name  # real steps, not an immediate end token
    # Where padding is exact, generate() pads the 0.54 s to the 2 s bucket: the same ids.
    assert ours.config.pads_exactly == (name == "w2v2-gpt2")
    assert len(audio) < sed.AUDIO_BUCKET
    assert sed.generate(ours, audio, max_new_tokens=max_new) == ref
    # transcribe: the same ids through the decoder's tokenizer.json
    tok = tokenizers.Tokenizer.from_file(str(hf[3] / "tokenizer.json"))
    text = sed.transcribe(ours, audio, max_new_tokens=max_new)
    assert text == tok.decode(ref, skip_special_tokens=True).strip()
    assert text  # the generated words are not all specials


@pytest.mark.parametrize("hf", ["conformer-mbart"], indirect=True)
def test_generation_config_json_overrides_config_json(hf, audio: np.ndarray,
                                                     tmp_path: Path) -> None:
    """mBART-style settings in generation_config.json only (start token = EOS, a forced
    target-language token, a short max_length): load() decodes as transformers'
    from_pretrained + generate (no arguments), which read that file."""
    _, model, plain, folder = hf
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        (folder / "preprocessor_config.json").read_text())
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    # Forced token 11 continues differently after start token EOS than after config.json's.
    gen.update(decoder_start_token_id=EOS, forced_bos_token_id=11, max_length=MAX_NEW + 1,
               forced_eos_token_id=None)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["decoder_start_token_id"] == START != EOS
    assert config.get("forced_bos_token_id") is None and "max_length" not in config

    ours = sed.load(tmp_path)
    c = ours.config
    assert (c.decoder_start_token_id, c.forced_bos_token_id, c.max_new_tokens) == \
        (EOS, 11, MAX_NEW)
    reloaded = transformers.SpeechEncoderDecoderModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = reloaded.generate(
            input_values=torch.from_numpy(sed.normalize(audio)[None]))[0].tolist()
    assert ref[:2] == [EOS, 11]
    ref = ref[1:]
    ref = ref[: ref.index(EOS)] if EOS in ref else ref
    assert len(ref) == MAX_NEW  # the length limit is the file's max_length
    assert sed.generate(ours, audio) == ref
    # config.json's settings alone decode differently.
    assert sed.generate(plain, audio, max_new_tokens=MAX_NEW) != ref


def test_beam_search_matches_transformers(hf, audio: np.ndarray) -> None:
    """3 beams (early stopping, length penalty 1) through the shared engine pick
    transformers' best hypothesis; 1 beam equals greedy."""
    _, model, ours, _ = hf
    with torch.no_grad():
        ref = model.generate(
            input_values=torch.from_numpy(sed.normalize(audio)[None]), max_new_tokens=MAX_NEW,
            do_sample=False, num_beams=3, early_stopping=True, length_penalty=1.0,
            decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD,
            forced_eos_token_id=None, forced_bos_token_id=None,
        )[0].tolist()  # fmt: skip
    ref = ref[1:]
    ref = ref[: ref.index(EOS)] if EOS in ref else ref
    assert sed.generate(ours, audio, beam_size=3, max_new_tokens=MAX_NEW) == ref

    _, _, cross = _encode(ours, audio)
    dec = sed.decoder(ours.config, MAX_NEW + 1)
    prompt = jnp.asarray([[START]], jnp.int32)
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, renormalize=False)
    greedy = decoding.greedy_search(dec, ours.params, cross, prompt, **kw)
    beam1 = decoding.beam_search(dec, ours.params, cross, prompt, beams=1, **kw)
    np.testing.assert_array_equal(np.asarray(beam1.tokens), np.asarray(greedy.tokens))


def test_unsupported_decoder_is_named(tmp_path: Path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    config = {
        "model_type": "speech-encoder-decoder", "decoder_start_token_id": 0, "eos_token_id": 2,
        "encoder": {"model_type": "wav2vec2", "hidden_size": 32},
        "decoder": {"model_type": "bert", "vocab_size": 10},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    safetensors_numpy.save_file({"x": np.zeros(1, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'bert'.*bart, mbart, gpt2"):
        sed.load(tmp_path)
    config["encoder"]["model_type"] = "hubert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"'hubert'.*wav2vec2, wav2vec2-conformer"):
        sed.load(tmp_path)


def test_search_is_the_shared_engine(hf, audio: np.ndarray, monkeypatch) -> None:
    """generate() drives models/decoding.py's searches with the shared TextDecoder."""
    import inspect

    from models.seq2seq import text_decoders

    _, _, ours, _ = hf
    seen = []
    for name in ("greedy_search", "beam_search"):
        real = getattr(decoding, name)

        def spy(dec, *args, _real=real, _name=name, **kw):
            seen.append((_name, type(dec)))
            return _real(dec, *args, **kw)

        monkeypatch.setattr(decoding, name, spy)
    sed.generate(ours, audio, max_new_tokens=MAX_NEW)
    sed.generate(ours, audio, beam_size=3, max_new_tokens=MAX_NEW)
    assert seen == [("greedy_search", text_decoders.TextDecoder),
                    ("beam_search", text_decoders.TextDecoder)]
    source = inspect.getsource(sed)
    assert "while_loop" not in source and "fori_loop" not in source


def test_cli_transcribes_like_transformers(hf, audio: np.ndarray, tmp_path: Path,
                                           capsys) -> None:
    """`streamd transcribe --model FOLDER` prints transformers' greedy generate, decoded by
    the decoder's tokenizer.json, at the model's own default length."""
    name, model, ours, folder = hf
    max_new = ours.config.max_new_tokens
    with torch.no_grad():
        ref = model.generate(
            input_values=torch.from_numpy(sed.normalize(audio)[None]),
            max_new_tokens=max_new, do_sample=False, num_beams=1,
            decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD,
            forced_eos_token_id=None, forced_bos_token_id=None,
        )[0].tolist()  # fmt: skip
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = tok.decode(ref[1:], skip_special_tokens=True).strip()
    wav = tmp_path / "utterance.wav"
    sf.write(wav, audio, 16000)
    assert cli.main(["transcribe", "--json", "--model", str(folder), str(wav)]) == 0, name
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["text"] == expected, name
