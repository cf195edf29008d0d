"""Peer for bench/stream.py: LocalAgreement-2 streaming over faster-whisper (tiny.en).

A re-implementation of the policy loop of ufal/whisper_streaming's `OnlineASRProcessor`
(Macháček et al. 2023), as that project runs it by default: every second of new audio
the whole uncommitted buffer is transcribed (beam 5, word timestamps, the committed text
as the initial prompt); the words two consecutive hypotheses agree on (after dropping
words before the last commit and an n-gram overlap with it) are committed; the audio
buffer is trimmed at the end of a completed segment once it is over 15 s. No VAD.

    python bench/peer_localagreement.py --streams 4 --json out.json

Runs N real-time streams of the shared stream recording in threads over one model, and
reports the same measures as bench/stream.py: final latency (utterance end sent -> its
last word committed), first-output latency (a word's onset sent -> that first word of
the utterance committed), CPU seconds per audio second of this process, WER.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from stream import RATE, REPO, pct, shared_stream, wer  # noqa: E402

MIN_CHUNK_S = 1.0
BUFFER_TRIM_S = 15.0


@dataclass
class Word:
    start: float  # seconds of stream audio
    end: float
    text: str
    committed_at: float = 0.0  # monotonic time of the commit


@dataclass
class Agreement:
    """The hypothesis buffer: commits the prefix two consecutive hypotheses share."""

    committed: list[Word] = field(default_factory=list)  # still inside the audio buffer
    previous: list[Word] = field(default_factory=list)
    new: list[Word] = field(default_factory=list)
    last_time: float = 0.0

    def insert(self, words: list[Word]) -> None:
        new = [w for w in words if w.start > self.last_time - 0.1]
        if new and self.committed and abs(new[0].start - self.last_time) < 1:
            # Drop a 1-5 word n-gram at the head that repeats the committed tail.
            for n in range(min(len(self.committed), len(new), 5), 0, -1):
                tail = [w.text.strip() for w in self.committed[-n:]]
                if tail == [w.text.strip() for w in new[:n]]:
                    new = new[n:]
                    break
        self.new = new

    def flush(self, now: float) -> list[Word]:
        out = []
        while self.new and self.previous and self.new[0].text == self.previous[0].text:
            word = self.new.pop(0)
            self.previous.pop(0)
            word.committed_at = now
            self.last_time = word.end
            out.append(word)
        self.previous, self.new = self.new, []
        self.committed += out
        return out

    def drop_before(self, t: float) -> None:
        self.committed = [w for w in self.committed if w.end > t]


class OnlineProcessor:
    def __init__(self, model) -> None:
        self.model = model
        self.audio = np.zeros(0, np.float32)
        self.offset = 0.0  # stream time of the buffer's first sample
        self.agreement = Agreement()
        self.output: list[Word] = []

    def process(self, chunk: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, chunk])
        prompt = " ".join(w.text.strip() for w in self.output if w.end <= self.offset)[-200:]
        segments, _ = self.model.transcribe(
            self.audio, language="en", beam_size=5, word_timestamps=True,
            condition_on_previous_text=True, initial_prompt=prompt or None, vad_filter=False,
        )  # fmt: skip
        segments = list(segments)
        words = [Word(w.start + self.offset, w.end + self.offset, w.word)
                 for s in segments for w in (s.words or [])]
        self.agreement.insert(words)
        self.output += self.agreement.flush(time.monotonic())
        if len(self.audio) / RATE > BUFFER_TRIM_S and len(segments) > 1:
            # Trim at the end of the last completed segment that is already committed.
            cut = None
            for s in segments[:-1]:
                end = s.end + self.offset
                if end <= self.agreement.last_time:
                    cut = end
            if cut is not None:
                self.agreement.drop_before(cut)
                self.audio = self.audio[int((cut - self.offset) * RATE):]
                self.offset = cut

    def finish(self) -> None:
        now = time.monotonic()
        for word in self.agreement.previous:
            word.committed_at = now
        self.output += self.agreement.previous


def run_stream(model, audio: np.ndarray, delay: float, result: dict) -> None:
    time.sleep(delay)
    proc = OnlineProcessor(model)
    t0 = time.monotonic()
    done = 0
    while done < len(audio):
        # Wait until at least MIN_CHUNK_S of new audio has "arrived" (real time).
        arrived = min(len(audio), int((time.monotonic() - t0) * RATE))
        if arrived - done < MIN_CHUNK_S * RATE and arrived < len(audio):
            time.sleep((done + MIN_CHUNK_S * RATE - arrived) / RATE)
            continue
        proc.process(audio[done:arrived])
        done = arrived
    proc.finish()
    result["words"], result["t0"] = proc.output, t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--audio-dir", type=Path, default=REPO.parent / "shared" / "audio")
    ap.add_argument("--compute-type", default="float32")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    from faster_whisper import WhisperModel

    from models.registry import resolve_model

    audio, entry = shared_stream(args.audio_dir)
    model = WhisperModel(str(resolve_model("tiny.en")), device="cpu", cpu_threads=2,
                         num_workers=args.streams, compute_type=args.compute_type)
    model.transcribe(np.zeros(RATE, np.float32), language="en")  # load everything once
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    results = [dict() for _ in range(args.streams)]
    threads = [threading.Thread(target=run_stream, args=(model, audio, 0.37 * i, results[i]))
               for i in range(args.streams)]
    wall0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    final, first, wers = [], [], []
    for r in results:
        words, t0 = r["words"], r["t0"]
        wers.append(wer([s["text"] for s in entry["segments"]], [w.text for w in words]))
        for seg in entry["segments"]:
            mine = [w for w in words if seg["start_s"] <= (w.start + w.end) / 2 < seg["end_s"]]
            if mine:
                final.append(max(w.committed_at for w in mine) - (t0 + seg["end_s"]))
                first.append(mine[0].committed_at - (t0 + mine[0].start))
    row = {
        "system": "peer-LA2-faster-whisper", "streams": args.streams,
        "final_median_s": statistics.median(final) if final else None,
        "final_p90_s": pct(final, 90), "endpoint_median_s": None, "endpoint_p90_s": None,
        "first_partial_median_s": statistics.median(first) if first else None,
        "first_partial_p90_s": pct(first, 90),
        "cpu_s_per_audio_s": cpu / (args.streams * len(audio) / RATE),
        "wall_s": time.monotonic() - wall0, "wer": statistics.mean(wers),
        "compute_type": args.compute_type,
    }  # fmt: skip
    args.json.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
