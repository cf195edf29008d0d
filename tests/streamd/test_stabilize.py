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


def test_loop_start_cuts_repetition_tails() -> None:
    from streamd.pipelines.stabilize import loop_start

    words = "a golden fortune and a happy life".split()
    assert loop_start(words) == len(words)  # no loop
    looped = words * 3 + words[:3]
    assert loop_start(looped) == len(words)
    assert loop_start("in 1813 in 1813 in 1813 in".split()) == 2
    assert loop_start("so so so so so".split()) == 1
    assert loop_start("no no".split()) == 2  # too short to call a loop
    assert loop_start("he said bye bye".split()) == 4
    # Never below `keep`; the loop's first period is kept even when it starts late.
    assert loop_start(looped, keep=10) == 10
    assert loop_start(["x", "y", *looped]) == 2 + len(words)
    # Brute force on random short sequences: the cut leaves no qualifying loop behind
    # and only removes a periodic tail.
    import random

    rng = random.Random(3)
    for _ in range(2000):
        seq = [rng.randrange(3) for _ in range(rng.randrange(0, 14))]
        cut = loop_start(seq)
        assert 0 < cut <= len(seq) or seq == []
        if cut < len(seq):
            tail = seq[cut:]
            period = next(p for p in range(1, len(seq) + 1)
                          if all(seq[j] == seq[j + p] for j in range(cut - p, len(seq) - p)))
            assert tail == [seq[cut - period + k % period] for k in range(len(tail))]
