"""models/seq2seq/speech2text.py (+ s2t_features, text_decoders) against transformers' PyTorch
Speech2Text on a tiny random checkpoint saved with save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

from models import decoding  # noqa: E402
from models.seq2seq import s2t_features, speech2text  # noqa: E402
from streamd import cli  # noqa: E402

ATOL = 1e-4
PAD, EOS, START = 1, 2, 2
MAX_NEW = 16  # one decoder length (MAX_NEW + 1) everywhere: fewer compiles


@pytest.fixture(scope="session")
def hf(tmp_path_factory: pytest.TempPathFactory):
    """(torch model, our loaded model) for one tiny random checkpoint on disk."""
    cfg = transformers.Speech2TextConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, conv_channels=24, conv_kernel_sizes=[5, 5],
        input_feat_per_channel=80, max_source_positions=400, max_target_positions=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=0, decoder_start_token_id=START,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Speech2TextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # init std 0.02 makes attention nearly uniform: widen the weights
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder: Path = tmp_path_factory.mktemp("s2t_tiny")
    model.save_pretrained(folder)
    return model, speech2text.load(folder)


@pytest.fixture(scope="session")
def utterance(shared_manifest: list[dict]) -> np.ndarray:
    """The shortest shared recording, float32 16 kHz."""
    entry = min(shared_manifest, key=lambda e: e["duration_s"])
    audio, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16000
    return audio


def test_front_end_matches_transformers(shared_manifest: list[dict]) -> None:
    """Every value of every shared recording (the 71.6 s stream file too) within 1e-3 of
    transformers' extractor, which without torchaudio (as here) computes in numpy float64.
    The float32 kaldi-native-fbank used before missed by up to 1e-2 in the lowest mel bins
    of quiet LJ Speech frames."""
    extractor = transformers.Speech2TextFeatureExtractor()
    for entry in shared_manifest:
        audio, _ = sf.read(entry["path"], dtype="float32")
        ref = extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]
        ours = s2t_features.features(audio)
        assert ours.shape == ref.shape, entry["audio"]
        assert ours.shape[0] == s2t_features.num_frames(len(audio))
        err = np.abs(ours - ref)
        assert err.max() < 1e-3, (entry["audio"], float(err.max()))


@pytest.mark.parametrize("num_samples", [400, 559, 560, None])
def test_log_mel_without_cmvn_matches_transformers(
    shared_manifest: list[dict], num_samples: int | None
) -> None:
    """The raw log-mel (a config without CMVN): no normalization hides an offset or a
    scale, e.g. of the 16-bit input scaling; the frame count at the edges (1, 1, 2 frames)."""
    extractor = transformers.Speech2TextFeatureExtractor(do_ceptral_normalize=False)
    entry = next(e for e in shared_manifest if e["audio"] == "ljspeech_LJ001-0030.wav")
    audio, _ = sf.read(entry["path"], dtype="float32")
    audio = audio[8000 : 8000 + num_samples] if num_samples else audio
    ref = extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]
    ours = s2t_features.features(audio, s2t_features.FrontEndConfig(do_cmvn=False))
    assert ours.shape == ref.shape == (s2t_features.num_frames(len(audio)), 80)
    assert np.abs(ours - ref).max() < 1e-3


def test_front_end_rejects_other_rates() -> None:
    with pytest.raises(ValueError, match="16000"):
        s2t_features.FrontEndConfig.from_hf({"sampling_rate": 8000})


def _hf_logits(model, feats: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_features=torch.from_numpy(feats),
                    decoder_input_ids=torch.from_numpy(tokens).long())
    return out.logits.numpy()


def test_encoder_and_logits_match(hf, utterance: np.ndarray) -> None:
    model, ours = hf
    feats = s2t_features.features(utterance[:16000])[None]
    tokens = np.array([[START, 5, 17, 40, 3, 9, 77]], np.int32)
    ref = _hf_logits(model, feats, tokens)

    c = ours.config
    n = feats.shape[1]
    hidden, mask = speech2text.encode(ours.params, c, jnp.asarray(feats), jnp.asarray([n]))
    with torch.no_grad():
        ref_hidden = model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, atol=ATOL)
    assert hidden.shape[1] == speech2text.output_length(c, n)

    cross = speech2text.cross_kv(ours.params, c, hidden, mask)
    dec = speech2text.decoder(c, MAX_NEW + 1)
    logits, _ = dec.step(ours.params, dec.init_cache(1), cross, jnp.asarray(tokens),
                         jnp.asarray([tokens.shape[1]]))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=ATOL)


def test_padded_bucket_is_exact(hf, utterance: np.ndarray) -> None:
    _, ours = hf
    feats = s2t_features.features(utterance[:12000])
    n = feats.shape[0]
    c = ours.config
    exact, _ = speech2text.encode(ours.params, c, jnp.asarray(feats[None]), jnp.asarray([n]))
    padded = np.pad(feats, ((0, 256 - n), (0, 0)))[None]
    hidden, mask = speech2text.encode(ours.params, c, jnp.asarray(padded), jnp.asarray([n]))
    t = exact.shape[1]
    assert int(mask.sum()) == t
    np.testing.assert_allclose(np.asarray(hidden[:, :t]), np.asarray(exact), atol=1e-5)


def test_incremental_equals_teacher_forced(hf, utterance: np.ndarray) -> None:
    _, ours = hf
    c = ours.config
    feats = s2t_features.features(utterance[:16000])[None]
    hidden, mask = speech2text.encode(ours.params, c, jnp.asarray(feats),
                                      jnp.asarray([feats.shape[1]]))
    cross = speech2text.cross_kv(ours.params, c, hidden, mask)
    tokens = jnp.asarray([[START, 5, 17, 40, 3, 9, 77, 12]], jnp.int32)
    dec = speech2text.decoder(c, MAX_NEW + 1)
    full, _ = dec.step(ours.params, dec.init_cache(1), cross, tokens, jnp.asarray([8]))
    # Prefill three tokens, then one at a time.
    logits, cache = dec.step(ours.params, dec.init_cache(1), cross, tokens[:, :3],
                             jnp.asarray([3]))
    steps = [logits]
    for i in range(3, 8):
        logits, cache = dec.step(ours.params, cache, cross, tokens[:, i:i + 1], jnp.asarray([1]))
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1),
                               np.asarray(full), atol=1e-5)
    assert int(cache.length[0]) == 8


def test_greedy_generation_matches_transformers(hf, utterance: np.ndarray) -> None:
    model, ours = hf
    max_new = MAX_NEW
    for audio in (utterance[:16000], utterance):  # 1 s, and the whole 1.54 s recording
        feats = s2t_features.features(audio)[None]
        with torch.no_grad():
            ref = model.generate(
                input_features=torch.from_numpy(feats), max_new_tokens=max_new, do_sample=False,
                num_beams=1, decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=PAD,
            )[0].numpy()  # fmt: skip
        ref = [int(t) for t in ref[1:]]
        if EOS in ref:
            ref = ref[: ref.index(EOS)]
        ours_ids = speech2text.generate(ours, audio, max_new_tokens=max_new)
        assert ours_ids == ref
        assert len(ref) > 3  # the comparison covers real steps, not an immediate end


def test_generation_config_json_overrides_config_json(hf, utterance: np.ndarray,
                                                     tmp_path: Path) -> None:
    """A generation_config.json whose start token, forced first token and length differ
    from config.json's: load() decodes as transformers' from_pretrained + generate (no
    arguments), which read that file."""
    model, plain = hf
    model.save_pretrained(tmp_path)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    # Forced token 4 continues differently after start token 0 than after config.json's 2.
    gen.update(decoder_start_token_id=0, forced_bos_token_id=4, max_length=MAX_NEW + 1)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["decoder_start_token_id"] == START != 0
    assert "forced_bos_token_id" not in config and "max_length" not in config

    ours = speech2text.load(tmp_path)
    c = ours.config
    assert (c.decoder_start_token_id, c.forced_bos_token_id, c.max_new_tokens) == (0, 4, MAX_NEW)
    reloaded = transformers.Speech2TextForConditionalGeneration.from_pretrained(tmp_path).eval()
    audio = utterance[:16000]
    feats = s2t_features.features(audio)[None]
    with torch.no_grad():
        ref = reloaded.generate(input_features=torch.from_numpy(feats))[0].tolist()
    assert ref[:2] == [0, 4]
    ref = ref[1:]
    ref = ref[: ref.index(EOS)] if EOS in ref else ref
    assert len(ref) == MAX_NEW  # the length limit is the file's max_length
    assert speech2text.generate(ours, audio) == ref
    # config.json's settings alone decode differently.
    assert speech2text.generate(plain, audio, max_new_tokens=MAX_NEW) != ref


def test_beam_search_matches_transformers(hf, utterance: np.ndarray) -> None:
    """Beam search (3 beams, early stopping, length penalty 1) through the shared engine
    picks transformers' best hypothesis; 1 beam equals greedy."""
    model, ours = hf
    c = ours.config
    audio = utterance[:16000]
    feats = s2t_features.features(audio)[None]
    with torch.no_grad():
        ref = model.generate(
            input_features=torch.from_numpy(feats), max_new_tokens=MAX_NEW, do_sample=False,
            num_beams=3, early_stopping=True, length_penalty=1.0, decoder_start_token_id=START,
            eos_token_id=EOS, pad_token_id=PAD,
        )[0].tolist()  # fmt: skip
    ref = ref[1:]
    ref = ref[: ref.index(EOS)] if EOS in ref else ref
    assert speech2text.generate(ours, audio, beam_size=3, max_new_tokens=MAX_NEW) == ref

    hidden, mask = speech2text.encode(ours.params, c, jnp.asarray(feats),
                                      jnp.asarray([feats.shape[1]]))
    cross = speech2text.cross_kv(ours.params, c, hidden, mask)
    dec = speech2text.decoder(c, MAX_NEW + 1)
    prompt = jnp.asarray([[START]], jnp.int32)
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, renormalize=False)
    greedy = decoding.greedy_search(dec, ours.params, cross, prompt, **kw)
    beam1 = decoding.beam_search(dec, ours.params, cross, prompt, beams=1, **kw)
    np.testing.assert_array_equal(np.asarray(beam1.tokens), np.asarray(greedy.tokens))


