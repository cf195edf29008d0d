"""Greedy CTC decoding: `greedy_decode` for a whole utterance; `greedy_step` /
`greedy_result` for a stream fed chunk by chunk (the frame offset and the last frame's id
are carried, so the result equals decoding the concatenation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from models.ctc.spans import (
    FRAME_STRIDE_S,
    Hypothesis,
    TokenSpans,
    extend_spans,
    frame_lengths,
    log_softmax,
    word_timestamps,
)
from models.ctc.vocab import CTCVocab


@dataclasses.dataclass(frozen=True)
class GreedyState:
    """Greedy decoding of one stream so far. `frames`: frames consumed (the global index of
    the next chunk's first frame); `prev_id`: argmax of the last frame, so a token whose
    run crosses a chunk boundary is emitted once."""

    frames: int = 0
    prev_id: int = -1
    spans: TokenSpans = TokenSpans()
    log_prob: float | None = 0.0


def greedy_step(state: GreedyState, logits_or_ids: np.ndarray, vocab: CTCVocab) -> GreedyState:
    """Feed one chunk: logits (or log-probs) `[T, V]`, or frame ids `[T]`."""
    x = np.asarray(logits_or_ids)
    if x.ndim == 2:
        log_probs = log_softmax(x)
        path = log_probs.argmax(axis=-1)
        chosen = np.take_along_axis(log_probs, path[:, None], axis=-1)[:, 0]
        probs: np.ndarray | None = np.exp(chosen)
        log_prob = None if state.log_prob is None else state.log_prob + float(chosen.sum())
    elif x.ndim == 1:
        path, probs, log_prob = x.astype(np.int64), None, None
    else:
        raise ValueError(f"expected logits [T, V] or ids [T], got shape {x.shape}")
    spans = extend_spans(state.spans, path, probs, state.frames, state.prev_id, vocab.blank_id)
    prev_id = int(path[-1]) if path.size else state.prev_id
    return GreedyState(state.frames + int(path.size), prev_id, spans, log_prob)


def greedy_result(
    state: GreedyState,
    vocab: CTCVocab,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float = 0.0,
) -> Hypothesis:
    """The hypothesis for everything fed so far."""
    spans = state.spans
    return Hypothesis(
        text=vocab.decode(spans.tokens),
        tokens=spans.tokens,
        score=state.log_prob,
        words=word_timestamps(spans, vocab, frame_stride, time_offset),
    )


def greedy_decode(
    logits_or_ids: np.ndarray,
    vocab: CTCVocab,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float = 0.0,
) -> Hypothesis:
    """Best path: argmax per frame, collapse repeats, drop blanks. Input `[T, V]` or `[T]`."""
    state = greedy_step(GreedyState(), logits_or_ids, vocab)
    return greedy_result(state, vocab, frame_stride, time_offset)


def greedy_decode_batch(
    logits: np.ndarray,
    vocab: CTCVocab,
    lengths: Sequence[int] | np.ndarray | None = None,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float = 0.0,
) -> list[Hypothesis]:
    """`logits` [B, T, V] with valid frame counts `lengths` [B] (default all T)."""
    logits = np.asarray(logits)  # one host copy when handed a device array
    lengths = frame_lengths(logits, lengths)
    return [
        greedy_decode(logits[b, : lengths[b]], vocab, frame_stride, time_offset)
        for b in range(logits.shape[0])
    ]


def greedy_step_batch(
    states: Sequence[GreedyState],
    logits: np.ndarray,
    vocab: CTCVocab,
    lengths: Sequence[int] | np.ndarray | None = None,
) -> list[GreedyState]:
    """`greedy_step` for B streams sharing one chunk `[B, T, V]`; frames at or past
    `lengths[b]` are padding."""
    logits = np.asarray(logits)
    lengths = frame_lengths(logits, lengths)
    return [greedy_step(s, logits[b, : lengths[b]], vocab) for b, s in enumerate(states)]
