"""Peer for bench/stream.py: WhisperLiveKit's LocalAgreement-2 over faster-whisper (tiny.en).

The policy is WhisperLiveKit's own (PyPI `whisperlivekit`, its `local_agreement` backend:
ufal/whisper_streaming's `OnlineASRProcessor` and hypothesis buffer, Macháček et al.
2023), its `FasterWhisperASR` backend on the same tiny.en
CTranslate2 folder streamd embeds (compute type as WhisperLiveKit picks it: "auto").
As whisper_streaming runs it by default: every second of new audio the uncommitted buffer
is transcribed (beam 5, word timestamps, committed text as the prompt), the words two
consecutive hypotheses agree on are committed, the buffer is trimmed at completed
segments past 15 s. No VAD (WhisperLiveKit's optional Silero VAC is not used).

    python bench/peer_localagreement.py --streams 4 --json out.json

Install: `make bench-deps` (whisperlivekit without its dependencies: it requires
torchaudio, which would replace the CPU torch with a CUDA build; the LocalAgreement path
needs torch, tiktoken and numba, from the `bench` extra).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from stream import RATE, REPO, pct, shared_stream, speech_onsets, wer  # noqa: E402

MIN_CHUNK_S = 1.0  # whisper_streaming's default --min-chunk-size
BUFFER_TRIM_S = 15.0  # WhisperLiveKit's default buffer_trimming_sec


@dataclass
class Word:
    start: float  # seconds of stream audio
    end: float
    text: str
    committed_at: float  # monotonic time of the commit


def load_asr():
    """WhisperLiveKit's faster-whisper ASR on the embedded tiny.en folder, set up as its
    `backend_factory` sets it up (which would also import librosa for a warm-up clip)."""
    from whisperlivekit.local_agreement.backends import FasterWhisperASR

    from models.registry import resolve_model

    asr = FasterWhisperASR(lan="en", model_dir=str(resolve_model("tiny.en")))
    asr.confidence_validation = False
    asr.tokenizer = None  # only "sentence" trimming uses one
    asr.buffer_trimming = "segment"
    asr.buffer_trimming_sec = BUFFER_TRIM_S
    return asr


def run_stream(asr, audio: np.ndarray, delay: float, result: dict) -> None:
    from whisperlivekit.local_agreement.online_asr import OnlineASRProcessor

    time.sleep(delay)
    proc = OnlineASRProcessor(asr)
    words: list[Word] = []

    def keep(tokens) -> None:
        now = time.monotonic()
        words.extend(Word(t.start, t.end, t.text, now) for t in tokens)

    t0 = time.monotonic()
    done = 0
    while done < len(audio):
        # Wait until at least MIN_CHUNK_S of new audio has "arrived" (real time).
        arrived = min(len(audio), int((time.monotonic() - t0) * RATE))
        if arrived - done < MIN_CHUNK_S * RATE and arrived < len(audio):
            time.sleep((done + MIN_CHUNK_S * RATE - arrived) / RATE)
            continue
        proc.insert_audio_chunk(audio[done:arrived])
        keep(proc.process_iter()[0])
        done = arrived
    keep(proc.finish()[0])
    result["words"], result["t0"] = words, t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--audio-dir", type=Path, default=REPO / "tests" / "data" / "audio")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    audio, entry = shared_stream(args.audio_dir)
    asr = load_asr()
    asr.transcribe(np.zeros(RATE, np.float32))  # load everything once
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    results = [dict() for _ in range(args.streams)]
    threads = [threading.Thread(target=run_stream, args=(asr, audio, 0.37 * i, results[i]))
               for i in range(args.streams)]
    wall0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    final, first, onset_first, wers = [], [], [], []
    onsets = speech_onsets(audio, entry)
    for r in results:
        words, t0 = r["words"], r["t0"]
        wers.append(wer([s["text"] for s in entry["segments"]], [w.text for w in words]))
        for seg, onset in zip(entry["segments"], onsets, strict=True):
            mine = [w for w in words if seg["start_s"] <= (w.start + w.end) / 2 < seg["end_s"]]
            if mine:
                final.append(max(w.committed_at for w in mine) - (t0 + seg["end_s"]))
                first.append(mine[0].committed_at - (t0 + mine[0].start))
                onset_first.append(mine[0].committed_at - (t0 + onset))
    row = {
        "system": "peer-WhisperLiveKit-LA2", "streams": args.streams,
        "final_median_s": statistics.median(final) if final else None,
        "final_p90_s": pct(final, 90), "endpoint_median_s": None, "endpoint_p90_s": None,
        "first_partial_median_s": statistics.median(first) if first else None,
        "first_partial_p90_s": pct(first, 90),
        "onset_partial_median_s": statistics.median(onset_first) if onset_first else None,
        "onset_partial_p90_s": pct(onset_first, 90),
        "cpu_s_per_audio_s": cpu / (args.streams * len(audio) / RATE),
        "wall_s": time.monotonic() - wall0, "wer": statistics.mean(wers),
        "whisperlivekit": _version("whisperlivekit"), "compute_type": "auto",
    }  # fmt: skip
    args.json.write_text(json.dumps(row, indent=2))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
