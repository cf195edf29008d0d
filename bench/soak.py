"""Soak test: `streamd serve` with MQTT on a real Mosquitto, N sessions reconnecting for as
long as asked, resources sampled every few seconds.

    python bench/soak.py --duration 1800                  # 30 min, real pipeline (whisper)
    python bench/soak.py --duration 120 --test-pipeline   # 2-min smoke run, test double
    python bench/soak.py --duration 600 --pipeline ctc --model /path/to/ctc

Each of `--sessions` (4) clients streams a recording from tests/data/audio at real time in
100 ms frames, sends `stop`, waits for `done`, and starts over on a new connection with
the next recording; one session in `--abort-every` (5) is dropped mid-audio instead (its
finals still go to MQTT). A subscriber on the broker receives the finals.
Every `--interval` (10) s a sample (counts are per interval): daemon RSS, open fds,
threads, event-loop tasks, sessions and connections open, engine queue and MQTT outbox
depth (from /metrics), final latency over the interval (WebSocket: the audio at the
final's `end` sent -> the final received, so it includes the endpoint's silence, about
0.2 s at real time; MQTT: the final's `ts` -> its arrival at the subscriber), finals and
sessions done. The series goes to bench/results/soak-<pipeline>-<time>.json (`--out`), with
a PNG next to it when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers.daemon import serve, test_pipeline_env  # noqa: E402
from helpers.mosquitto import Mosquitto  # noqa: E402

RATE = 16000
FRAME = RATE // 10  # 100 ms per message


def recordings(audio_dir: Path) -> list[tuple[str, bytes]]:
    """The shared utterance recordings (not the long stream file) as s16le with 0.5 s of
    silence before and 1 s after."""
    out = []
    for path in sorted(audio_dir.glob("*.wav")):
        audio, rate = sf.read(path, dtype="float32")
        if rate != RATE or audio.ndim != 1 or len(audio) > 30 * RATE:
            continue
        audio = np.concatenate([np.zeros(RATE // 2, np.float32), audio,
                                np.zeros(RATE, np.float32)])
        out.append((path.name, (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()))
    return out


def scrape(http: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


class Stats:
    def __init__(self) -> None:
        self.ws_latency: list[float] = []
        self.mqtt_latency: list[float] = []
        self.finals = 0
        self.mqtt_finals = 0
        self.sessions = 0
        self.aborted = 0
        self.errors: list[dict] = []
        self.errors_reported = 0

    def take(self) -> dict[str, Any]:
        out = {"final_latency_p50_s": pct(self.ws_latency, 50),
               "final_latency_p95_s": pct(self.ws_latency, 95),
               "final_latency_max_s": pct(self.ws_latency, 100),
               "mqtt_latency_p50_s": pct(self.mqtt_latency, 50),
               "mqtt_latency_p95_s": pct(self.mqtt_latency, 95),
               "finals": self.finals, "mqtt_finals": self.mqtt_finals,
               "sessions_done": self.sessions, "sessions_aborted": self.aborted,
               "errors": len(self.errors) - self.errors_reported}
        self.ws_latency, self.mqtt_latency = [], []
        self.finals = self.mqtt_finals = self.sessions = self.aborted = 0
        self.errors_reported = len(self.errors)
        return out


async def _read(ws: Any, sent: list[tuple[float, float]], stats: Stats) -> None:
    """Events up to `done`; a final's latency: from sending the audio at its `end`."""
    async for message in ws:
        event = json.loads(message)
        if event["type"] == "final":
            due = next((t for pos, t in sent if pos >= event["end"]), None)
            if due is not None:
                stats.ws_latency.append(time.monotonic() - due)
            stats.finals += 1
        elif event["type"] == "error":
            stats.errors.append(event)
        elif event["type"] == "done":
            return


async def client(url: str, clips: list[tuple[str, bytes]], index: int, stats: Stats,
                 stop_at: float, abort_every: int, rng: random.Random) -> None:
    from websockets.asyncio.client import connect

    turn = index
    while time.monotonic() < stop_at:
        name, data = clips[turn % len(clips)]
        turn += 1
        abort = abort_every > 0 and rng.randrange(abort_every) == 0
        cut = rng.randrange(FRAME * 2, len(data)) if abort else len(data)
        sent: list[tuple[float, float]] = []
        try:
            async with connect(url, open_timeout=30) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": RATE,
                                          "session": f"soak{index}-{turn}"}))

                reader = asyncio.create_task(_read(ws, sent, stats))
                t0 = time.monotonic()
                for i in range(0, cut, FRAME * 2):
                    await asyncio.sleep(max(0.0, t0 + i / 2 / RATE - time.monotonic()))
                    sent.append(((i + FRAME * 2) / 2 / RATE, time.monotonic()))
                    await ws.send(data[i : min(i + FRAME * 2, cut)])
                if abort:
                    reader.cancel()
                    ws.transport.abort()
                    stats.aborted += 1
                    continue
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 120)
                stats.sessions += 1
        except Exception as exc:  # noqa: BLE001 - recorded, the soak goes on
            stats.errors.append({"type": "client", "message": repr(exc)[:200]})
            await asyncio.sleep(1)


