"""models/whisper/transcriber.py's long-form loop: the previous-text prompt across 30 s windows.

The decoder is faked (the window's number as its text), so the test checks which prompt
each window gets: the initial prompt always, the text of the windows before it with
`context`, and nothing of a window decoded above temperature 0.5 (openai's reset).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from models.registry import resolve_model
from models.whisper.decoding import DecodeResult
from models.whisper.tokenizer import WhisperTokenizer
from models.whisper.transcriber import PROMPT_LIMIT, WhisperTranscriber

RATE = 16000


@pytest.fixture(scope="module")
def tokenizer() -> WhisperTokenizer:
    try:
        return WhisperTokenizer.from_file(resolve_model("tiny.en"))
    except Exception as exc:  # the embedded model package is missing
        pytest.skip(f"tiny.en tokenizer not available: {exc}")


def run(tokenizer, temperatures: list[float], **fields) -> list[tuple[int, ...]]:
    """Transcribes 70 s of faint noise (three windows); returns each window's prompt."""
    model = SimpleNamespace(config=SimpleNamespace(max_target_positions=448),
                            tokenizer=tokenizer, params=None)
    transcriber = WhisperTranscriber(model, timestamps=False, **fields)
    prompts: list[tuple[int, ...]] = []

    def decode(encoder_out, window_samples, previous=()):
        k = len(prompts)
        prompts.append(tuple(previous))
        ids = tokenizer.encode(f" window {k}.")
        return DecodeResult(ids, f" window {k}.", -0.2, 0.0, 1.0, temperatures[k], False)

    transcriber.encode = lambda audio, n=None: None
    transcriber._decode = decode
    audio = np.random.default_rng(0).normal(0, 1e-3, 70 * RATE).astype(np.float32)
    assert transcriber.transcribe(audio) == "window 0. window 1. window 2."
    return prompts


def test_windows_see_the_text_before_them_until_a_fallback(tokenizer) -> None:
    enc = tokenizer.encode
    prompts = run(tokenizer, [0.0, 0.8, 0.0], context=True, prompt="Kennedy")
    initial = tuple(enc(" Kennedy"))
    assert prompts == [initial, initial + tuple(enc(" window 0.")), initial]
    # Without context, only the initial prompt; with neither, no prompt (as before).
    assert run(tokenizer, [0.0] * 3, prompt="Kennedy") == [initial] * 3
    assert run(tokenizer, [0.0] * 3) == [()] * 3
    # The prompt is bounded: the initial prompt's last tokens, at most half the room.
    long = run(tokenizer, [0.0] * 3, prompt="ask not " * 200)[0]
    assert 0 < len(long) <= PROMPT_LIMIT // 2

