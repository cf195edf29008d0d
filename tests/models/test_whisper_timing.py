"""models/whisper/timing.py on small synthetic cases: DTW, the median filter, word
splitting and times from a known attention pattern, punctuation merging."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.registry import resolve_model
from models.whisper import timing as wt
from models.whisper.tokenizer import WhisperTokenizer


def brute_force_dtw(cost: np.ndarray) -> float:
    """The cheapest monotonic path cost by plain recursion over every cell."""
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0
    for i, j in itertools.product(range(1, n + 1), range(1, m + 1)):
        total[i, j] = cost[i - 1, j - 1] + min(total[i - 1, j - 1], total[i - 1, j],
                                               total[i, j - 1])
    return float(total[n, m])


@pytest.fixture(scope="module")
def tokenizer() -> WhisperTokenizer:
    return WhisperTokenizer.from_file(resolve_model("tiny.en"))


def test_dtw_finds_the_cheapest_monotonic_path() -> None:
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (1, 6), (5, 1), (4, 9), (7, 7), (12, 30)]:
        cost = rng.random((n, m))
        rows, cols = wt.dtw(cost)
        steps = np.stack([np.diff(rows), np.diff(cols)])
        assert (rows[0], cols[0], rows[-1], cols[-1]) == (0, 0, n - 1, m - 1)
        assert np.all((steps >= 0) & (steps <= 1)) and np.all(steps.sum(0) >= 1)
        assert cost[rows, cols].sum() == pytest.approx(brute_force_dtw(cost))
    # A cheap band: the path follows it.
    band = np.ones((3, 9))
    band[0, :3] = band[1, 3:6] = band[2, 6:] = 0
    rows, cols = wt.dtw(band)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and cols.tolist() == list(range(9))


def test_median_filter_matches_a_plain_loop() -> None:
    x = np.random.default_rng(1).random((2, 3, 20))
    padded = np.pad(x, [(0, 0), (0, 0), (3, 3)], mode="reflect")
    expected = np.stack([np.median(padded[..., j : j + 7], -1) for j in range(20)], -1)
    np.testing.assert_allclose(wt.median_filter(x, 7), expected)
    assert wt.median_filter(x[..., :3], 7) is not None  # shorter than the half width: kept


def test_words_get_the_frames_their_tokens_attend_to(tokenizer) -> None:
    """Attention that sits on frames [10k, 10k + 10) for the k-th predicted token gives
    word k the times 0.2 k s to 0.2 (k + 1) s (50 frames per second)."""
    text = tokenizer.encode(" Ask not, my friends")
    words, groups = tokenizer.split_to_word_tokens(text)
    prefix = tokenizer.sot_sequence()  # SOT, <|notimestamps|>
    rows = len(prefix) + len(text) + 1
    attention = np.full((2, rows + 3, 100), 0.01)
    for k in range(len(text) + 1):  # the row before each text token (and the end) predicts it
        attention[:, len(prefix) - 1 + k, 10 * k : 10 * k + 10] = 1.0
    probs = np.linspace(0.5, 1.0, rows + 2)
    timed = wt.align_words(attention, probs, tokenizer, text, len(prefix), 100)
    assert [w.word for w in timed] == words == [" Ask", " not", ",", " my", " friends"]
    starts = np.concatenate([[0], np.cumsum([len(g) for g in groups])])
    for w, a, b in zip(timed, starts[:-1], starts[1:], strict=True):
        assert (w.start, w.end) == pytest.approx((0.2 * a, 0.2 * b))
        own = probs[len(prefix) - 1 + a : len(prefix) - 1 + b]
        assert w.probability == pytest.approx(own.mean())


def test_punctuation_joins_its_word() -> None:
    def word(text: str, start: float) -> wt.WordTiming:
        return wt.WordTiming(text, [int(start * 10)], start, start + 0.1, 1.0)

    merged = wt.merge_punctuation([word(' "', 0), word(" Ask", 1), word(" not", 2),
                                   word("!", 3), word('"', 4), word(" Go", 5)])
    assert [w.word for w in merged] == [' " Ask', " not!\"", " Go"]
    assert [w.tokens for w in merged] == [[0, 10], [20, 30, 40], [50]]
    assert [(w.start, w.end) for w in merged] == [(1, 1.1), (2, 2.1), (5, 5.1)]