async def subscriber(broker: Mosquitto, stats: Stats) -> None:
    import aiomqtt

    while True:
        try:
            async with aiomqtt.Client(broker.host, broker.port, timeout=5) as mqtt:
                await mqtt.subscribe("streamd/+/final", qos=1)
                async for message in mqtt.messages:
                    payload = json.loads(message.payload)
                    stats.mqtt_finals += 1
                    stats.mqtt_latency.append(time.time() - payload["ts"])
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)


SERIES = {"rss_mb": ("process_resident_memory_bytes", 1 / 2**20),
          "open_fds": ("process_open_fds", 1), "threads": ("streamd_threads", 1),
          "loop_tasks": ("streamd_event_loop_tasks", 1),
          "sessions_active": ("streamd_sessions_active", 1),
          "connections_open": ("streamd_connections_open", 1),
          "engine_queue": ('streamd_queue_depth{queue="engine"}', 1),
          "mqtt_outbox": ('streamd_queue_depth{queue="mqtt_outbox"}', 1)}


async def soak(args: argparse.Namespace, http: str, url: str, broker: Mosquitto,
               clips: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    stats = Stats()
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    sub = asyncio.create_task(subscriber(broker, stats))
    clients = [asyncio.create_task(client(url, clips, i, stats, stop_at, args.abort_every, rng))
               for i in range(args.sessions)]
    samples = []
    try:
        while True:
            m = await asyncio.to_thread(scrape, http)
            sample = {"t_s": round(time.monotonic() - t0, 1)}
            for key, (name, scale) in SERIES.items():
                sample[key] = round(m.get(name, float("nan")) * scale, 2)
            sample.update(stats.take())
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            if time.monotonic() >= stop_at and all(c.done() for c in clients):
                break
            await asyncio.sleep(args.interval)
    finally:
        for task in (*clients, sub):
            task.cancel()
        await asyncio.gather(*clients, sub, return_exceptions=True)
    if stats.errors:
        print(f"errors: {stats.errors[:5]}", file=sys.stderr)
    return samples


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    # The first minute is warm-up (allocator arenas, first compilations of new shapes).
    settled = [s for s in samples if s["t_s"] >= 60] or samples
    rss = [s["rss_mb"] for s in settled]
    latency = [s["final_latency_p95_s"] for s in samples if s["final_latency_p95_s"] is not None]
    return {"rss_mb_first": samples[0]["rss_mb"], "rss_mb_settled_first": rss[0],
            "rss_mb_last": rss[-1], "rss_mb_max": max(rss),
            "open_fds_first": samples[0]["open_fds"], "open_fds_last": samples[-1]["open_fds"],
            "threads_max": max(s["threads"] for s in samples),
            "finals": sum(s["finals"] for s in samples),
            "mqtt_finals": sum(s["mqtt_finals"] for s in samples),
            "sessions_done": sum(s["sessions_done"] for s in samples),
            "sessions_aborted": sum(s["sessions_aborted"] for s in samples),
            "errors": sum(s["errors"] for s in samples),
            "final_latency_p95_median_s": statistics.median(latency) if latency else None,
            "final_latency_p95_worst_s": max(latency) if latency else None}


def plot(samples: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s["t_s"] / 60 for s in samples]
    panels = [("rss_mb", "RSS (MB)"), ("open_fds", "open fds"), ("threads", "threads"),
              ("engine_queue", "engine queue"), ("mqtt_outbox", "MQTT outbox"),
              ("final_latency_p95_s", "final latency p95 (s)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(t, [s[key] if s[key] is not None else float("nan") for s in samples])
        ax.set_ylabel(label)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800, help="seconds (default 1800)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="sample period, seconds")
    parser.add_argument("--abort-every", type=int, default=5,
                        help="one session in N is dropped mid-audio (0: never)")
    parser.add_argument("--pipeline", default=None, help="daemon pipeline (default whisper)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--test-pipeline", action="store_true",
                        help="the tests' fast double instead of a model (smoke runs)")
    parser.add_argument("--audio-dir", type=Path, default=REPO / "tests" / "data" / "audio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    clips = recordings(args.audio_dir)
    if not clips:
        print(f"no 16 kHz recordings in {args.audio_dir}", file=sys.stderr)
        return 2
    pipeline = "test" if args.test_pipeline else (args.pipeline or "whisper")
    out = args.out or REPO / "bench" / "results" / (
        f"soak-{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    daemon_args = [a for flag, value in (("--pipeline", args.pipeline), ("--model", args.model))
                   if value for a in (flag, value)]
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
        samples = asyncio.run(soak(args, daemon.http, daemon.url, broker, clips))
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "duration_s": args.duration, "sessions": args.sessions,
              "pipeline": pipeline, "model": args.model, "interval_s": args.interval,
              "abort_every": args.abort_every, "recordings": [n for n, _ in clips],
              "summary": summary(samples), "samples": samples}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out}" + (f" and {png}" if plot(samples, png) else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
