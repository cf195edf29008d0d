"""Soak test: `streamd serve` (tiny.en by default) publishing to a real Mosquitto, N
real-time sessions reconnecting for as long as asked, resources sampled every 10 s, and
the issue's pass/fail criteria at the end.

    python bench/soak.py --minutes 30                          # the soak (tiny.en, CPU)
    python bench/soak.py --minutes 3 --out /tmp/soak-3min.json # a validation run
    python bench/soak.py --minutes 2 --test-pipeline           # smoke run, test double

Each of `--sessions` (4) clients streams a recording from tests/data/audio at real time in
100 ms frames, sends `stop`, waits for `done`, and starts over on a new connection with
the next recording; one session in `--abort-every` (5) is dropped mid-speech instead (its
final still goes to MQTT). A subscriber on the broker receives every final.
Every `--interval` (10) s a sample: daemon RSS, open fds, threads, event-loop tasks,
sessions and connections open, engine queue and MQTT outbox depth (all from /metrics),
final latency over the interval (WebSocket: the audio at the final's `end` sent -> the
final received, so it includes the endpoint's silence; MQTT: the final's `ts` -> its
arrival at the subscriber), finals and sessions done.

The criteria (the first and last window are 5 minutes, or a fifth of a shorter run):
RSS at the end within 10 % of RSS after the first window; open fds and threads flat (the
last window's highest sample no higher than the first window's; fds may differ by the
sessions that are reconnecting at the instant of a sample); final latency p90 over the
last window within 20 % of the first window's; zero finals lost (every session that
finished has each of its WebSocket finals, same segment and text, on the subscriber and
at least one; every session dropped mid-speech has at least one final there); no client
error. Exit status 0 when all pass.

Writes the series and the criteria to bench/results/soak.json (`--out`) and a plot of
RSS and latency over time next to it (.png; matplotlib, from the bench extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers.daemon import serve, test_pipeline_env  # noqa: E402
from helpers.mosquitto import Mosquitto, Subscriber  # noqa: E402

RATE = 16000
FRAME_BYTES = RATE // 10 * 2  # 100 ms of s16le per message
LEAD_S, TAIL_S = 0.5, 1.0  # silence around each recording: one utterance per session
WINDOW_S = 300.0  # the criteria's first and last window, on a run of 25 minutes or more
RSS_TOLERANCE = 0.10
LATENCY_TOLERANCE = 0.20


@dataclass
class Recording:
    name: str
    pcm: bytes  # s16le with the silence around it
    speech_bytes: tuple[int, int]  # where the utterance lies in `pcm`


def recordings(audio_dir: Path) -> list[Recording]:
    """The shared utterance recordings (not the long stream file)."""
    out = []
    for path in sorted(audio_dir.glob("*.wav")):
        audio, rate = sf.read(path, dtype="float32")
        if rate != RATE or audio.ndim != 1 or len(audio) > 30 * RATE:
            continue
        lead = int(LEAD_S * RATE)
        padded = np.concatenate([np.zeros(lead, np.float32), audio,
                                 np.zeros(int(TAIL_S * RATE), np.float32)])
        pcm = (np.clip(padded, -1, 1) * 32767).astype("<i2").tobytes()
        out.append(Recording(path.name, pcm, (2 * lead, 2 * (lead + len(audio)))))
    return out


@dataclass
class Session:
    """One connection of one client: what it sent and what it got back."""

    id: str
    recording: str
    aborted: bool = False
    done: bool = False
    ws_finals: dict[int, str] = field(default_factory=dict)  # segment -> text


@dataclass
class Run:
    """Everything measured, shared by the clients, the subscriber and the sampler."""

    t0: float = field(default_factory=time.monotonic)
    sessions: list[Session] = field(default_factory=list)
    ws_latency: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    mqtt_latency: list[tuple[float, float]] = field(default_factory=list)
    mqtt_finals: dict[tuple[str, int], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0


def scrape(http: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


async def _read(ws: Any, session: Session, sent: list[tuple[float, float]], run: Run) -> None:
    """Events up to `done`; a final's latency: from sending the audio at its `end`."""
    async for message in ws:
        event = json.loads(message)
        if event["type"] == "final":
            due = next((t for pos, t in sent if pos >= event["end"]), None)
            if due is not None:
                run.ws_latency.append((run.now(), time.monotonic() - due))
            session.ws_finals[event["segment"]] = event["text"]
        elif event["type"] == "error":
            run.errors.append(f"{session.id}: {event}")
        elif event["type"] == "done":
            session.done = True
            return


