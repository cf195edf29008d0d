"""models/whisper/mel.py against transformers' WhisperFeatureExtractor on the shared recordings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
soundfile = pytest.importorskip("soundfile")

from models.whisper import mel  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def recordings(shared_manifest: list[dict]) -> list[np.ndarray]:
    """Two real utterances (JFK, one LibriSpeech), float32 mono at 16 kHz."""
    picks = [e for e in shared_manifest if e["audio"].startswith(("jfk_", "librispeech_61"))]
    assert len(picks) == 2, "expected the JFK and LibriSpeech 61-70968-0002 files"
    out = []
    for entry in picks:
        audio, rate = soundfile.read(entry["path"], dtype="float32")
        assert rate == mel.SAMPLE_RATE and audio.ndim == 1
        out.append(audio)
    return out


def _reference(audio: np.ndarray, n_mels: int, **kwargs) -> np.ndarray:
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(audio, sampling_rate=16000, return_tensors="np", **kwargs).input_features


def test_filterbank_matches_transformers() -> None:
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        ref = mel_filter_bank(
            num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
            max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney",
        )
        np.testing.assert_allclose(mel.mel_filters(n_mels), ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_padded_30s_matches_transformers(recordings, n_mels: int) -> None:
    batch = np.stack([mel.pad_or_trim(a) for a in recordings])  # zero-padded to 480000
    assert batch.shape == (2, mel.CHUNK_SAMPLES) and isinstance(batch, np.ndarray)
    ours = np.asarray(jax.jit(mel.log_mel, static_argnums=1)(jnp.asarray(batch), n_mels))
    assert ours.shape == (2, n_mels, 3000)
    for row, audio in enumerate(recordings):
        ref = _reference(audio, n_mels)[0]
        np.testing.assert_allclose(ours[row], ref, rtol=0, atol=ATOL)


def test_short_input_matches_transformers(recordings) -> None:
    """Unpadded audio: N samples give N // 160 frames, as Whisper's own front end."""
    audio = recordings[1][:37_123]  # not a multiple of the hop
    ref = _reference(audio, 80, padding="longest")
    ours = np.asarray(mel.log_mel(jnp.asarray(audio)[None]))
    assert ours.shape == ref.shape == (1, 80, 37_123 // 160)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


def test_pad_or_trim() -> None:
    audio = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(mel.pad_or_trim(audio, 4), audio[:4])
    padded = mel.pad_or_trim(jnp.asarray(audio)[None], 12)
    assert isinstance(padded, jax.Array) and padded.shape == (1, 12)
    np.testing.assert_array_equal(padded[0, 10:], 0.0)
