"""Streaming wav2vec2 / conformer: streamed logits against offline logits (which the other
test files check against transformers), compile counts and state batching."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

from test_wav2vec2 import TINY, batch_audio, save_tiny  # noqa: E402
from test_wav2vec2_conformer import CONFORMER  # noqa: E402

from models import wav2vec2  # noqa: E402
from models.wav2vec2 import StreamConfig  # noqa: E402
from models.wav2vec2.frontend import stream_features  # noqa: E402

MODELS = {
    "w2v_large": (transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Config,
                  dict(TINY, feat_extract_norm="layer", do_stable_layer_norm=True)),
    "w2v_base": (transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Config,
                 dict(TINY, feat_extract_norm="group", do_stable_layer_norm=False)),
    "w2v_adapter": (transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Config,
                    dict(TINY, feat_extract_norm="layer", do_stable_layer_norm=True,
                         add_adapter=True, output_hidden_size=24, num_adapter_layers=2)),
    "conformer_rotary": (transformers.Wav2Vec2ConformerForCTC,
                         transformers.Wav2Vec2ConformerConfig,
                         dict(CONFORMER, feat_extract_norm="layer",
                              position_embeddings_type="rotary")),
    "conformer_relative": (transformers.Wav2Vec2ConformerForCTC,
                           transformers.Wav2Vec2ConformerConfig,
                           dict(CONFORMER, feat_extract_norm="layer",
                                position_embeddings_type="relative")),
    "conformer_none": (transformers.Wav2Vec2ConformerForCTC,
                       transformers.Wav2Vec2ConformerConfig,
                       dict(CONFORMER, feat_extract_norm="layer", position_embeddings_type=None)),
}
EXACT = ("w2v_large", "w2v_adapter", "conformer_rotary", "conformer_relative",
         "conformer_none")
CHUNKS = {"w2v_large": (1, 4, 16), "w2v_adapter": (4, 8)}  # adapter: multiples of 2^2


@pytest.fixture(scope="session")
def loaded(tmp_path_factory):
    """name -> (config, params), from tiny random transformers models saved to disk."""
    out = {}
    for i, (name, (model_cls, config_cls, kwargs)) in enumerate(MODELS.items()):
        folder = tmp_path_factory.mktemp(name)
        save_tiny(folder, model_cls, config_cls(**kwargs), seed=10 + i)
        config, params, _ = wav2vec2.load(folder)
        out[name] = (config, params)
    return out


def run_stream(params, config, stream: StreamConfig, audio: np.ndarray,
               lengths) -> list[np.ndarray]:
    """Feeds audio [B, N] chunk by chunk (rows end at `lengths`), flushes, and returns each
    row's emitted logits [T_i, V] (frames whose mask is set, in order)."""
    b = audio.shape[0]
    n = stream.chunk_frames * config.total_stride
    lengths = np.asarray(lengths)
    state = wav2vec2.init_state(config, b, stream)
    outs: list[list[np.ndarray]] = [[] for _ in range(b)]
    pos = 0
    while True:
        chunk = np.zeros((b, n), np.float32)
        part = audio[:, pos:pos + n]
        chunk[:, : part.shape[1]] = part
        valid = np.clip(lengths - pos, 0, n).astype(np.int32)
        out, state = wav2vec2.encode_chunk(params, state, jnp.asarray(chunk), jnp.asarray(valid))
        logits, mask = np.asarray(out.logits), np.asarray(out.mask)
        for i in range(b):
            outs[i].append(logits[i][mask[i]])
        pos += n
        if (valid < n).all() and (wav2vec2.pending_chunks(state) == 0).all():
            return [np.concatenate(o, 0) for o in outs]


def offline(params, config, audio: np.ndarray) -> np.ndarray:
    return np.asarray(wav2vec2.forward(params, config, audio[None], None))[0]


@pytest.mark.parametrize("name", EXACT)
def test_stream_equals_offline_with_full_context(loaded, name):
    """Left context and look-ahead cover the utterance: every chunk size gives offline logits."""
    config, params = loaded[name]
    audio, _ = batch_audio((15_000,), seed=21)
    ref = offline(params, config, audio[0])
    assert ref.shape[0] == (12 if config.add_adapter else 46)
    for chunk_frames in CHUNKS.get(name, (3, 16)):
        stream = StreamConfig(chunk_frames=chunk_frames, left_frames=48, right_frames=48)
        got = run_stream(params, config, stream, audio, [15_000])[0]
        assert got.shape == ref.shape, chunk_frames
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"chunk {chunk_frames}")


