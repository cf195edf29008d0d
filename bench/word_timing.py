"""Word timing accuracy against the segment boundaries of the dev set's manifests.

    python bench/word_timing.py [--audio tests/data/audio/dev]
                                [--systems words,segments,faster-whisper]
                                [--out bench/results/word_timing.json]

The dev set's stream file and its `cathy_multi_*` files list where each utterance starts
and ends (`segments`: start_s, end_s; the recordings' own boundaries, so they include the
short silence a recording has before and after its speech). Each system transcribes the
files offline; every recognized word goes to the manifest segment whose span, widened to
the middle of the gaps around it, holds the word's midpoint. Per segment: the first word's
start minus start_s and the last word's end minus end_s. Reported: median and p90 of the
absolute errors (seconds), and the segments no word went to.

Systems: `words`: streamd's `transcribe_segments(word_timestamps=True)` (cross-attention
word timings, models/whisper/timing.py); `segments`: the same without word timings, the
segment times of Whisper's timestamp tokens with the text spread evenly over them (the
baseline a client had without word timings); `faster-whisper`: faster-whisper's
`word_timestamps=True` on the same model (the reference implementation of the method).
Accuracy is what this measures; it prints no timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

Timed = tuple[str, float, float]  # word, start s, end s


def load_items(folder: Path) -> list[dict]:
    """Manifest entries with `segments`: the stream file and the cathy_multi_* files."""
    items = []
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line) if line.strip() else {}
        name = entry.get("audio", "")
        if entry.get("segments") and (name.startswith("stream_") or "multi" in name):
            entry["path"] = folder / name
            items.append(entry)
    return items


def streamd_words(model_name: str, word_timestamps: bool):
    from models.registry import load_whisper
    from models.whisper.transcriber import WhisperTranscriber

    transcriber = WhisperTranscriber(load_whisper(model_name))

    def run(audio: np.ndarray) -> list[Timed]:
        out: list[Timed] = []
        for segment in transcriber.transcribe_segments(audio, word_timestamps=word_timestamps):
            if word_timestamps:
                out += [(w.word, w.start, w.end) for w in segment.words]
            else:  # spread evenly over the segment's timestamps
                words = segment.text.split()
                step = (segment.end - segment.start) / max(len(words), 1)
                out += [(w, segment.start + k * step, segment.start + (k + 1) * step)
                        for k, w in enumerate(words)]
        return out

    return run


def faster_whisper_words(model_name: str):
    from faster_whisper import WhisperModel

    from models.registry import resolve_model

    model = WhisperModel(str(resolve_model(model_name)), device="cpu", compute_type="float32")

    def run(audio: np.ndarray) -> list[Timed]:
        segments, _ = model.transcribe(audio, beam_size=1, word_timestamps=True,
                                       condition_on_previous_text=False)
        return [(w.word, float(w.start), float(w.end)) for s in segments for w in s.words]

    return run


def errors(words: list[Timed], segments: list[dict]) -> tuple[list[float], list[float], int]:
    """Start and end errors (signed, seconds) per manifest segment that got words, and how
    many got none."""
    spans = [(s["start_s"], s["end_s"]) for s in segments]
    cuts = [(a_end + b_start) / 2 for (_, a_end), (b_start, _) in zip(spans, spans[1:],
                                                                      strict=False)]
    buckets: list[list[Timed]] = [[] for _ in spans]
    for word in words:
        middle = (word[1] + word[2]) / 2
        buckets[int(np.searchsorted(cuts, middle))].append(word)
    starts, ends, missed = [], [], 0
    for (start, end), mine in zip(spans, buckets, strict=True):
        if not mine:
            missed += 1
            continue
        starts.append(mine[0][1] - start)
        ends.append(mine[-1][2] - end)
    return starts, ends, missed


def summary(values: list[float]) -> dict:
    a = np.abs(np.array(values))
    return {"median_s": round(float(np.median(a)), 3),
            "p90_s": round(float(np.percentile(a, 90)), 3),
            "mean_signed_s": round(float(np.mean(values)), 3), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--audio", type=Path, default=REPO / "tests/data/audio/dev")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--systems", default="words,segments,faster-whisper")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/word_timing.json")
    args = parser.parse_args()
    items = load_items(args.audio)
    makers = {"words": lambda: streamd_words(args.model, True),
              "segments": lambda: streamd_words(args.model, False),
              "faster-whisper": lambda: faster_whisper_words(args.model)}
    results: dict[str, dict] = {}
    for system in args.systems.split(","):
        run = makers[system]()
        starts, ends, missed, per_file = [], [], 0, {}
        for item in items:
            audio, rate = soundfile.read(item["path"], dtype="float32")
            assert rate == 16000
            s, e, m = errors(run(audio), item["segments"])
            starts, ends, missed = starts + s, ends + e, missed + m
            per_file[item["audio"]] = {"start": summary(s) if s else None,
                                       "end": summary(e) if e else None, "missed": m}
            print(f"{system:15s} {item['audio']:28s} start {per_file[item['audio']]['start']}",
                  file=sys.stderr, flush=True)
        results[system] = {"start": summary(starts), "end": summary(ends),
                           "segments": sum(len(i["segments"]) for i in items),
                           "missed": missed, "files": per_file}
    print(f"{'system':15s} {'segments':>8s} {'missed':>6s} {'start median':>12s} "
          f"{'start p90':>9s} {'end median':>10s} {'end p90':>7s}")
    for system, r in results.items():
        print(f"{system:15s} {r['segments']:8d} {r['missed']:6d} {r['start']['median_s']:12.3f} "
              f"{r['start']['p90_s']:9.3f} {r['end']['median_s']:10.3f} {r['end']['p90_s']:7.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "audio": str(args.audio),
                                    "files": [i["audio"] for i in items],
                                    "systems": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
