"""CTC forced alignment: the best path (Viterbi) of a given labelling, as token spans;
beam search uses it for word timestamps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.ctc.spans import TokenSpans, extend_spans

_NEG_INF = -np.inf


def align(log_probs: np.ndarray, tokens: Sequence[int], blank_id: int) -> TokenSpans:
    """Best CTC path (Viterbi) for the labelling `tokens` over log-probs `[T, V]`, as token
    spans with their frames' summed probabilities. Used for beam-search timestamps."""
    return align_batch([log_probs], [tokens], blank_id)[0]


def align_batch(
    log_probs: Sequence[np.ndarray], labellings: Sequence[Sequence[int]], blank_id: int
) -> list[TokenSpans]:
    """`align` for B streams: log-probs `[T_b, V]` and a labelling per stream."""
    out: list[TokenSpans] = []
    rest: list[int] = []  # streams that need the Viterbi search
    for b, (lp, tokens) in enumerate(zip(log_probs, labellings, strict=True)):
        # The argmax path is the best of all paths; when it spells the labelling (the
        # usual case on peaky CTC output) it is that labelling's best path.
        lp = np.asarray(lp, dtype=np.float64)
        path = lp.argmax(axis=-1)
        probs = np.exp(lp[np.arange(len(lp)), path])
        out.append(extend_spans(TokenSpans(), path, probs, 0, -1, blank_id))
        if out[b].tokens != tuple(tokens):
            rest.append(b)
    if rest:
        found = _viterbi_batch(
            [log_probs[b] for b in rest], [labellings[b] for b in rest], blank_id
        )
        for b, spans in zip(rest, found, strict=True):
            out[b] = spans
    return out


def _viterbi_batch(
    log_probs: Sequence[np.ndarray], labellings: Sequence[Sequence[int]], blank_id: int
) -> list[TokenSpans]:
    """Best paths padded to `[B, max T, max S]`: each frame is one vectorized update for
    all streams."""
    lengths = [len(lp) for lp in log_probs]
    labels = [np.full(2 * len(tok) + 1, blank_id, dtype=np.int64) for tok in labellings]
    for lab, tok in zip(labels, labellings, strict=True):
        lab[1::2] = np.asarray(tok, dtype=np.int64)
    batch, steps, n = len(labels), max(lengths, default=0), max(map(len, labels), default=1)
    if steps == 0:
        return [TokenSpans() for _ in labels]
    emit = np.full((steps, batch, n), _NEG_INF)  # padded states and frames never win
    # A state comes from itself, the state before, or (skipping a blank) two before when
    # that blank separates different tokens.
    skip_penalty = np.full((batch, n), _NEG_INF)
    for b, (lp, lab) in enumerate(zip(log_probs, labels, strict=True)):
        emit[: lengths[b], b, : lab.size] = np.asarray(lp, dtype=np.float64)[:, lab]
        skip_penalty[b, 3 : lab.size : 2] = np.where(lab[3::2] != lab[1:-2:2], 0.0, _NEG_INF)
    from1 = np.zeros((steps, batch, n), dtype=bool)  # best predecessor is s - 1
    from2 = np.zeros((steps, batch, n), dtype=bool)  # best predecessor is s - 2
    score = np.full((batch, n), _NEG_INF)
    score[:, :2] = emit[0, :, :2]
    shifted = np.full((batch, n + 2), _NEG_INF)  # shifted[:, 2 + s] = score[:, s]
    best, two_back = np.empty((batch, n)), np.empty((batch, n))
    active = np.asarray(lengths)[None, :, None] > np.arange(steps)[:, None, None]  # [T, B, 1]
    shortest = min(lengths)
    for t in range(1, steps):
        shifted[:, 2:] = score
        np.add(shifted[:, :-2], skip_penalty, out=two_back)
        np.greater(shifted[:, 1:-1], score, out=from1[t])
        np.maximum(score, shifted[:, 1:-1], out=best)
        np.greater(two_back, best, out=from2[t])
        np.maximum(best, two_back, out=best)
        best += emit[t]
        if t < shortest:
            score, best = best, score
        else:
            np.copyto(score, best, where=active[t])  # finished streams keep their score
    # Paths end in the last token or the blank after it; walk back from there.
    sizes = np.array([lab.size for lab in labels])
    rows = np.arange(batch)
    last_two = np.stack([score[rows, sizes - 1], score[rows, np.maximum(sizes - 2, 0)]])
    end = np.where((sizes == 1) | (last_two[0] >= last_two[1]), sizes - 1, sizes - 2)
    final = score[rows, end]
    states = np.zeros((steps, batch), dtype=np.int64)
    for t in range(steps - 1, -1, -1):
        walking = active[t, :, 0]
        states[t] = end
        step = np.where(from2[t, rows, end], 2, np.where(from1[t, rows, end], 1, 0))
        end = np.where(walking, end - step, end)
    out = []
    for b, lab in enumerate(labels):
        if lengths[b] == 0:
            out.append(TokenSpans())
            continue
        if final[b] == _NEG_INF:
            raise ValueError(f"{lab.size // 2} tokens cannot be aligned to {lengths[b]} frames")
        path = lab[states[: lengths[b], b]]
        probs = np.exp(np.asarray(log_probs[b], dtype=np.float64)[np.arange(lengths[b]), path])
        out.append(extend_spans(TokenSpans(), path, probs, 0, -1, blank_id))
    return out
