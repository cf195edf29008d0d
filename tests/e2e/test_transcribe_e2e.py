"""`streamd transcribe` on real speech with the real tiny.en weights.

One CLI run over every shared recording (plus an unreadable file) checks, at once: the
word error rate against faster-whisper on the same weights in the same run, per-file
JSON output, per-file errors, and that nothing compiles after the warm-up although the
files differ in length.
"""

from __future__ import annotations

import functools
import json

import jax.monitoring
import jiwer
import pytest
from helpers.text import faster_whisper_texts
from whisper_normalizer.english import EnglishTextNormalizer

from models.whisper import transcriber as whisper_asr
from streamd import cli

pytestmark = pytest.mark.e2e

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


def _wer(refs: list[str], hyps: list[str]) -> float:
    norm = EnglishTextNormalizer()
    return 100.0 * jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps])


def test_transcribe_real_speech(shared_manifest, tmp_path, capsys, monkeypatch):
    traces: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_kw: traces.append(event) if event == _TRACE_EVENT else None
    )
    after_warmup: list[int] = []
    original_warmup = whisper_asr.WhisperTranscriber.warmup

    @functools.wraps(original_warmup)  # keeps its `lengths` parameter visible to the CLI
    def warmup(self, *args, **kwargs):
        original_warmup(self, *args, **kwargs)
        after_warmup.append(len(traces))

    monkeypatch.setattr(whisper_asr.WhisperTranscriber, "warmup", warmup)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wav")
    paths = [str(e["path"]) for e in shared_manifest]
    # The unreadable file sits in the middle: the files after it must still be done.
    argv = ["transcribe", "--json", *paths[:3], str(bad), *paths[3:]]

    status = cli.main(argv)

    out, err = capsys.readouterr()
    assert status == 1, "an unreadable file makes the exit status non-zero"
    assert f"cannot read audio file {bad}" in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == paths
    for record, entry in zip(records, shared_manifest, strict=True):
        assert record["duration_s"] == pytest.approx(entry["duration_s"], abs=0.01)
        assert 0 < record["elapsed_s"] < record["duration_s"]

    assert after_warmup, "warm-up ran"
    assert len(traces) == after_warmup[0], (
        f"{len(traces) - after_warmup[0]} traces after warm-up across files of "
        f"{sorted(e['duration_s'] for e in shared_manifest)} s"
    )

    refs = [e["text"] for e in shared_manifest]
    ours = _wer(refs, [r["text"] for r in records])
    theirs = _wer(refs, faster_whisper_texts(paths))
    print(f"\nWER streamd {ours:.2f} %  faster-whisper (float32, greedy) {theirs:.2f} %")
    assert ours <= theirs + 1.0


# faster-whisper 1.x, tiny.en, word_timestamps=True on jfk.wav: first starts of these words (s).
FASTER_WHISPER_STARTS = {"And": 0.0, "Americans": 1.76, "ask": 2.26, "what": 4.52,
                         "country": 6.02, "can": 6.36, "country.": 10.22}


def test_word_timestamps_on_jfk(capsys) -> None:
    """`--word-timestamps --json`: words in order, inside their segment, spelling its text,
    at faster-whisper's times (within 0.1 s; ours encodes a 10 s bucket, not 30 s)."""
    assert cli.main(["transcribe", "--json", "--word-timestamps", "streamd/data/jfk.wav"]) == 0
    record = json.loads(capsys.readouterr().out)
    segments = record["segments"]
    assert record["text"] == " ".join(s["text"] for s in segments)
    assert "ask not what your country can do for you" in record["text"]
    previous_end, found = 0.0, {}
    for segment in segments:
        assert " ".join(w["word"] for w in segment["words"]) == segment["text"]
        for word in segment["words"]:
            assert previous_end <= word["start"] <= word["end"]
            assert segment["start"] <= word["start"] and word["end"] <= segment["end"]
            assert 0.0 < word["confidence"] <= 1.0
            previous_end = word["end"]
            found.setdefault(word["word"], word["start"])
    assert segments[-1]["end"] <= record["duration_s"]
    for word, start in FASTER_WHISPER_STARTS.items():
        assert abs(found[word] - start) <= 0.1, (word, found[word], start)
