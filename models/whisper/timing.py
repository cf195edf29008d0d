"""Word timings from Whisper's cross-attention (openai/whisper's `word_timestamps=True`).

A few decoder heads ("alignment heads", listed with each released checkpoint) attend to
the audio frames a token was heard in. After decoding a window, the decoder runs once
more over [SOT sequence, text tokens, end] (`whisper.alignment_attention`); the heads'
attention, normalized per frame over the tokens and median-filtered along time, is
averaged into a tokens x frames score whose best monotonic path (dynamic time warping)
gives the frame where each token starts. A word starts at its first token's frame and
ends where the next word starts; its probability is the mean of its tokens'.

Then openai's corrections, which its word timings are judged with: words at a sentence
end or after a pause are cut to twice the median word length, punctuation is merged into
its word, and a segment's first and last words are pulled to the segment's timestamps
when they stretch more than 0.5 s past them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from models.whisper import model as whisper
from models.whisper.tokenizer import WhisperTokenizer

FRAMES_PER_S = 50  # encoder frames: one per 2 mel hops of 10 ms
MEDIAN_FILTER_WIDTH = 7
# Token rows of the forced pass are padded to one of these widths (one compile each).
TOKEN_BUCKETS = (32, 64, 128, 256)
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"
MAX_MEDIAN_WORD_S = 0.7


@dataclasses.dataclass
class WordTiming:
    """One word while its timing is corrected: text (leading space kept), its tokens,
    seconds from the window start, mean token probability."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def default_heads(config: whisper.WhisperConfig) -> tuple[tuple[int, int], ...]:
    """Every head of the second half of the decoder layers: openai's choice for a model
    whose alignment heads are unknown."""
    return tuple((layer, head) for layer in range(config.decoder_layers // 2,
                                                  config.decoder_layers)
                 for head in range(config.decoder_heads))  # fmt: skip


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a window of odd `width` along the last axis, edges reflected."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.median(windows, axis=-1)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through `cost` [N, M] from (0, 0) to (N-1, M-1), moving
    one row, one column or both at a time: (row indices, column indices) of its cells.

    Row by row: cell j's cost is min(from above or diagonally, from the left + cost), a
    running minimum along the row once the left-moves are folded into a prefix sum."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    # 0: diagonal, 1: from the row above, 2: from the left
    move = np.zeros((n + 1, m + 1), np.int8)
    for i in range(1, n + 1):
        diagonal, above = total[i - 1, :-1], total[i - 1, 1:]
        arrive = np.minimum(diagonal, above) + cost[i - 1]  # [M], entering column j
        prefix = np.concatenate([[0.0], np.cumsum(cost[i - 1])])  # prefix[j] = sum x[:j]
        # total[i, j] = min over k <= j of arrive[k] + sum x[k+1 .. j]
        best = np.minimum.accumulate(arrive - prefix[1:]) + prefix[1:]
        total[i, 1:] = best
        from_left = np.concatenate([[False], best[1:] < arrive[1:]])
        move[i, 1:] = np.where(from_left, 2, np.where(diagonal <= above, 0, 1))
    rows, cols = [], []
    i, j = n, m
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        step = move[i, j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def token_bucket(n: int, limit: int) -> int:
    """The padded row width for `n` tokens (at most the model's `limit`)."""
    return min(next((b for b in TOKEN_BUCKETS if b >= n), limit), limit)


def align_words(
    attention: np.ndarray,
    next_probs: np.ndarray,
    tokenizer: WhisperTokenizer,
    text_tokens: Sequence[int],
    prefix_len: int,
    n_frames: int,
) -> list[WordTiming]:
    """Words of `text_tokens` with times (seconds from the window start) from the forced
    pass over [prefix (`prefix_len` tokens, <|notimestamps|> last), text, end]:
    `attention` [A, S, T] (S >= that row), `next_probs` [S - 1]; `n_frames` encoder frames
    hold audio."""
    words, groups = tokenizer.split_to_word_tokens(text_tokens)
    if not words:
        return []
    n_text = len(text_tokens)
    rows = prefix_len + n_text + 1
    weights = attention[:, :rows, :n_frames].astype(np.float64)
    std = weights.std(axis=-2, keepdims=True)
    weights = (weights - weights.mean(axis=-2, keepdims=True)) / np.maximum(std, 1e-12)
    matrix = median_filter(weights, MEDIAN_FILTER_WIDTH).mean(axis=0)
    # The rows that predict the text tokens and the end token (a row predicts the next).
    matrix = matrix[prefix_len - 1 : rows - 1]
    token_index, frame_index = dtw(-matrix)
    first = np.concatenate([[True], np.diff(token_index) > 0])
    token_start_s = frame_index[first] / FRAMES_PER_S  # [n_text + 1]: the end row last
    probs = next_probs[prefix_len - 1 : prefix_len - 1 + n_text]
    bounds = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
    return [
        WordTiming(word, group, float(token_start_s[a]), float(token_start_s[b]),
                   float(np.mean(probs[a:b])))
        for word, group, a, b in zip(words, groups, bounds[:-1], bounds[1:], strict=True)
    ]  # fmt: skip


def cut_long_sentence_ends(words: list[WordTiming]) -> float:
    """Cuts a punctuation mark, or the word after one, to twice the median word length
    (a sentence end absorbs the pause after it); returns that median."""
    lengths = np.array([w.end - w.start for w in words])
    lengths = lengths[lengths > 0]
    median = min(MAX_MEDIAN_WORD_S, float(np.median(lengths))) if len(lengths) else 0.0
    longest = 2 * median
    if len(lengths):
        for previous, word in zip(words, words[1:], strict=False):
            if word.end - word.start > longest:
                if word.word in SENTENCE_END:
                    word.end = word.start + longest
                elif previous.word in SENTENCE_END:
                    word.start = word.end - longest
    return median


def merge_punctuation(words: list[WordTiming]) -> list[WordTiming]:
    """Opening marks join the word after them, closing marks the word before them; the
    word keeps its own times."""
    merged: list[WordTiming] = []
    opening: WordTiming | None = None
    for word in words:
        if opening is not None:
            word.word, word.tokens = opening.word + word.word, opening.tokens + word.tokens
            opening = None
        mark = word.word.strip()
        if word.word.startswith(" ") and mark and mark in PREPEND_PUNCTUATION:
            opening = word
        elif merged and not merged[-1].word.endswith(" ") and word.word in APPEND_PUNCTUATION:
            merged[-1].word += word.word
            merged[-1].tokens = merged[-1].tokens + word.tokens
        else:
            merged.append(word)
    if opening is not None:
        merged.append(opening)
    return merged


def fit_segment(
    words: list[WordTiming], start: float, end: float, median: float, last_speech: float
) -> None:
    """openai's segment-boundary corrections on one segment's words (in place): after a
    pause the first words are cut to twice the median length, and the first and last
    words are pulled to the segment's own timestamps when they stretch 0.5 s past them."""
    if not words:
        return
    longest = 2 * median
    first = words[0]
    if first.end - last_speech > 4 * median and (
        first.end - first.start > longest
        or (len(words) > 1 and words[1].end - first.start > 2 * longest)
    ):
        if len(words) > 1 and words[1].end - words[1].start > longest:
            boundary = max(words[1].end / 2, words[1].end - longest)
            first.end = words[1].start = boundary
        first.start = max(0.0, first.end - longest)
    if start < first.end and start - 0.5 > first.start:
        first.start = max(0.0, min(first.end - median, start))
    last = words[-1]
    if end > last.start and end + 0.5 < last.end:
        last.end = max(last.start + median, end)


def window_words(
    model_params: whisper.Params,
    config: whisper.WhisperConfig,
    tokenizer: WhisperTokenizer,
    heads: tuple[tuple[int, int], ...],
    encoder_out: jnp.ndarray,
    n_frames: int,
    segments: Sequence[tuple[float, float, list[int]]],
    prefix: Sequence[int],
    last_speech: float = 0.0,
) -> list[list[WordTiming]]:
    """Per segment of one window (start s, end s, text tokens; times from the window
    start), its words with corrected times, by one forced pass over all their tokens.
    `prefix`: the SOT sequence ending with <|notimestamps|>; `last_speech`: where speech
    last ended before this window (seconds from the window start, may be negative)."""
    text = [t for _, _, ids in segments for t in ids]
    if not text:
        return [[] for _ in segments]
    row = [*prefix, *text, tokenizer.eot]
    limit = config.max_target_positions
    if len(row) > limit:  # never for Whisper's 224-token decodes; no words, not an error
        return [[] for _ in segments]
    padded = np.full(token_bucket(len(row), limit), tokenizer.eot, np.int32)
    padded[: len(row)] = row
    attention, probs = whisper.alignment_attention(
        model_params, config, encoder_out, jnp.asarray(padded), jnp.int32(n_frames), heads
    )
    words = align_words(np.asarray(attention), np.asarray(probs), tokenizer, text,
                        len(prefix), n_frames)  # fmt: skip
    median = cut_long_sentence_ends(words)
    words = merge_punctuation(words)
    out: list[list[WordTiming]] = []
    k = 0
    for start, end, ids in segments:
        mine, used = [], 0
        while k < len(words) and used < len(ids):
            mine.append(words[k])
            used += len(words[k].tokens)
            k += 1
        fit_segment(mine, start, end, median, last_speech)
        if mine:
            last_speech = mine[-1].end
        out.append(mine)
    return out
