"""How the VAD cuts real speech into segments, for a sweep of its endpoint and
minimum-speech settings: the measurement behind `vad.endpoint_silence_ms` and
`vad.min_speech_ms` (streamd/config.py).

    python bench/vad.py [--endpoint-ms 300 390 450 510 600 750] [--min-speech-ms 60 150 250]
                        [--out bench/results/vad.json]

Data: the single-utterance files of the shared and dev sets (not the `cathy_multi_*` /
`cathy_edge_*` files, whose parts are separate sentences joined with 0.3-0.6 s pauses)
and the two stream files, whose manifests give each utterance's span. Per setting:
- split: utterances cut into more than one segment (a final each: the decoder loses the
  sentence's context, and finals come mid-sentence);
- merged: segments that cover two reference utterances (a final waits for both);
- missed: utterances with no segment over them;
- noise: segments over no utterance (stream files: the gaps hold a faint noise floor).
Prints a table and writes JSON. webrtcvad only: runs in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from streamd.audio import read_audio  # noqa: E402
from streamd.config import VadConfig  # noqa: E402
from streamd.vad import RATE, SegmentEnded, VadSegmenter  # noqa: E402

AUDIO = REPO / "tests" / "data" / "audio"


def spans(audio, config: VadConfig) -> list[tuple[float, float]]:
    vad = VadSegmenter(config)
    events = []
    for i in range(0, len(audio), 1600):  # 100 ms frames, as clients send
        events += vad.accept(audio[i : i + 1600])
    events += vad.flush()
    return [(e.start / RATE, e.end / RATE) for e in events if isinstance(e, SegmentEnded)]


def utterances() -> list[tuple[str, object, list[tuple[float, float]]]]:
    """(name, audio, reference utterance spans in seconds) per file used."""
    out = []
    for folder in (AUDIO, AUDIO / "dev"):
        for line in (folder / "manifest.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            name = entry["audio"]
            if name.startswith(("cathy_multi_", "cathy_edge_")):
                continue
            audio = read_audio(folder / name)
            if entry.get("segments"):
                refs = [(s["start_s"], s["end_s"]) for s in entry["segments"]]
            else:
                refs = [(0.0, len(audio) / RATE)]
            out.append((name, audio, refs))
    return out


def score(files, config: VadConfig) -> dict:
    split = merged = missed = noise = total = segments = 0
    for _, audio, refs in files:
        found = spans(audio, config)
        segments += len(found)
        total += len(refs)
        for r0, r1 in refs:
            over = [s for s in found if s[0] < r1 and s[1] > r0]
            missed += not over
            split += len(over) > 1
        for s0, s1 in found:
            hits = sum(1 for r0, r1 in refs if s0 < r1 and s1 > r0)
            merged += hits > 1
            noise += hits == 0
    return {"utterances": total, "segments": segments, "split": split, "merged": merged,
            "missed": missed, "noise": noise}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint-ms", type=int, nargs="+", default=[300, 390, 450, 510, 600, 750])
    ap.add_argument("--min-speech-ms", type=int, nargs="+", default=[60, 90, 150, 250])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vad.json")
    args = ap.parse_args()
    files = utterances()
    base = VadConfig()
    rows = []
    for endpoint in args.endpoint_ms:
        for min_speech in args.min_speech_ms:
            config = dataclasses.replace(base, endpoint_silence_ms=endpoint,
                                         min_speech_ms=min_speech)
            row = {"endpoint_silence_ms": endpoint, "min_speech_ms": min_speech,
                   **score(files, config)}
            rows.append(row)
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"files": [f[0] for f in files],
                                    "defaults": dataclasses.asdict(base), "rows": rows},
                                   indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
