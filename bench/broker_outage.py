"""Broker outage under load: `streamd serve` (the tests' fast pipeline) with N sessions
streaming at real time while the MQTT broker (a real Mosquitto) is down for `--outage`
seconds; does every final reach the subscriber once the broker is back?

    python bench/broker_outage.py                         # 10-min outage, 4 sessions
    python bench/broker_outage.py --outage 60 --sessions 8 --outbox 200

Each client streams three recordings (tests/data/audio, 1 s of silence around each) at
real time in 100 ms frames, sends `stop`, waits for `done`, and starts a new session, from
`--before` s before the outage until `--after` s after it; then the last sessions finish.
A persistent subscriber (the broker keeps its QoS 1 messages across its own restart)
collects `speech_start`, `final` and `done`. The broker is stopped gracefully (SIGTERM).
Every second: /healthz (MQTT state, outbox entries, events waiting for room) and /metrics
(journal bytes, longest back-pressure wait, daemon RSS).

Reported: finals the WebSocket clients received vs the subscriber received (de-duplicated
on session and seq; a final is in the journal before its client gets it, so both counts
must match), all journaled events likewise, the outbox peak against its bound, the journal
peak, the longest wait of a session for outbox room (back-pressure: the daemon holds a
session up rather than drop a final) and the daemon's RSS. Table on stdout, JSON to
bench/results/broker_outage.json (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import websockets

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers.daemon import serve, speech_audio, test_pipeline_env  # noqa: E402
from helpers.mosquitto import Mosquitto, Subscriber, first_seen  # noqa: E402

RATE = 16000
FRAME = RATE // 10  # 100 ms per message
JOURNALED = ("speech_start", "final", "done")


def scrape(http: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines() if line and not line.startswith("#")}


def healthz(http: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{http}/healthz", timeout=10) as r:
        return {"code": r.status, **json.load(r)}


class Load:
    """Clients that start sessions until `running` is cleared; what they received."""

    def __init__(self, url: str, audio: bytes) -> None:
        self.url, self.audio = url, audio
        self.running = True
        self.sessions: dict[str, list[dict]] = {}  # complete sessions' events up to done
        self.errors: list[str] = []

    async def client(self, index: int) -> None:
        k = 0
        while self.running:
            session = f"load{index}-{k}"
            k += 1
            try:
                self.sessions[session] = await self.session(session)
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                self.errors.append(f"{session}: {exc!r}")
                await asyncio.sleep(1)

    async def session(self, session: str) -> list[dict]:
        events: list[dict] = []
        async with websockets.connect(self.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "channels": 1,
                                      "encoding": "pcm_s16le", "session": session}))

            async def read() -> None:
                while not events or events[-1]["type"] != "done":
                    events.append(json.loads(await ws.recv()))

            reader = asyncio.create_task(read())
            t0 = time.monotonic()
            step = 2 * FRAME
            for n, i in enumerate(range(0, len(self.audio), step)):
                await ws.send(self.audio[i : i + step])
                # Real time on average: a session held up by back-pressure catches up.
                await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.1 - time.monotonic()))
            await ws.send(json.dumps({"type": "stop"}))
            await reader
        return events


async def run(args: argparse.Namespace, http: str, url: str, broker: Mosquitto,
              audio: bytes) -> dict[str, Any]:
    topics = [f"streamd/+/{kind}" for kind in JOURNALED]
    sub_id = "broker-outage-bench"
    samples: list[dict[str, Any]] = []
    load = Load(url, audio)
    phase = "before"

    async def sample() -> None:
        t_start = time.monotonic()
        while True:
            health = await asyncio.to_thread(healthz, http)
            m = await asyncio.to_thread(scrape, http)
            samples.append({
                "t": round(time.monotonic() - t_start, 1), "phase": phase,
                "code": health["code"], "state": health["mqtt"]["state"],
                "outbox": health["mqtt"]["outbox"], "waiting": health["mqtt"]["waiting"],
                "journal_bytes": m.get("streamd_mqtt_journal_bytes", 0),
                "backpressure_max_s": m.get("streamd_mqtt_backpressure_max_seconds", 0),
                "rss_bytes": m.get("process_resident_memory_bytes", 0),
                "sessions": health["sessions"]})
            await asyncio.sleep(1)

    async with Subscriber(broker, topics, persistent=True, client_id=sub_id) as sub:
        sampler = asyncio.create_task(sample())
        clients = [asyncio.create_task(load.client(i)) for i in range(args.sessions)]
        await asyncio.sleep(args.before)
        phase = "outage"
        print(f"broker down for {args.outage:g} s", file=sys.stderr)
        await asyncio.to_thread(broker.stop)
        t_down = time.monotonic()
        while time.monotonic() - t_down < args.outage:
            await asyncio.sleep(min(30.0, args.outage - (time.monotonic() - t_down)))
            if samples:
                s = samples[-1]
                print(f"  {time.monotonic() - t_down:5.0f} s: outbox {s['outbox']}, waiting "
                      f"{s['waiting']}, sessions done {len(load.sessions)}", file=sys.stderr)
        await asyncio.to_thread(broker.start)
        phase = "after"
        t_up = time.monotonic()
        await asyncio.sleep(args.after)
        load.running = False
        await asyncio.wait_for(asyncio.gather(*clients), 300)
        want = {(s, e["type"], e.get("segment")) for s, events in load.sessions.items()
                for e in events if e["type"] in JOURNALED}

        def received() -> list[dict]:
            return first_seen([json.loads(m.payload) for m in sub.messages])

        with contextlib.suppress(TimeoutError):
            await sub.wait_for(lambda _: want <= {(p["session"], p["type"], p.get("segment"))
                                                  for p in received()}, timeout=120)
        after = [s for s in samples if s["phase"] == "after"]
        drained = [s for s in after if s["outbox"] == 0 and s["state"] == "connected"]
        # From the broker's return to the first sample with an empty outbox (1 s steps).
        drained_s = drained[0]["t"] - after[0]["t"] + 1 if drained else None
        sampler.cancel()
        got = received()
    ws_finals = {(s, e["segment"]) for s, events in load.sessions.items()
                 for e in events if e["type"] == "final"}
    mqtt_finals = {(p["session"], p["segment"]) for p in got if p["type"] == "final"}
    got_keys = {(p["session"], p["type"], p.get("segment")) for p in got}
    in_order = all(
        [p["seq"] for p in got if p["session"] == s] ==
        sorted(p["seq"] for p in got if p["session"] == s) for s in load.sessions)
    outage = [s for s in samples if s["phase"] == "outage"]
    return {
        "sessions_completed": len(load.sessions),
        "client_errors": load.errors[:20], "client_error_count": len(load.errors),
        "finals_sent": len(ws_finals), "finals_received": len(ws_finals & mqtt_finals),
        "finals_lost": sorted(ws_finals - mqtt_finals)[:20],
        "events_sent": len(want), "events_received": len(want & got_keys),
        "duplicates_dropped": len(sub.messages) - len(got),
        "seq_in_order": in_order,
        "outbox_max": max(s["outbox"] for s in samples),
        "outbox_bound": args.outbox,
        "waiting_max": max(s["waiting"] for s in samples),
        "journal_bytes_max": max(s["journal_bytes"] for s in samples),
        "backpressure_max_s": round(max(s["backpressure_max_s"] for s in samples), 1),
        "rss_mb_before": round(samples[0]["rss_bytes"] / 2**20, 1),
        "rss_mb_max": round(max(s["rss_bytes"] for s in samples) / 2**20, 1),
        "rss_mb_end": round(samples[-1]["rss_bytes"] / 2**20, 1),
        "healthz_codes_during_outage": sorted({s["code"] for s in outage}),
        "mqtt_states_during_outage": sorted({s["state"] for s in outage}),
        "reconnect_to_drained_s": None if drained_s is None else round(drained_s, 1),
        "broker_back_to_end_s": round(time.monotonic() - t_up, 1),
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=600, help="seconds (default 600)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent clients")
    parser.add_argument("--outbox", type=int, default=1000,
                        help="mqtt.outbox_size of the daemon (default 1000, its default)")
    parser.add_argument("--before", type=float, default=15, help="load before the outage, s")
    parser.add_argument("--after", type=float, default=30, help="load after the outage, s")
    parser.add_argument("--audio-dir", type=Path, default=REPO / "tests" / "data" / "audio")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        "broker_outage.json")
    args = parser.parse_args()

    audio = speech_audio(args.audio_dir)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    env = {**test_pipeline_env(), "STREAMD_SERVER_CONNECTION_RATE": "0",
           "STREAMD_MQTT_OUTBOX_SIZE": str(args.outbox),
           # Found again within 2 s of its return (the default back-off goes up to 30 s).
           "STREAMD_MQTT_RECONNECT_MAX_S": "2"}
    started = time.time()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="outage-")))
        broker = Mosquitto(work, persistence=True)
        broker.start()
        stack.callback(broker.stop, kill=True)
        daemon = stack.enter_context(serve(
            work, "--node", "outage", "--mqtt-host", broker.host, "--mqtt-port",
            str(broker.port), "--mqtt-journal", str(work / "journal.sqlite"),
            "--max-sessions", str(max(16, args.sessions)), env=env))
        result = asyncio.run(run(args, daemon.http, daemon.url, broker, pcm))
        log = daemon.log_text()
    mqtt_lines = [line for line in log.splitlines() if "streamd.mqtt" in line]
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "outage_s": args.outage, "sessions": args.sessions, "pipeline": "test",
              "audio_per_session_s": round(len(audio) / RATE, 1),
              **result, "mqtt_log_lines": mqtt_lines[:20]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    rows = [(k, result[k]) for k in (
        "outage_s", "sessions", "sessions_completed", "finals_sent", "finals_received",
        "events_sent", "events_received", "duplicates_dropped", "seq_in_order",
        "outbox_max", "outbox_bound", "waiting_max", "journal_bytes_max",
        "backpressure_max_s", "rss_mb_before", "rss_mb_max", "rss_mb_end",
        "healthz_codes_during_outage", "mqtt_states_during_outage",
        "reconnect_to_drained_s", "client_error_count")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"mqtt log lines: {len(mqtt_lines)}")
    print(f"wrote {args.out}")
    lost = result["finals_sent"] - result["finals_received"]
    return 1 if lost or result["events_sent"] != result["events_received"] else 0


if __name__ == "__main__":
    sys.exit(main())