async def client(url: str, clips: list[Recording], index: int, run: Run, stop_at: float,
                 abort_every: int, rng: random.Random) -> None:
    from websockets.asyncio.client import connect

    turn = index
    while time.monotonic() < stop_at:
        clip = clips[turn % len(clips)]
        turn += 1
        session = Session(f"soak{index}-{turn}", clip.name,
                          aborted=abort_every > 0 and rng.randrange(abort_every) == 0)
        run.sessions.append(session)
        # Dropped sessions are cut in the second half of the speech, so each has an
        # utterance whose final the daemon must still publish.
        begin, end = clip.speech_bytes
        cut = (rng.randrange((begin + end) // 2, end) // 2 * 2 if session.aborted
               else len(clip.pcm))
        sent: list[tuple[float, float]] = []  # (audio seconds sent, monotonic time)
        try:
            async with connect(url, open_timeout=30) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": RATE,
                                          "session": session.id}))
                reader = asyncio.create_task(_read(ws, session, sent, run))
                t0 = time.monotonic()
                for i in range(0, cut, FRAME_BYTES):
                    await asyncio.sleep(max(0.0, t0 + i / 2 / RATE - time.monotonic()))
                    chunk = clip.pcm[i : min(i + FRAME_BYTES, cut)]
                    sent.append(((i + len(chunk)) / 2 / RATE, time.monotonic()))
                    await ws.send(chunk)
                if session.aborted:
                    reader.cancel()
                    ws.transport.abort()
                    continue
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 120)
        except Exception as exc:  # noqa: BLE001 - recorded, the soak goes on
            run.errors.append(f"{session.id}: {exc!r:.200}")
            await asyncio.sleep(1)


async def collect_finals(sub: Subscriber, run: Run) -> None:
    """Moves the subscriber's finals into `run` as they arrive (duplicates dropped)."""
    seen = 0
    while True:
        await asyncio.sleep(0.2)
        for message, arrived in zip(sub.messages[seen:], sub.arrived[seen:], strict=True):
            payload = json.loads(message.payload)
            key = (payload["session"], payload["segment"])
            if key not in run.mqtt_finals:
                run.mqtt_finals[key] = payload["text"]
                run.mqtt_latency.append((run.now(), arrived - payload["ts"]))
        seen = len(sub.messages)


SERIES = {"rss_mb": ("process_resident_memory_bytes", 1 / 2**20),
          "open_fds": ("process_open_fds", 1), "threads": ("streamd_threads", 1),
          "loop_tasks": ("streamd_event_loop_tasks", 1),
          "sessions_active": ("streamd_sessions_active", 1),
          "connections_open": ("streamd_connections_open", 1),
          "engine_queue": ('streamd_queue_depth{queue="engine"}', 1),
          "mqtt_outbox": ('streamd_queue_depth{queue="mqtt_outbox"}', 1)}


def sample(metrics: dict[str, float], run: Run, since: float) -> dict[str, Any]:
    out: dict[str, Any] = {"t_s": round(run.now(), 1)}
    for key, (name, scale) in SERIES.items():
        out[key] = round(metrics.get(name, float("nan")) * scale, 2)
    ws = [x for t, x in run.ws_latency if t >= since]
    mqtt = [x for t, x in run.mqtt_latency if t >= since]
    out.update(final_latency_p50_s=pct(ws, 50), final_latency_p90_s=pct(ws, 90),
               mqtt_latency_p90_s=pct(mqtt, 90), finals=len(ws), mqtt_finals=len(mqtt),
               sessions_started=len(run.sessions), errors=len(run.errors))
    return out


