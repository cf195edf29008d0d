"""CTC decoding on the host: vocabulary, greedy, prefix beam search, word timestamps.

CTC encoders (wav2vec2, conformer) emit logits `[B, T, V]`, one frame per
`config.frame_s` seconds (20 ms for the base models, the default `frame_stride` here;
other conv layouts and adapters differ, so callers with word times pass their model's).
This module turns them into text with numpy; nothing here runs on the device.

- `CTCVocab`: a Hugging Face `Wav2Vec2CTCTokenizer` folder read without transformers
  (the pad token is the CTC blank, `|` separates words).
- Greedy: `greedy_decode` for a whole utterance; `greedy_step` / `greedy_result` for a
  stream fed chunk by chunk (the frame offset and the last frame's id are carried, so the
  result equals decoding the concatenation).
- Prefix beam search: `prefix_beam_search` for a whole utterance; `beam_init` /
  `beam_step` / `beam_results` carry the beam of a batch of streams from chunk to chunk.
  Each frame is one vectorized update over streams, beams and the top tokens of the frame.
- Word timestamps: a token spans the frames of its run on a frame-level path (the argmax
  path for greedy, the best alignment of the chosen labelling for beam search); a word
  starts at its first token's first frame and ends after its last token's last frame.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import ModelLoadError

FRAME_STRIDE_S = 0.02  # base wav2vec2 / conformer frames (320 samples); see config.frame_s
_NEG_INF = -np.inf
_HASH_MUL = np.uint64(0x100000001B3)  # FNV-style multiplier for prefix hashes (mod 2**64)
_HASH_EMPTY = np.uint64(0xCBF29CE484222325)


# ----------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True)
class CTCVocab:
    """Id → token string for a CTC head; `tokens[blank_id]` is the blank (HF's pad)."""

    tokens: tuple[str, ...]
    blank_id: int
    unk_token: str = "<unk>"
    word_delimiter: str | None = "|"
    replace_word_delimiter_char: str = " "
    do_lower_case: bool = False

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def word_delimiter_id(self) -> int | None:
        if self.word_delimiter is None or self.word_delimiter not in self.tokens:
            return None
        return self.tokens.index(self.word_delimiter)

    @classmethod
    def from_dict(
        cls,
        vocab: dict[str, int],
        *,
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        word_delimiter: str | None = "|",
        replace_word_delimiter_char: str = " ",
        do_lower_case: bool = False,
        added_tokens: dict[int, str] | None = None,
    ) -> CTCVocab:
        """From a flat `{token: id}` map (plus added tokens `{id: token}` for ids the map
        lacks); ids missing from both read as `unk_token`, as in transformers."""
        id_to_token = {int(i): t for i, t in (added_tokens or {}).items()}
        id_to_token.update({int(i): t for t, i in vocab.items()})  # vocab wins, as in HF
        if pad_token not in vocab:
            raise ValueError(f"the pad/blank token {pad_token!r} is not in the vocabulary")
        size = max(id_to_token) + 1
        tokens = tuple(id_to_token.get(i, unk_token) for i in range(size))
        return cls(
            tokens=tokens,
            blank_id=vocab[pad_token],
            unk_token=unk_token,
            word_delimiter=word_delimiter,
            replace_word_delimiter_char=replace_word_delimiter_char,
            do_lower_case=do_lower_case,
        )

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        target_lang: str | None = None,
        word_delimiter: str | None = None,
    ) -> CTCVocab:
        """Read `vocab.json`, `tokenizer_config.json` and `special_tokens_map.json` of a
        Hugging Face wav2vec2 folder. A nested (multilingual) vocab.json needs a language:
        `target_lang` here or in tokenizer_config.json. `word_delimiter` overrides the
        configured one."""
        folder = Path(path)
        vocab_file = folder / "vocab.json"
        if not vocab_file.is_file():
            raise ModelLoadError(
                f"{vocab_file} not found; expected a Hugging Face wav2vec2 CTC tokenizer "
                "folder with vocab.json (token → id) and tokenizer_config.json"
            )
        vocab = _read_json(vocab_file)
        config = _read_json(folder / "tokenizer_config.json", missing_ok=True)
        # transformers reads the legacy special_tokens_map.json only when the config has
        # no added_tokens_decoder, and then lets it override the config.
        if "added_tokens_decoder" not in config:
            special = _read_json(folder / "special_tokens_map.json", missing_ok=True)
            config.update({k: v for k, v in special.items() if v is not None})

        lang = target_lang if target_lang is not None else config.get("target_lang")
        vocab = _select_language(vocab, lang, vocab_file)

        added: dict[int, str] = {}
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            added[int(i)] = _token_text(entry)
        added_file = folder / "added_tokens.json"
        if added_file.is_file():
            added.update({int(i): t for t, i in _read_json(added_file).items()})

        pad = _token_text(config.get("pad_token", "<pad>"))
        if pad not in vocab:
            raise ModelLoadError(
                f"{vocab_file}: the pad token {pad!r} (the CTC blank, from "
                f"{folder / 'tokenizer_config.json'}) is not in the vocabulary"
            )
        delimiter = word_delimiter
        if delimiter is None:
            delimiter = _token_text(config.get("word_delimiter_token", "|"))
        return cls.from_dict(
            vocab,
            pad_token=pad,
            unk_token=_token_text(config.get("unk_token", "<unk>")),
            word_delimiter=delimiter,
            replace_word_delimiter_char=config.get("replace_word_delimiter_char", " "),
            do_lower_case=bool(config.get("do_lower_case", False)),
            added_tokens=added,
        )

    def token(self, token_id: int) -> str:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else self.unk_token

    def _piece(self, token_id: int) -> str:
        text = self.token(token_id)
        return self.replace_word_delimiter_char if text == self.word_delimiter else text

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of collapsed, blank-free token ids (what HF's decode gives for the frames)."""
        text = "".join(self._piece(int(i)) for i in token_ids).strip()
        return text.lower() if self.do_lower_case else text

    def is_delimiter(self, token_id: int) -> bool:
        return self.token(token_id) == self.word_delimiter


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str:
    """Special tokens are saved as strings or as AddedToken dicts with `content`."""
    return value["content"] if isinstance(value, dict) else str(value)


def _select_language(vocab: dict, lang: str | None, vocab_file: Path) -> dict[str, int]:
    values = list(vocab.values())
    if all(isinstance(v, int) for v in values):
        return vocab
    if not all(isinstance(v, dict) for v in values):
        raise ModelLoadError(
            f"{vocab_file}: expected {{token: id}} or {{language: {{token: id}}}}, "
            "found a mix of both"
        )
    if lang is None:
        raise ModelLoadError(
            f"{vocab_file} is a multilingual vocabulary ({len(vocab)} languages, e.g. "
            f"{', '.join(list(vocab)[:5])}); set target_lang (argument or "
            "tokenizer_config.json) to pick one"
        )
    if lang not in vocab:
        raise ModelLoadError(
            f"{vocab_file}: language {lang!r} not found; it has {len(vocab)}: "
            f"{', '.join(sorted(vocab)[:20])}{', ...' if len(vocab) > 20 else ''}"
        )
    return vocab[lang]


# ----------------------------------------------------------------------------- hypotheses


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


def _extend_spans(
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
            if prob_sums is not None:
                prob_sums[-1] += float(sums[r])
            continue
        tokens.append(token)
        starts.append(first_frame + int(s))
        ends.append(first_frame + int(e))
        if prob_sums is not None:
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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- greedy


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
        log_probs = _log_softmax(x)
        path = log_probs.argmax(axis=-1)
        chosen = np.take_along_axis(log_probs, path[:, None], axis=-1)[:, 0]
        probs: np.ndarray | None = np.exp(chosen)
        log_prob = None if state.log_prob is None else state.log_prob + float(chosen.sum())
    elif x.ndim == 1:
        path, probs, log_prob = x.astype(np.int64), None, None
    else:
        raise ValueError(f"expected logits [T, V] or ids [T], got shape {x.shape}")
    spans = _extend_spans(state.spans, path, probs, state.frames, state.prev_id, vocab.blank_id)
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
    lengths = _lengths(logits, lengths)
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
    lengths = _lengths(logits, lengths)
    return [greedy_step(s, logits[b, : lengths[b]], vocab) for b, s in enumerate(states)]


def _lengths(x: np.ndarray, lengths: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if lengths is None:
        return np.full(x.shape[0], x.shape[1], dtype=np.int64)
    return np.asarray(lengths, dtype=np.int64)


# ----------------------------------------------------------------------------- beam search


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
    log_probs = _log_softmax(logits)
    batch, steps, vocab_size = log_probs.shape
    lengths = _lengths(log_probs, lengths)
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


# ----------------------------------------------------------------------------- alignment


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
        out.append(_extend_spans(TokenSpans(), path, probs, 0, -1, blank_id))
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
        out.append(_extend_spans(TokenSpans(), path, probs, 0, -1, blank_id))
    return out
