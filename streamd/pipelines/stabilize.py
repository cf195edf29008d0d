"""LocalAgreement: the stabilizing policy that decides which prefix of a growing
hypothesis is committed (reported as `stable`, never changed afterwards).

A hypothesis is a sequence of *units* (for Whisper: words, each a tuple of token ids).
LocalAgreement-n commits the longest common prefix of the last n hypotheses, as in
Macháček et al., "Turning Whisper into Real-Time Transcription System" (2023). The
policy only ever extends what it committed: a later hypothesis that contradicts the
committed prefix does not take it back (the pipeline forces the committed prefix into
the decoder, so in practice hypotheses always start with it).

Plain Python, no model: the unit type only needs `==`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

U = TypeVar("U", bound=Hashable)


def common_prefix_len(seqs: Sequence[Sequence[U]]) -> int:
    """Length of the longest prefix shared by every sequence (0 for no sequences)."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


class LocalAgreement(Generic[U]):
    """LocalAgreement-n over unit sequences; one instance per segment (or `reset()`).

    `update(hyp)` returns the committed units (the stable prefix) after seeing `hyp`.
    `max_units` caps how much may be committed (e.g. the decoder's prompt room), so a
    commit can always be replayed as a decoder prefix.
    """

    def __init__(self, n: int = 2, max_units: int | None = None) -> None:
        if n < 2:
            raise ValueError("LocalAgreement needs n >= 2 hypotheses to agree")
        self.n = n
        self.max_units = max_units
        self._recent: deque[tuple[U, ...]] = deque(maxlen=n)
        self.committed: tuple[U, ...] = ()

    def reset(self) -> None:
        self._recent.clear()
        self.committed = ()

    def update(self, hypothesis: Sequence[U], max_units: int | None = None) -> tuple[U, ...]:
        """Add the newest hypothesis; commit what the last n agree on. Returns `committed`.

        `max_units` (if given) overrides the instance cap for this call.
        """
        hyp = tuple(hypothesis)
        self._recent.append(hyp)
        cap = self.max_units if max_units is None else max_units
        if len(self._recent) < self.n:
            return self.committed
        agreed = common_prefix_len(list(self._recent))
        if cap is not None:
            agreed = min(agreed, cap)
        # Only grow, and only along the hypotheses that start with what is committed:
        # a hypothesis that dropped part of the committed prefix cannot extend it.
        k = len(self.committed)
        if agreed > k and all(h[:k] == self.committed for h in self._recent):
            self.committed = hyp[:agreed]
        return self.committed


def loop_start(units: Sequence[Hashable], keep: int = 0) -> int:
    """Where a repetition loop at the end of `units` should be cut: the length to keep.

    Whisper on short windows often ends in a loop ("a happy life. A happy life. A
    happy..."). A loop is a periodic tail: from some index i on, every unit equals the one
    p before it, for p + max(2, min(p, 3)) units or more (a single word: 4 in a row); the
    first period is kept. The earliest such i wins; the cut never goes below `keep` (e.g.
    words already committed). Returns len(units) when there is no loop.
    """
    n = len(units)
    best = n
    for p in range(1, n // 2 + 1):
        j = n - p - 1
        while j >= 0 and units[j] == units[j + p]:
            j -= 1
        i = j + 1  # units[i:] is p-periodic
        need = 4 if p == 1 else p + max(2, min(p, 3))
        if n - i >= need:
            best = min(best, max(i + p, keep))
    return best