async def soak(args: argparse.Namespace, http: str, url: str, broker: Mosquitto,
               clips: list[Recording]) -> tuple[Run, list[dict[str, Any]]]:
    run = Run()
    rng = random.Random(args.seed)
    stop_at = run.t0 + args.minutes * 60
    samples: list[dict[str, Any]] = []
    async with Subscriber(broker, ["streamd/+/final"]) as sub:
        collector = asyncio.create_task(collect_finals(sub, run))
        clients = [asyncio.create_task(client(url, clips, i, run, stop_at, args.abort_every,
                                              rng)) for i in range(args.sessions)]
        try:
            since = 0.0
            while True:
                metrics = await asyncio.to_thread(scrape, http)
                samples.append(sample(metrics, run, since))
                since = samples[-1]["t_s"]
                print(json.dumps(samples[-1]), flush=True)
                if time.monotonic() >= stop_at and all(c.done() for c in clients):
                    break
                # After the end, the last sample as soon as the last session is done.
                await asyncio.wait(clients, timeout=args.interval)
            # The last finals on their way to the subscriber: the outbox empty, then quiet.
            deadline = time.monotonic() + 60
            count = -1
            while time.monotonic() < deadline:
                metrics = await asyncio.to_thread(scrape, http)
                if count == len(run.mqtt_finals) and not metrics.get(SERIES["mqtt_outbox"][0]):
                    break
                count = len(run.mqtt_finals)
                await asyncio.sleep(1)
        finally:
            for task in (*clients, collector):
                task.cancel()
            await asyncio.gather(*clients, collector, return_exceptions=True)
    return run, samples


def lost_finals(run: Run) -> list[str]:
    """Sessions with an utterance whose final did not reach the subscriber."""
    by_session: dict[str, dict[int, str]] = {}
    for (sid, segment), text in run.mqtt_finals.items():
        by_session.setdefault(sid, {})[segment] = text
    lost = []
    for s in run.sessions:
        published = by_session.get(s.id, {})
        if s.aborted:
            if not published:
                lost.append(f"{s.id} (dropped mid-speech): no final on MQTT")
        elif s.done:
            missing = {k: v for k, v in s.ws_finals.items() if published.get(k) != v}
            if missing or not s.ws_finals:
                lost.append(f"{s.id}: WebSocket {s.ws_finals} MQTT {published}")
    return lost


def criteria(run: Run, samples: list[dict[str, Any]], duration_s: float,
             sessions: int) -> dict[str, Any]:
    """The issue's must-show figures, each with its limit and pass/fail."""
    window = min(WINDOW_S, duration_s / 5)
    first = [s for s in samples if s["t_s"] <= window]
    last = [s for s in samples if s["t_s"] >= duration_s - window]
    rss_ref = next(s["rss_mb"] for s in samples if s["t_s"] >= window or s is samples[-1])
    rss_end = samples[-1]["rss_mb"]
    lat_first = pct([x for t, x in run.ws_latency if t <= window], 90)
    lat_last = pct([x for t, x in run.ws_latency if t >= duration_s - window], 90)
    fds_first, fds_last = max(s["open_fds"] for s in first), max(s["open_fds"] for s in last)
    thr_first, thr_last = max(s["threads"] for s in first), max(s["threads"] for s in last)
    lost = lost_finals(run)
    done = sum(s.done for s in run.sessions)
    dropped = sum(s.aborted for s in run.sessions)
    checks = {
        "rss_end_within_10pct": {
            "rss_mb_after_first_window": rss_ref, "rss_mb_end": rss_end,
            "change_pct": round(100 * (rss_end - rss_ref) / rss_ref, 2),
            "pass": abs(rss_end - rss_ref) <= RSS_TOLERANCE * rss_ref},
        "open_fds_flat": {"max_first_window": fds_first, "max_last_window": fds_last,
                          "pass": fds_last <= fds_first + sessions},
        "threads_flat": {"max_first_window": thr_first, "max_last_window": thr_last,
                         "pass": thr_last <= thr_first},
        "latency_p90_within_20pct": {
            "p90_first_window_s": lat_first, "p90_last_window_s": lat_last,
            "pass": (lat_first is not None and lat_last is not None
                     and lat_last <= (1 + LATENCY_TOLERANCE) * lat_first)},
        "zero_finals_lost": {
            "sessions_done": done, "sessions_dropped_mid_speech": dropped,
            "websocket_finals": sum(len(s.ws_finals) for s in run.sessions),
            "mqtt_finals": len(run.mqtt_finals), "lost": lost[:20], "lost_count": len(lost),
            "pass": not lost and done > 0},
        "no_client_errors": {"errors": run.errors[:20], "error_count": len(run.errors),
                             "pass": not run.errors},
    }
    return {"window_s": window, "checks": checks,
            "pass": all(c["pass"] for c in checks.values())}


