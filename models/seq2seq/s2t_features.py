"""Speech2Text front end: Kaldi log-mel filterbank in float64 numpy + utterance CMVN.

Matches transformers' `Speech2TextFeatureExtractor`: 25 ms Povey windows every 10 ms
(snip edges), DC offset removed, pre-emphasis 0.97, 512-point power spectrum, Kaldi mel
bins from 20 Hz to Nyquist (weights from kaldi-native-fbank), natural log with a
float32-epsilon floor, no dither; the waveform is scaled to the 16-bit integer range first,
as Kaldi expects. Each utterance is then normalized to zero mean and unit variance per bin.

Why not kaldi-native-fbank's `OnlineFbank` (same options): it computes in float32, and
in some frames of the LJ Speech files mel bins 0-2 (< ~100 Hz) hold 110-127 dB less energy
than the whole frame, near the float32 rounding noise of the frame (eps^2, ~140 dB down).
Measured after CMVN against transformers' float64 path on the shared audio: knf up to
1.0e-2 (LJ001-0030); a numpy copy of that path with only the FFT in float32 up to 6.8e-3,
with only DC removal / pre-emphasis / window in float32 up to 6.3e-3, all in float64 0
(bit-exact). The options are not the cause: knf's mel weights differ from transformers' by
<= 3.4e-4 relative (float32 storage; <= 1e-4 on the features), its window by 3e-8. So
framing, the FFT and the mel product run in float64 here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import kaldi_native_fbank as knf
import numpy as np

SAMPLE_RATE = 16000
FRAME_LEN = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_LEN = 512  # Kaldi rounds the frame up to a power of two
PREEMPHASIS = 0.97
LOG_FLOOR = float(np.finfo(np.float32).eps)  # Kaldi's energy floor before the log


@dataclasses.dataclass(frozen=True)
class FrontEndConfig:
    """Options of the feature extractor (`preprocessor_config.json`)."""

    num_mel_bins: int = 80
    sampling_rate: int = SAMPLE_RATE
    normalize_means: bool = True
    normalize_vars: bool = True
    do_cmvn: bool = True

    def __post_init__(self) -> None:
        if self.sampling_rate != SAMPLE_RATE:  # fail at load, not at the first utterance
            raise ValueError(f"the 400/160-sample framing here is for {SAMPLE_RATE} Hz audio")

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> FrontEndConfig:
        if d.get("dither", 0.0):
            raise ValueError("a dithering front end is not deterministic; expected dither 0")
        return cls(
            num_mel_bins=d.get("num_mel_bins", 80),
            sampling_rate=d.get("sampling_rate", SAMPLE_RATE),
            normalize_means=d.get("normalize_means", True),
            normalize_vars=d.get("normalize_vars", True),
            do_cmvn=d.get("do_ceptral_normalize", True),
        )


def num_frames(num_samples: int) -> int:
    """Frames of a 25 ms / 10 ms filterbank with snipped edges."""
    return 1 + (num_samples - FRAME_LEN) // FRAME_SHIFT if num_samples >= FRAME_LEN else 0


@functools.cache
def _mel_weights(num_mel_bins: int, sampling_rate: int) -> np.ndarray:
    """Kaldi's triangular mel filters float64 [FFT_LEN // 2 + 1, mels]."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sampling_rate
    opts.mel_opts.num_bins = num_mel_bins
    banks = knf.MelBanks(opts.mel_opts, opts.frame_opts, 1.0)  # 1.0: no VTLN warp
    return np.asarray(banks.get_matrix(), np.float64).T


@functools.cache
def _povey_window() -> np.ndarray:
    """Kaldi's Povey window: the symmetric Hann window to the power 0.85, float64 [400]."""
    return np.hanning(FRAME_LEN) ** 0.85


def fbank(audio: np.ndarray, config: FrontEndConfig = FrontEndConfig()) -> np.ndarray:
    """audio float [N] in [-1, 1] at `config.sampling_rate` -> log-mel float32 [T, mels]."""
    n = num_frames(len(audio))
    if n == 0:
        return np.zeros((0, config.num_mel_bins), np.float32)
    # float32 first, as transformers does with any input; then Kaldi's 16-bit scale in float64.
    wave = np.asarray(audio, np.float32).astype(np.float64) * 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(wave, FRAME_LEN)[::FRAME_SHIFT][:n]
    frames = frames - frames.mean(axis=1, keepdims=True)  # a copy: the view is read-only
    frames[:, 1:] -= PREEMPHASIS * frames[:, :-1]  # the right side is evaluated first
    frames[:, 0] *= 1.0 - PREEMPHASIS
    frames *= _povey_window()
    power = np.abs(np.fft.rfft(frames, FFT_LEN, axis=1)) ** 2
    mel = power @ _mel_weights(config.num_mel_bins, config.sampling_rate)
    return np.log(np.maximum(mel, LOG_FLOOR)).astype(np.float32)


def utterance_cmvn(feats: np.ndarray, means: bool = True, variances: bool = True) -> np.ndarray:
    """Per-bin mean/variance normalization over the utterance's frames [T, mels]."""
    x = feats.astype(np.float32)
    if means:
        x = x - x.mean(axis=0)
    if variances:
        x = x / x.std(axis=0)
    return x.astype(np.float32)


def features(audio: np.ndarray, config: FrontEndConfig = FrontEndConfig()) -> np.ndarray:
    """audio float [N] at 16 kHz -> normalized filterbank float32 [T, mels]."""
    feats = fbank(audio, config)
    if config.do_cmvn:
        feats = utterance_cmvn(feats, config.normalize_means, config.normalize_vars)
    return feats