def test_load_errors(tmp_path: Path) -> None:
    from models.checkpoint import ModelLoadError

    with pytest.raises(ModelLoadError, match="config.json"):
        speech2text.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    np.savez(tmp_path / "unused.npz")
    with pytest.raises(ModelLoadError, match="no weights"):
        speech2text.load(tmp_path)


@pytest.fixture(scope="session")
def s2t_tokenizer_files(tmp_path_factory: pytest.TempPathFactory, shared_manifest: list[dict]):
    """A fairseq-style vocab.json (<s> <pad> </s> <unk>, then the pieces, padded with
    placeholders to the tiny model's 96 ids) + a sentencepiece model trained on the shared
    transcripts."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("s2t_tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([e["text"] for e in shared_manifest]),
        model_prefix=str(folder / "sp"), vocab_size=92, model_type="bpe",
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "sp.model").rename(folder / "sentencepiece.bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sentencepiece.bpe.model"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(3, sp.get_piece_size()):  # spm's own <unk> <s> </s> are ids 0..2
        vocab[sp.id_to_piece(i)] = len(vocab)
    while len(vocab) < 96:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_upper_case": True}))
    return folder


def test_tokenizer_decodes_like_transformers(s2t_tokenizer_files: Path) -> None:
    ref = transformers.Speech2TextTokenizer(
        str(s2t_tokenizer_files / "vocab.json"),
        str(s2t_tokenizer_files / "sentencepiece.bpe.model"), do_upper_case=True)
    ours = speech2text.S2TTokenizer.from_folder(s2t_tokenizer_files)
    text = "a golden fortune and a happy life"
    ids = ref(text)["input_ids"]
    assert ids[-1] == EOS and len(ids) > 5
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text.upper()
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(i) for i in rng.integers(0, 92, size=12)]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_transcribe_end_to_end(hf, s2t_tokenizer_files: Path, tmp_path: Path,
                               utterance: np.ndarray, capsys) -> None:
    """load + transcribe on a folder with tokenizer files = transformers' generate decoded
    by transformers' tokenizer."""
    model, _ = hf
    model.save_pretrained(tmp_path)
    for name in ("vocab.json", "sentencepiece.bpe.model", "tokenizer_config.json"):
        shutil.copy(s2t_tokenizer_files / name, tmp_path / name)
    ours = speech2text.load(tmp_path)
    audio = utterance[:24000]
    feats = transformers.Speech2TextFeatureExtractor()(
        audio, sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        ref_ids = model.generate(input_features=feats, max_new_tokens=MAX_NEW, do_sample=False,
                                 num_beams=1, decoder_start_token_id=START, eos_token_id=EOS,
                                 pad_token_id=PAD)[0].tolist()
    tok = transformers.Speech2TextTokenizer.from_pretrained(tmp_path)
    expected = tok.decode(ref_ids, skip_special_tokens=True)
    assert expected
    assert speech2text.transcribe(ours, audio, max_new_tokens=MAX_NEW) == expected
    # The same through the CLI (whose default length is the model's own limit).
    wav = tmp_path / "utterance.wav"
    sf.write(wav, audio, 16000)
    with torch.no_grad():
        ref_ids = model.generate(input_features=feats, do_sample=False, num_beams=1,
                                 max_length=model.config.max_target_positions,
                                 decoder_start_token_id=START, eos_token_id=EOS,
                                 pad_token_id=PAD)[0].tolist()
    assert cli.main(["transcribe", "--json", "--model", str(tmp_path), str(wav)]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["text"] == tok.decode(ref_ids, skip_special_tokens=True)


def test_search_is_the_shared_engine(hf, utterance: np.ndarray, monkeypatch) -> None:
    """generate() drives models/decoding.py's searches with a TextDecoder; no loop of its own."""
    import inspect

    from models.seq2seq import text_decoders

    _, ours = hf
    seen = []
    for name in ("greedy_search", "beam_search"):
        real = getattr(decoding, name)

        def spy(dec, *args, _real=real, _name=name, **kw):
            seen.append((_name, type(dec)))
            return _real(dec, *args, **kw)

        monkeypatch.setattr(decoding, name, spy)
    speech2text.generate(ours, utterance[:16000], max_new_tokens=MAX_NEW)
    speech2text.generate(ours, utterance[:16000], beam_size=3, max_new_tokens=MAX_NEW)
    assert seen == [("greedy_search", text_decoders.TextDecoder),
                    ("beam_search", text_decoders.TextDecoder)]
    for module in (speech2text, text_decoders):
        source = inspect.getsource(module)
        assert "while_loop" not in source and "fori_loop" not in source and "scan(" not in source


def test_batched_padded_search_equals_single_rows(hf, utterance: np.ndarray) -> None:
    """Two utterances of different lengths padded into one batch, with prompts of different
    lengths (prompt_len): each row decodes as it does alone."""
    _, ours = hf
    c = ours.config
    feats = [s2t_features.features(utterance[:12000]), s2t_features.features(utterance[:20000])]
    lengths = np.array([f.shape[0] for f in feats], np.int32)
    batch = np.stack([np.pad(f, ((0, 256 - f.shape[0]), (0, 0))) for f in feats])
    prompts = [[START], [START, 7, 30]]
    prompt = np.full((2, 3), PAD, np.int32)
    for i, p in enumerate(prompts):
        prompt[i, : len(p)] = p
    dec = speech2text.decoder(c, MAX_NEW + 1)
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW - 2, renormalize=False)  # prompt width 3

    def run(f: np.ndarray, n: np.ndarray, pr: np.ndarray, pl: np.ndarray):
        hidden, mask = speech2text.encode(ours.params, c, jnp.asarray(f), jnp.asarray(n))
        cross = speech2text.cross_kv(ours.params, c, hidden, mask)
        return decoding.greedy_search(dec, ours.params, cross, jnp.asarray(pr),
                                      prompt_len=jnp.asarray(pl), **kw)

    both = run(batch, lengths, prompt, np.array([1, 3]))
    for i, p in enumerate(prompts):
        alone = run(feats[i][None], lengths[i:i + 1], np.asarray([p], np.int32),
                    np.array([len(p)]))
        np.testing.assert_array_equal(np.asarray(both.tokens[i]), np.asarray(alone.tokens[0]))
        np.testing.assert_allclose(float(both.sum_logprobs[i]), float(alone.sum_logprobs[0]),
                                   atol=1e-4)