def plot(samples: list[dict[str, Any]], run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples])
    axes[0].set_ylabel("RSS (MiB)")
    axes[0].set_ylim(bottom=0)
    axes[1].scatter([x / 60 for x, _ in run.ws_latency], [y for _, y in run.ws_latency], s=4,
                    alpha=0.4, label="each final")
    axes[1].plot(t, [s["final_latency_p90_s"] if s["final_latency_p90_s"] is not None
                     else float("nan") for s in samples], color="C1", label="p90 per sample")
    axes[1].set_ylabel("final latency (s)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(loc="upper right", fontsize="small")
    for key in ("open_fds", "threads"):
        axes[2].plot(t, [s[key] for s in samples], label=key)
    axes[2].set_ylim(bottom=0)
    axes[2].legend(loc="upper right", fontsize="small")
    for key in ("engine_queue", "mqtt_outbox"):
        axes[3].plot(t, [s[key] for s in samples], label=key)
    axes[3].legend(loc="upper right", fontsize="small")
    axes[3].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length (default 30)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="sample period, seconds")
    parser.add_argument("--abort-every", type=int, default=5,
                        help="one session in N is dropped mid-speech (0: never)")
    parser.add_argument("--pipeline", default=None, help="daemon pipeline (default whisper)")
    parser.add_argument("--model", default=None, help="default: the pipeline's (tiny.en)")
    parser.add_argument("--test-pipeline", action="store_true",
                        help="the tests' fast double instead of a model (smoke runs)")
    parser.add_argument("--audio-dir", type=Path, default=REPO / "tests" / "data" / "audio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    parser.add_argument("--no-plot", action="store_true",
                        help="no PNG (matplotlib comes with the bench extra only)")
    args = parser.parse_args()

    clips = recordings(args.audio_dir)
    if not clips:
        print(f"no 16 kHz recordings in {args.audio_dir}", file=sys.stderr)
        return 2
    pipeline = "test" if args.test_pipeline else (args.pipeline or "whisper")
    daemon_args = [a for flag, value in (("--pipeline", args.pipeline), ("--model", args.model))
                   if value for a in (flag, value)]
    daemon_args += ["--max-sessions", str(max(16, args.sessions))]
    env = {"STREAMD_SERVER_CONNECTION_RATE": "0",
           **(test_pipeline_env() if args.test_pipeline else {})}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        broker = stack.enter_context(Mosquitto(work))
        daemon = stack.enter_context(serve(
            work, "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
            "--mqtt-journal", str(work / "journal.sqlite"), *daemon_args, env=env,
            startup_timeout=900))
        started = time.time()
        run, samples = asyncio.run(soak(args, daemon.http, daemon.url, broker, clips))
    verdict = criteria(run, samples, args.minutes * 60, args.sessions)
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "minutes": args.minutes, "sessions": args.sessions, "pipeline": pipeline,
              "model": args.model or ("tiny.en" if pipeline == "whisper" else None),
              "interval_s": args.interval, "abort_every": args.abort_every,
              "recordings": [c.name for c in clips], "criteria": verdict, "samples": samples,
              "final_latency_s": [[round(t, 1), round(x, 4)] for t, x in run.ws_latency],
              "mqtt_latency_s": [[round(t, 1), round(x, 4)] for t, x in run.mqtt_latency]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    if not args.no_plot:
        plot(samples, run, png)
    window = verdict["window_s"]
    print(f"\ncriteria (first and last {window:g} s of {args.minutes * 60:g} s):")
    for name, check in verdict["checks"].items():
        figures = {k: v for k, v in check.items() if k not in ("pass", "lost", "errors")}
        print(f"  {'PASS' if check['pass'] else 'FAIL'}  {name}: {figures}")
        for line in check.get("lost", []) + check.get("errors", []):
            print(f"        {line}")
    print(f"{'PASS' if verdict['pass'] else 'FAIL'}; wrote {args.out}"
          + ("" if args.no_plot else f" and {png}"))
    return 0 if verdict["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
