"""Whisper's log-mel front end in JAX.

16 kHz audio -> STFT (n_fft 400, periodic Hann, hop 160, centred with reflect padding)
-> power -> Slaney mel filterbank -> log10 (floor 1e-10) -> clamp to (max - 8) per
example -> (x + 4) / 4. Matches transformers' `WhisperFeatureExtractor` (and openai's
`log_mel_spectrogram`): `N` samples give `N // 160` frames (the STFT's last frame is
dropped, as Whisper does).
"""

from __future__ import annotations

import functools
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s window: 480000 samples -> 3000 frames


def _hz_to_mel(hz: float | np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


@functools.cache
def mel_filters(n_mels: int = 80) -> np.ndarray:
    """Slaney-normalised triangular filters as used by Whisper: float32 [n_fft//2+1, n_mels].

    Same construction as librosa's `filters.mel(sr=16000, n_fft=400, n_mels=...)`,
    computed in float64 and cast once.
    """
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    widths = np.diff(edges_hz)  # [n_mels + 1]
    offsets = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, n_freq]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    tri = np.maximum(0.0, np.minimum(rising, falling))  # [n_mels, n_freq]
    # Slaney "area" normalisation: each filter has unit area in Hz.
    tri *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return np.ascontiguousarray(tri.T).astype(np.float32)


@functools.cache
def _frame_plan(n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices [n_frames, N_FFT] into the reflect-padded signal, and the window."""
    n_frames = n_samples // HOP_LENGTH  # 1 + N // hop STFT frames, minus Whisper's dropped last
    starts = np.arange(n_frames) * HOP_LENGTH
    idx = (starts[:, None] + np.arange(N_FFT)[None, :]).astype(np.int32)
    n = np.arange(N_FFT)
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)  # periodic Hann
    return idx, window


def log_mel(audio: jax.Array, n_mels: int = 80) -> jax.Array:
    """Whisper log-mel features.

    audio: float32 [B, N] at 16 kHz (N static; N > 200 for the reflect padding).
    Returns float32 [B, n_mels, N // 160]. The (max - 8) clamp is per example over all of
    its frames, so zero-padding (e.g. to 30 s with `pad_or_trim`) changes the result
    exactly as it does in Whisper. Jit-friendly: shapes depend only on N and n_mels.
    """
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim != 2:
        raise ValueError(f"log_mel expects audio [B, N], got shape {audio.shape}")
    idx, window = _frame_plan(audio.shape[1])
    pad = N_FFT // 2
    padded = jnp.pad(audio, ((0, 0), (pad, pad)), mode="reflect")  # torch.stft(center=True)
    frames = padded[:, idx] * window  # [B, F, N_FFT]
    spec = jnp.fft.rfft(frames, axis=-1)  # [B, F, N_FFT // 2 + 1]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    mel = power @ jnp.asarray(mel_filters(n_mels))  # [B, F, n_mels]
    logs = jnp.log10(jnp.maximum(mel, 1e-10))
    logs = jnp.maximum(logs, jnp.max(logs, axis=(1, 2), keepdims=True) - 8.0)
    return jnp.swapaxes((logs + 4.0) / 4.0, 1, 2)


@overload
def pad_or_trim(audio: np.ndarray, n_samples: int = CHUNK_SAMPLES) -> np.ndarray: ...
@overload
def pad_or_trim(audio: jax.Array, n_samples: int = CHUNK_SAMPLES) -> jax.Array: ...
def pad_or_trim(audio: jax.Array | np.ndarray,
                n_samples: int = CHUNK_SAMPLES) -> jax.Array | np.ndarray:
    """Zero-pad or cut the last axis to exactly `n_samples` (Whisper pads with silence).

    Works on numpy (returns numpy, no device work) and jax arrays (returns jax).
    """
    xp = np if isinstance(audio, np.ndarray) else jnp
    length = audio.shape[-1]
    if length >= n_samples:
        return audio[..., :n_samples]
    widths = [(0, 0)] * (audio.ndim - 1) + [(0, n_samples - length)]
    return xp.pad(audio, widths)
