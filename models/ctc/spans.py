"""CTC results and word timestamps: `Hypothesis`, the token spans of a frame path, and
the words they make.

A token spans the frames of its run on a frame-level path (the argmax path for greedy,
the best alignment of the chosen labelling for beam search); a word starts at its first
token's first frame and ends after its last token's last frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.ctc.vocab import CTCVocab

FRAME_STRIDE_S = 0.02  # base wav2vec2 / conformer frames (320 samples); see config.frame_s


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One decoding result.

    `tokens`: collapsed, blank-free ids. `score`: log probability (greedy: of the best
    path; beam: of the labelling, summed over its paths); None when decoding bare ids.
    `words`: `[{"word", "start", "end", "confidence"}]`, times in seconds (empty when not
    computed); confidence is the mean probability of the word's token frames.
    """

    text: str
    tokens: tuple[int, ...]
    score: float | None = None
    words: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class TokenSpans:
    """Tokens of a frame path with their frame spans `[start, end)` and summed frame
    probabilities (None when the path came without probabilities)."""

    tokens: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    prob_sums: tuple[float, ...] | None = ()


def extend_spans(
    spans: TokenSpans,
    path: np.ndarray,
    probs: np.ndarray | None,
    first_frame: int,
    prev_id: int,
    blank_id: int,
) -> TokenSpans:
    """Add the runs of `path` [T] (frame ids; `probs` [T] the chosen ids' probabilities)
    to `spans`; a run that continues `prev_id` (the frame before) extends the last token."""
    if path.size == 0:
        return spans
    change = np.flatnonzero(np.diff(path)) + 1
    run_starts = np.concatenate([[0], change])
    run_ends = np.concatenate([change, [path.size]])
    sums = None if probs is None else np.add.reduceat(probs.astype(np.float64), run_starts)
    tokens, starts, ends = list(spans.tokens), list(spans.starts), list(spans.ends)
    prob_sums = None if spans.prob_sums is None or sums is None else list(spans.prob_sums)
    for r, (s, e) in enumerate(zip(run_starts, run_ends, strict=True)):
        token = int(path[s])
        if token == blank_id:
            continue
        if s == 0 and token == prev_id and tokens:  # run carried over from the last chunk
            ends[-1] = first_frame + int(e)
            if prob_sums is not None and sums is not None:  # prob_sums implies sums
                prob_sums[-1] += float(sums[r])
            continue
        tokens.append(token)
        starts.append(first_frame + int(s))
        ends.append(first_frame + int(e))
        if prob_sums is not None and sums is not None:
            prob_sums.append(float(sums[r]))
    return TokenSpans(
        tuple(tokens), tuple(starts), tuple(ends), None if prob_sums is None else tuple(prob_sums)
    )


def word_timestamps(
    spans: TokenSpans,
    vocab: CTCVocab,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float = 0.0,
) -> list[dict[str, Any]]:
    """Words between delimiter tokens: start = first frame of the first token, end = last
    frame of the last token + 1, in seconds (`frame * frame_stride + time_offset`)."""
    words: list[dict[str, Any]] = []
    group: list[int] = []  # indices into spans.tokens of the current word

    def flush() -> None:
        if not group:
            return
        text = "".join(vocab.token(spans.tokens[i]) for i in group)
        confidence = None
        if spans.prob_sums is not None:
            frames = sum(spans.ends[i] - spans.starts[i] for i in group)
            confidence = sum(spans.prob_sums[i] for i in group) / frames
        words.append(
            {
                "word": text.lower() if vocab.do_lower_case else text,
                "start": spans.starts[group[0]] * frame_stride + time_offset,
                "end": spans.ends[group[-1]] * frame_stride + time_offset,
                "confidence": confidence,
            }
        )
        group.clear()

    for i, token in enumerate(spans.tokens):
        if vocab.is_delimiter(token):
            flush()
        else:
            group.append(i)
    flush()
    return words


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def frame_lengths(x: np.ndarray, lengths: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if lengths is None:
        return np.full(x.shape[0], x.shape[1], dtype=np.int64)
    return np.asarray(lengths, dtype=np.int64)
