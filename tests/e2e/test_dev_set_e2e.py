"""`streamd transcribe` over the whole development set (tests/data/audio/dev: 118
utterances of 1-53 s, many with speech running to a window's edge, and a 174.8 s stream
file) with the real tiny.en weights.

Checks what a user notices first on speech nobody tuned on: no output ends with a
repeated phrase its reference does not have (tiny.en's failure when speech runs to the
end of its encoder window), and none is empty. The word error rate against
faster-whisper per length band is bench/transcribe.py's (it takes minutes more).
"""

from __future__ import annotations

import json

import pytest
from helpers.text import (
    normalize,
    reference_repeats,
    repeated_tail,
    wer,
)

from streamd import cli

pytestmark = pytest.mark.e2e


def test_repeated_tail_rules():
    assert repeated_tail("a b c d e c d e".split()) == ["c", "d", "e"]
    assert repeated_tail("a b c d a b".split()) is None  # two words: not a phrase
    assert repeated_tail("to be or not to be".split()) is None
    assert reference_repeats("x word word word word word".split(), ["word"] * 3)
    assert not reference_repeats("i want to die in it".split(), "i want to die in it".split())


# About 2 minutes on an idle 2-core machine (1190 s of audio); longer on a loaded one.
@pytest.mark.timeout(2400)
def test_dev_set_has_no_repeated_tails(dev_manifest, capsys):
    paths = [str(e["path"]) for e in dev_manifest]
    assert len(paths) == 119

    status = cli.main(["transcribe", "--json", *paths])

    out, _ = capsys.readouterr()
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == paths
    loops = []
    for record, entry in zip(records, dev_manifest, strict=True):
        hyp, ref = normalize(record["text"]).split(), normalize(entry["text"]).split()
        assert hyp, f"{entry['audio']}: empty transcript"
        phrase = repeated_tail(hyp)
        if phrase and not reference_repeats(ref, phrase):
            loops.append(f"{entry['audio']}: ...{' '.join(hyp[-12:])}")
    assert not loops, "outputs ending in a repeated phrase:\n" + "\n".join(loops)

    ours = 100 * wer([e["text"] for e in dev_manifest], [r["text"] for r in records])
    print(f"\ndev set WER streamd {ours:.2f} % (faster-whisper in the same run: "
          f"python bench/transcribe.py; the shared set's comparison is test_transcribe_e2e)")
