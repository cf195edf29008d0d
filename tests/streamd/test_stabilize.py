"""LocalAgreement-n: commits exactly the prefix the last n hypotheses share, only grows."""

from __future__ import annotations

import random

import pytest

from streamd.pipelines.stabilize import LocalAgreement, common_prefix_len


def test_common_prefix_len() -> None:
    assert common_prefix_len([]) == 0
    assert common_prefix_len(["abc"]) == 3
    assert common_prefix_len(["abcd", "abxd"]) == 2
    assert common_prefix_len(["ab", "abc", "abd"]) == 2
    assert common_prefix_len(["", "abc"]) == 0


def test_la2_commits_agreement_of_last_two() -> None:
    la = LocalAgreement(2)
    assert la.update("I went".split()) == ()  # one hypothesis: nothing to agree with
    assert la.update("I want to".split()) == ("I",)
    assert la.update("I want to the".split()) == ("I", "want", "to")
    # A truncated last word differs between the two and is not committed.
    assert la.update("I want to the sto".split()) == ("I", "want", "to", "the")
    assert la.update("I want to the store".split()) == ("I", "want", "to", "the")
    assert la.update("I want to the store .".split()) == ("I", "want", "to", "the", "store")


def test_commit_never_shrinks_or_changes() -> None:
    la = LocalAgreement(2)
    la.update(["a", "b", "c"])
    assert la.update(["a", "b", "d"]) == ("a", "b")
    # Later hypotheses that contradict the commit cannot take it back or extend it.
    assert la.update(["x", "y"]) == ("a", "b")
    assert la.update(["x", "y"]) == ("a", "b")
    assert la.update(["a", "b", "e", "f"]) == ("a", "b")  # previous one disagrees
    assert la.update(["a", "b", "e", "g"]) == ("a", "b", "e")


def test_la3_needs_three_and_cap() -> None:
    la = LocalAgreement(3)
    la.update([1, 2, 3])
    assert la.update([1, 2, 3]) == ()
    assert la.update([1, 2, 4]) == (1, 2)
    capped = LocalAgreement(2, max_units=1)
    capped.update([1, 2, 3])
    assert capped.update([1, 2, 3]) == (1,)
    assert capped.update([1, 2, 3], max_units=2) == (1, 2)  # per-call cap overrides
    capped.reset()
    assert capped.committed == () and capped.update([1]) == ()
    with pytest.raises(ValueError):
        LocalAgreement(1)


def test_random_streams_match_brute_force() -> None:
    """Against a direct definition: commit = max(prev, LCP of last n) when consistent."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.choice([2, 3])
        la = LocalAgreement(n)
        history: list[tuple[int, ...]] = []
        committed: tuple[int, ...] = ()
        base = [rng.randrange(3) for _ in range(12)]
        for step in range(10):
            # Growing noisy hypotheses: a shared base with random edits near the end.
            hyp = list(base[: 2 + step])
            if hyp and rng.random() < 0.5:
                hyp[rng.randrange(len(hyp))] = rng.randrange(3)
            history.append(tuple(hyp))
            got = la.update(hyp)
            last = history[-n:]
            if len(last) == n:
                k = 0
                while all(len(h) > k for h in last) and len({h[k] for h in last}) == 1:
                    k += 1
                if k > len(committed) and all(h[: len(committed)] == committed for h in last):
                    committed = tuple(hyp[:k])
            assert got == committed
