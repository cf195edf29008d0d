"""Whisper decoding on top of the generic search engine (models/decoding.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from models import whisper


@dataclasses.dataclass(frozen=True)
class WhisperDecoder:
    """`IncrementalDecoder` for models/whisper.py: a cache of `max_len` tokens."""

    config: whisper.WhisperConfig
    max_len: int

    def init_cache(self, batch: int) -> whisper.DecoderCache:
        return whisper.init_cache(self.config, batch, self.max_len)

    def step(
        self, params: Any, cache: Any, cross: Any, tokens: jax.Array, num_valid: jax.Array
    ) -> tuple[jax.Array, Any]:
        return whisper.decode(params, self.config, cache, cross, tokens, num_valid)
