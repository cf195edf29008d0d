"""Speech2Text front end: Kaldi log-mel filterbank (kaldi-native-fbank) + utterance CMVN.

Matches transformers' `Speech2TextFeatureExtractor`: 25 ms Povey windows every 10 ms
(snip edges), pre-emphasis 0.97, DC offset removed, power spectrum, Kaldi mel bins from
20 Hz to Nyquist, natural log with float32-epsilon floor, no dither; the waveform is
scaled to the 16-bit integer range first, as Kaldi expects. Each utterance is then
normalized to zero mean and unit variance per bin over its frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import kaldi_native_fbank as knf
import numpy as np

SAMPLE_RATE = 16000


@dataclasses.dataclass(frozen=True)
class FrontEndConfig:
    """Options of the feature extractor (`preprocessor_config.json`)."""

    num_mel_bins: int = 80
    sampling_rate: int = SAMPLE_RATE
    normalize_means: bool = True
    normalize_vars: bool = True
    do_cmvn: bool = True

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
    return max(0, 1 + (num_samples - 400) // 160) if num_samples >= 400 else 0


def fbank(audio: np.ndarray, config: FrontEndConfig = FrontEndConfig()) -> np.ndarray:
    """audio float [N] in [-1, 1] at `config.sampling_rate` -> log-mel float32 [T, mels]."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = config.sampling_rate
    opts.frame_opts.dither = 0.0  # deterministic, as transformers' default
    opts.mel_opts.num_bins = config.num_mel_bins
    computer = knf.OnlineFbank(opts)
    # Kaldi works on the 16-bit integer scale; the log makes this an additive offset that
    # the mean normalization would cancel, but variance-only setups would not.
    computer.accept_waveform(config.sampling_rate, (np.asarray(audio, np.float32) * 32768.0))
    computer.input_finished()
    n = computer.num_frames_ready
    if n == 0:
        return np.zeros((0, config.num_mel_bins), np.float32)
    return np.stack([computer.get_frame(i) for i in range(n)]).astype(np.float32)


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
