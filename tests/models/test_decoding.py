"""The generic search engine (models/decoding.py) on a tiny random Whisper, against
transformers' generic `GenerationMixin.generate` on the same PyTorch model.

The generic generate is the reference here, not `WhisperForConditionalGeneration.generate`
(which adds Whisper's own prompt and timestamp handling, tested in test_whisper_decoding):
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

from models import decoding, whisper  # noqa: E402
from models.whisper_decoding import WhisperDecoder  # noqa: E402

START, EOS = 61, 62
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
    params = whisper.params_from_hf(
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
    assert 0 < min(lengths) and max(lengths) == MAX_NEW  # rows end early and run to the cap
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


def test_beam_differs_from_greedy_and_hits_cap(tiny) -> None:
    """The cases above exercise what they should: wider beams change results, and a
    hypothesis cut at max_new_tokens can win (row 0 at 4 beams)."""
    _, config, params, _, cross = tiny
    kw = dict(eot=EOS, max_new_tokens=MAX_NEW, filters=FILTERS, renormalize=False)
    greedy = decoding.greedy_search(_decoder(config), params, cross, PROMPTS, **kw)
    four = decoding.beam_search(_decoder(config), params, cross, PROMPTS, beams=4, **kw)
    assert not np.array_equal(np.asarray(greedy.tokens), np.asarray(four.tokens))
    assert not bool(four.finished[0]) and int(four.lengths[0]) == MAX_NEW


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
