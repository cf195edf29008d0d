"""Audio files and resampling: everything the recognizers see is 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16_000


class AudioError(Exception):
    """An audio file or buffer that cannot be used; the message says why."""


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[N] or [N, C] -> [N] float32, channels averaged."""
    samples = np.asarray(samples, dtype=np.float32)
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def resample(samples: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resamples mono float32 audio with soxr (high quality)."""
    if sample_rate == target_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    return soxr.resample(samples, sample_rate, target_rate, quality="HQ").astype(np.float32)


def audio_length(path: str | Path) -> int | None:
    """The number of samples `read_audio(path)` returns, from the file's header alone
    (soxr gives round-half-up of n x 16000 / rate); None when libsndfile cannot tell."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError):
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    if info.samplerate == SAMPLE_RATE:
        return int(info.frames)
    return (2 * info.frames * SAMPLE_RATE + info.samplerate) // (2 * info.samplerate)


def read_audio(path: str | Path) -> np.ndarray:
    """Reads WAV/FLAC/OGG (anything libsndfile reads) at any rate and channel count and
    returns 16 kHz mono float32 in [-1, 1]."""
    path = Path(path)
    try:
        samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"cannot read audio file {path}: {exc}") from exc
    samples = to_mono(samples)
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"audio file {path} holds NaN or infinite samples")
    return resample(samples, sample_rate)