def test_feature_extractor_stream_is_exact(loaded):
    """The conv front end alone is exact for any frame-aligned chunking (layer-norm layout)."""
    config, params = loaded["w2v_large"]
    audio, _ = batch_audio((9_600,), seed=22)
    ref = np.asarray(wav2vec2.features(params, config, jnp.asarray(audio)))[0]
    step_fn = jax.jit(stream_features, static_argnums=1)
    for chunk_frames in (1, 3, 7):
        n = chunk_frames * config.total_stride
        state = wav2vec2.init_state(config, 1, StreamConfig(chunk_frames, 4, 4)).features
        got = []
        for step in range(-(-audio.shape[1] // n) + 1):
            chunk = np.zeros((1, n), np.float32)
            part = audio[:, step * n:(step + 1) * n]
            chunk[:, : part.shape[1]] = part
            feats, state = step_fn(
                params, config, state, jnp.asarray(chunk), jnp.array([step]),
                jnp.array([audio.shape[1]]))
            got.append(np.asarray(feats)[0])
        got = np.concatenate(got)[config.fe_delay_frames:][: ref.shape[0]]
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bounded_context_divergence(loaded, name, shared_manifest):
    """Bounded left context and look-ahead (and group norm's running statistics) are
    approximations: measure how far streamed logits are from offline on real speech."""
    config, params = loaded[name]
    entry = next(e for e in shared_manifest if 3.0 <= e["duration_s"] <= 6.0)
    audio, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16_000
    audio = (audio - audio.mean()) / (audio.std() + 1e-7)  # as the HF feature extractor does
    ref = offline(params, config, audio)
    streams = [StreamConfig(16, 32, 4), StreamConfig(16, 256, 64)]
    if name not in EXACT:  # full context: what is left is group norm's running statistics
        streams.append(StreamConfig(16, 192, 192))
    rows = []
    for stream in streams:
        got = run_stream(params, config, stream, audio[None], [len(audio)])[0]
        assert got.shape == ref.shape
        diff = np.abs(got - ref)
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        rows.append((stream, float(diff.max()), float(diff.mean()), agree))
        assert np.isfinite(got).all()
        assert diff.max() < 20 * ref.std(), (stream, diff.max())
    print(f"\n{name}: {len(ref)} frames of {entry['audio']}, offline logit std {ref.std():.3f}")
    for stream, worst, mean, agree in rows:
        print(f"  chunk {stream.chunk_frames} left {stream.left_frames} right "
              f"{stream.right_frames}: max |diff| {worst:.4f} mean {mean:.4f} "
              f"argmax agreement {agree:.3f}")
    if name in EXACT:  # only the context bound differs here: more context, closer
        assert rows[-1][2] < rows[0][2]


def test_batched_streams_equal_single_streams(loaded):
    """Three streams of different lengths in one batch give each stream's own logits."""
    config, params = loaded["conformer_relative"]
    lengths = (12_000, 7_040, 15_999)
    audio, _ = batch_audio(lengths, seed=23)
    stream = StreamConfig(chunk_frames=4, left_frames=16, right_frames=4)
    batched = run_stream(params, config, stream, audio, lengths)
    for i, n in enumerate(lengths):
        single = run_stream(params, config, stream, audio[i:i + 1, :n], [n])[0]
        assert batched[i].shape == single.shape == (int(wav2vec2.num_frames(config, n)), 12)
        np.testing.assert_allclose(batched[i], single, atol=1e-5, rtol=0)


def test_one_compile_per_chunk_and_batch(loaded):
    config, params = loaded["w2v_large"]
    stream = StreamConfig(chunk_frames=5, left_frames=10, right_frames=3)  # unique shapes
    before = wav2vec2.encode_chunk._cache_size()
    for batch in (1, 2):
        state = wav2vec2.init_state(config, batch, stream)
        for step in range(6):
            chunk = jnp.full((batch, 5 * 320), 0.01 * step, jnp.float32)
            valid = jnp.full((batch,), 5 * 320 if step < 4 else 100, jnp.int32)
            _, state = wav2vec2.encode_chunk(params, state, chunk, valid)
        assert wav2vec2.encode_chunk._cache_size() == before + batch


def test_stack_unstack_round_trip(loaded):
    config, params = loaded["conformer_rotary"]
    stream = StreamConfig(chunk_frames=4, left_frames=8, right_frames=2)
    states = []
    for seed in range(3):  # streams at different points: 1, 2 and 3 chunks in
        state = wav2vec2.init_state(config, 1, stream)
        for _ in range(seed + 1):
            chunk = jnp.asarray(batch_audio((4 * 320,), seed=seed)[0])
            _, state = wav2vec2.encode_chunk(params, state, chunk, jnp.array([4 * 320]))
        states.append(state)
    copies = [jax.tree.map(np.asarray, s) for s in states]
    stacked = wav2vec2.stack_states(states)
    assert stacked.layers[0].k.shape == (3, 8, 4, 8)
    assert stacked.layers[0].conv_tail.shape == (3, 3, 32)
    assert np.asarray(stacked.step).tolist() == [1, 2, 3]
    for original, back in zip(copies, wav2vec2.unstack_state(stacked), strict=True):
        assert jax.tree.structure(original) == jax.tree.structure(back)
        for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(back), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_reset_slot_starts_a_new_segment(loaded):
    """A slot reset mid-stream behaves as a fresh stream; the other slot is untouched."""
    config, params = loaded["conformer_none"]
    stream = StreamConfig(chunk_frames=4, left_frames=8, right_frames=2)
    n = 4 * 320
    audio, _ = batch_audio((6 * n, 6 * n), seed=31)
    state = wav2vec2.init_state(config, 2, stream)
    fresh = wav2vec2.init_state(config, 1, stream)
    solo = wav2vec2.init_state(config, 1, stream)  # slot 0 on its own, never reset
    full = jnp.full((2,), n, jnp.int32)
    outs = []
    for step in range(6):
        if step == 3:
            state = wav2vec2.reset_slots(state, jnp.array([False, True]))
        chunk = jnp.asarray(audio[:, step * n:(step + 1) * n])
        out, state = wav2vec2.encode_chunk(params, state, chunk, full)
        outs.append(np.asarray(out.logits))
        ref0, solo = wav2vec2.encode_chunk(params, solo, chunk[:1], full[:1])
        np.testing.assert_allclose(outs[-1][0], np.asarray(ref0.logits)[0], atol=1e-5)
        if step >= 3:  # slot 1 restarted at step 3: compare with a fresh stream
            ref, fresh = wav2vec2.encode_chunk(params, fresh, chunk[1:], full[1:])
            np.testing.assert_allclose(outs[-1][1], np.asarray(ref.logits)[0], atol=1e-5)
    assert np.asarray(state.step).tolist() == [6, 3]


@pytest.mark.slow
def test_running_normalization(loaded, shared_manifest):
    """`normalize=True` streams raw-level audio close to offline on utterance-normalized
    audio (what the HF feature extractor feeds), unlike streaming the raw audio as is."""
    config, params = loaded["w2v_large"]
    entry = next(e for e in shared_manifest if 3.0 <= e["duration_s"] <= 6.0)
    raw, _ = sf.read(entry["path"], dtype="float32")
    ref = offline(params, config, (raw - raw.mean()) / np.sqrt(raw.var() + 1e-7))
    full = dict(chunk_frames=16, left_frames=192, right_frames=192)
    diffs = {}
    for normalize in (True, False):
        stream = StreamConfig(**full, normalize=normalize)
        got = run_stream(params, config, stream, raw[None], [len(raw)])[0]
        diffs[normalize] = float(np.abs(got - ref).mean())
    print(f"\nmean |diff| with running normalization {diffs[True]:.4f}, raw {diffs[False]:.4f}")
    assert diffs[True] < diffs[False]


def test_prepared_params_give_the_same_logits(loaded):
    config, params = loaded["conformer_relative"]
    stream = StreamConfig(chunk_frames=4, left_frames=12, right_frames=3)
    prepared = wav2vec2.prepare_stream(params, config, stream)
    assert prepared["layers"][0]["pos"]["table"].shape == (12 + 2 * 7 - 1, 4, 8)
    audio, _ = batch_audio((9_000,), seed=41)
    plain = run_stream(params, config, stream, audio, [9_000])[0]
    fast = run_stream(prepared, config, stream, audio, [9_000])[0]
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)
    w2v_config, w2v_params = loaded["w2v_large"]
    assert wav2vec2.prepare_stream(w2v_params, w2v_config, stream) is w2v_params


@pytest.mark.slow
def test_group_norm_statistics_carried_across_segments(loaded, shared_manifest):
    """Base layout: a second segment that keeps the running group-norm statistics of the
    first (`keep_statistics=True`) is closer to offline than a cold start."""
    config, params = loaded["w2v_base"]
    entry = next(e for e in shared_manifest if 3.0 <= e["duration_s"] <= 6.0)
    audio, _ = sf.read(entry["path"], dtype="float32")
    audio = (audio - audio.mean()) / (audio.std() + 1e-7)
    ref = offline(params, config, audio)
    stream = StreamConfig(16, 192, 192)
    n = 16 * 320
    diffs = {}
    for keep in (False, True):
        state = wav2vec2.init_state(config, 1, stream)
        for segment in range(2):
            if segment:
                state = wav2vec2.reset_slots(state, jnp.array([True]), keep_statistics=keep)
            got = []
            for step in range(-(-len(audio) // n) + 20):  # 20 > look-ahead: drained
                part = audio[step * n:(step + 1) * n]
                chunk = np.zeros((1, n), np.float32)
                chunk[0, : len(part)] = part
                out, state = wav2vec2.encode_chunk(params, state, jnp.asarray(chunk),
                                                   jnp.array([len(part)], jnp.int32))
                got.append(np.asarray(out.logits)[0][np.asarray(out.mask)[0]])
        got = np.concatenate(got)
        assert got.shape == ref.shape
        diffs[keep] = float(np.abs(got - ref).mean())
    print(f"\nsecond segment mean |diff|: cold start {diffs[False]:.4f}, "
          f"kept statistics {diffs[True]:.4f}")
    assert diffs[True] < diffs[False]
