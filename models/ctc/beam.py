"""CTC prefix beam search: `prefix_beam_search` for a whole utterance; `beam_init` /
`beam_step` / `beam_results` carry the beam of a batch of streams from chunk to chunk.
Each frame is one vectorized update over streams, beams and the top tokens of the frame."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.ctc.alignment import align_batch
from models.ctc.spans import (
    FRAME_STRIDE_S,
    Hypothesis,
    frame_lengths,
    log_softmax,
    word_timestamps,
)
from models.ctc.vocab import CTCVocab

_NEG_INF = -np.inf
_HASH_MUL = np.uint64(0x100000001B3)  # FNV-style multiplier for prefix hashes (mod 2**64)
_HASH_EMPTY = np.uint64(0xCBF29CE484222325)


@dataclasses.dataclass(frozen=True)
class BeamState:
    """Prefix beams of B streams, K beams each, sorted best first.

    log_pb, log_pnb: [B, K] log probability of the prefix with its paths ending in blank /
        in its last token (-inf: empty slot).
    tokens: [B, K, L] prefix ids (capacity L grows), length: [B, K], last: [B, K] last id
        (-1 for the empty prefix).
    hash, parent: [B, K] uint64 hash of the prefix and of the prefix minus its last token;
        they find the extension p + c that equals a prefix already in the beam.
    frames: [B] frames consumed per stream.
    history: per chunk (log-probs [B, T, V] float32, lengths [B]); kept for word timestamps.
    """

    log_pb: np.ndarray
    log_pnb: np.ndarray
    tokens: np.ndarray
    length: np.ndarray
    last: np.ndarray
    hash: np.ndarray
    parent: np.ndarray
    frames: np.ndarray
    history: tuple[tuple[np.ndarray, np.ndarray], ...] | None = ()


def beam_init(batch: int, beam_width: int = 8, keep_history: bool = True) -> BeamState:
    """Empty prefixes for `batch` streams. Without history, results carry no words."""
    log_pb = np.full((batch, beam_width), _NEG_INF)
    log_pb[:, 0] = 0.0
    return BeamState(
        log_pb=log_pb,
        log_pnb=np.full((batch, beam_width), _NEG_INF),
        tokens=np.zeros((batch, beam_width, 16), dtype=np.int32),
        length=np.zeros((batch, beam_width), dtype=np.int32),
        last=np.full((batch, beam_width), -1, dtype=np.int32),
        hash=np.full((batch, beam_width), _HASH_EMPTY, dtype=np.uint64),
        parent=np.full((batch, beam_width), _HASH_EMPTY, dtype=np.uint64),
        frames=np.zeros(batch, dtype=np.int64),
        history=() if keep_history else None,
    )


def beam_reset(state: BeamState, rows: Sequence[int] | np.ndarray) -> BeamState:
    """Start new segments in streams `rows` (a slot freed and reused): empty prefix, frame
    count 0, their kept log-probs dropped."""
    rows = np.asarray(rows, dtype=np.int64)

    def reset(a: np.ndarray, value: Any) -> np.ndarray:
        a = a.copy()
        a[rows] = value
        return a

    empty = np.full(state.log_pb.shape[1], _NEG_INF)
    empty[0] = 0.0
    history = state.history
    if history is not None:  # chunks no live segment uses any more are dropped
        history = tuple((lp, reset(n, 0)) for lp, n in history)
        history = tuple((lp, n) for lp, n in history if n.any())
    return BeamState(
        log_pb=reset(state.log_pb, empty),
        log_pnb=reset(state.log_pnb, _NEG_INF),
        tokens=reset(state.tokens, 0),
        length=reset(state.length, 0),
        last=reset(state.last, -1),
        hash=reset(state.hash, _HASH_EMPTY),
        parent=reset(state.parent, _HASH_EMPTY),
        frames=reset(state.frames, 0),
        history=history,
    )


def beam_step(
    state: BeamState,
    logits: np.ndarray,
    vocab: CTCVocab,
    lengths: Sequence[int] | np.ndarray | None = None,
    token_min_logp: float | None = -10.0,
) -> BeamState:
    """Advance every stream by one chunk of logits (or log-probs) `[B, T, V]`; frames at
    or past `lengths[b]` are padding and leave stream b unchanged.

    Per frame each beam is extended by the top K+1 non-blank tokens of the frame (no other
    token can enter the top K, so this equals the unpruned search) that also reach
    `token_min_logp` (None: no threshold; a threshold trades exactness for fewer beams
    made of unlikely tokens).
    """
    log_probs = log_softmax(logits)
    batch, steps, vocab_size = log_probs.shape
    lengths = frame_lengths(log_probs, lengths)
    width = state.log_pb.shape[1]
    n_tok = min(vocab_size - 1, width + 1)
    fields: dict[str, Any] = {
        f.name: getattr(state, f.name)
        for f in dataclasses.fields(state)
        if f.name not in ("frames", "history")
    }
    for t in range(steps):
        active = t < lengths
        if not active.any():
            break
        new = _beam_frame(fields, log_probs[:, t], vocab.blank_id, n_tok, token_min_logp)
        if active.all():
            fields = new
            continue
        for k, v in new.items():
            mask = active.reshape((-1,) + (1,) * (v.ndim - 1))
            old = fields[k]
            if old.shape != v.shape:  # token capacity grew this frame
                old = _grow(old, v.shape[2])
            fields[k] = np.where(mask, v, old)
    fields["frames"] = state.frames + np.minimum(lengths, steps)
    if state.history is not None:
        fields["history"] = state.history + ((log_probs.astype(np.float32), lengths),)
    return BeamState(**fields)


def _grow(tokens: np.ndarray, capacity: int) -> np.ndarray:
    pad = np.zeros(tokens.shape[:2] + (capacity - tokens.shape[2],), dtype=tokens.dtype)
    return np.concatenate([tokens, pad], axis=2)


def _beam_frame(
    s: dict[str, Any], lp: np.ndarray, blank: int, n_tok: int, min_logp: float | None
) -> dict[str, np.ndarray]:
    """One frame for all streams: `lp` [B, V] log-probs; returns the new beam arrays."""
    pb, pnb, last = s["log_pb"], s["log_pnb"], s["last"]
    batch, width = pb.shape
    rows = np.arange(batch)[:, None]  # row index for gathers along the beam axis
    total = np.logaddexp(pb, pnb)
    valid = total > _NEG_INF
    lp_last = np.where(last >= 0, lp[rows, np.maximum(last, 0)], _NEG_INF)

    # Staying on a prefix: a blank after anything, or repeating its last token.
    stay_pb = total + lp[:, blank, None]
    stay_pnb = pnb + lp_last
    # Extension p + c that is already beam q (p = q's parent): its mass joins q instead.
    # Valid beams have distinct hashes, so at most one p matches (max == logsumexp).
    match = (s["parent"][:, :, None] == s["hash"][:, None, :]) & (valid & (last >= 0))[:, :, None]
    from_p = np.where(last[:, :, None] == last[:, None, :], pb[:, None, :], total[:, None, :])
    merged = np.where(match, from_p, _NEG_INF).max(axis=2) + lp_last
    stay_pnb = np.logaddexp(stay_pnb, merged)
    stay = np.logaddexp(stay_pb, stay_pnb)

    # New prefixes: each beam × the top non-blank tokens of the frame.
    lp_nb = lp.copy()
    lp_nb[:, blank] = _NEG_INF
    sel = np.argpartition(-lp_nb, n_tok - 1, axis=1)[:, :n_tok]  # [B, N]
    lp_sel = lp_nb[rows, sel]
    if min_logp is not None:
        lp_sel = np.where(lp_sel >= min_logp, lp_sel, _NEG_INF)
    same = sel[:, None, :] == last[:, :, None]  # [B, K, N]: c repeats p's last token
    ext = np.where(same, pb[:, :, None], total[:, :, None]) + lp_sel[:, None, :]
    # Drop candidates already merged above: (p, c) with some beam q = p + c.
    taken = np.einsum("bqp,bqn->bpn", match.astype(np.float32), same.astype(np.float32)) > 0
    ext = np.where(taken, _NEG_INF, ext)

    cand = np.concatenate([stay, ext.reshape(batch, -1)], axis=1)  # [B, K + K*N]
    pick = np.argsort(-cand, axis=1, kind="stable")[:, :width]  # [B, K] best first
    is_ext = pick >= width
    j = np.maximum(pick - width, 0)
    src = np.where(is_ext, j // n_tok, pick)  # beam each pick comes from
    token = np.where(is_ext, sel[rows, j % n_tok], -1)

    length = s["length"][rows, src]
    tokens = s["tokens"][rows, src]  # [B, K, L] copy
    if length.max() + 1 > tokens.shape[2]:
        tokens = _grow(tokens, 2 * tokens.shape[2])
    b_ext, k_ext = np.nonzero(is_ext)
    tokens[b_ext, k_ext, length[b_ext, k_ext]] = token[b_ext, k_ext]
    src_hash = s["hash"][rows, src]
    code = (token.astype(np.int64) + 1).astype(np.uint64)
    return {
        "log_pb": np.where(is_ext, _NEG_INF, stay_pb[rows, src]),
        "log_pnb": np.where(is_ext, cand[rows, pick], stay_pnb[rows, src]),
        "tokens": tokens,
        "length": length + is_ext,
        "last": np.where(is_ext, token, last[rows, src]).astype(np.int32),
        "hash": np.where(is_ext, src_hash * _HASH_MUL + code, src_hash),
        "parent": np.where(is_ext, src_hash, s["parent"][rows, src]),
    }


def beam_results(
    state: BeamState,
    vocab: CTCVocab,
    words: bool = False,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float | Sequence[float] = 0.0,
    top: int | None = None,
) -> list[list[Hypothesis]]:
    """Per stream, the non-empty beams best first (`[0]` is the current best / final;
    `top` caps how many, e.g. 1 for partials). `words=True` gives each stream's best
    hypothesis its words by aligning it on the kept log-probs (O(frames × tokens): ask at
    a segment's end, not on every partial). `time_offset`: seconds of frame 0, one value
    or one per stream."""
    total = np.logaddexp(state.log_pb, state.log_pnb)
    offsets = np.broadcast_to(np.asarray(time_offset, dtype=np.float64), total.shape[:1])
    out = []
    for b in range(total.shape[0]):
        hyps = []
        for k in np.argsort(-total[b], kind="stable")[:top]:
            if total[b, k] == _NEG_INF:
                continue
            tokens = tuple(state.tokens[b, k, : state.length[b, k]].tolist())
            hyps.append(Hypothesis(vocab.decode(tokens), tokens, float(total[b, k])))
        out.append(hyps)
    if words and state.history is not None:
        # Align every stream's best labelling on its kept log-probs in one batched pass.
        streams = [b for b, hyps in enumerate(out) if hyps]
        spans = align_batch(
            [_stream_history(state.history, b) for b in streams],
            [out[b][0].tokens for b in streams],
            vocab.blank_id,
        )
        for b, span in zip(streams, spans, strict=True):
            word_list = word_timestamps(span, vocab, frame_stride, float(offsets[b]))
            out[b][0] = dataclasses.replace(out[b][0], words=word_list)
    return out


def _stream_history(history: tuple[tuple[np.ndarray, np.ndarray], ...], b: int) -> np.ndarray:
    """Stream b's kept log-probs `[frames, V]`."""
    chunks = [lp[b, : n[b]] for lp, n in history]
    return np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)


def prefix_beam_search(
    logits: np.ndarray,
    vocab: CTCVocab,
    beam_width: int = 8,
    token_min_logp: float | None = -10.0,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float = 0.0,
) -> list[Hypothesis]:
    """CTC prefix beam search over logits or log-probs `[T, V]`; hypotheses best first,
    with word timestamps."""
    state = beam_init(1, beam_width)
    state = beam_step(state, np.asarray(logits)[None], vocab, None, token_min_logp)
    return beam_results(state, vocab, True, frame_stride, time_offset)[0]


def prefix_beam_search_batch(
    logits: np.ndarray,
    vocab: CTCVocab,
    lengths: Sequence[int] | np.ndarray | None = None,
    beam_width: int = 8,
    token_min_logp: float | None = -10.0,
    frame_stride: float = FRAME_STRIDE_S,
    time_offset: float = 0.0,
) -> list[list[Hypothesis]]:
    """`logits` [B, T, V] with valid frame counts `lengths` [B]; per stream, best first."""
    state = beam_init(logits.shape[0], beam_width)
    state = beam_step(state, logits, vocab, lengths, token_min_logp)
    return beam_results(state, vocab, True, frame_stride, time_offset)
