"""Cluster benchmark: node failover as a client sees it, and throughput through HAProxy.

    python bench/cluster.py [--kills 4] [--speed 6] [--streams 8] [--stream-speed 20]
                            [--pipeline echo|whisper] [--out bench/results/cluster.json]

Runs on loopback what docs/scale-out.md describes: a 3-node NATS cluster (the MQTT bus,
deploy/nats/node.conf), two streamd nodes publishing to it (`mqtt.hosts` = all three),
HAProxy in front (deploy/haproxy/haproxy.cfg), and a subscriber on the third NATS node.
`--pipeline echo` (default) runs the daemons on the `echo` pipeline (no model; a final's
text is its duration), so the numbers are the cluster's, not a model's.

1. Failover, `--kills` times: `streamd-stream` plays the shared stream recording
   (stream_shared_01.wav, 11 utterances, spans in the manifest) at `--speed` x real time
   through HAProxy; at a random moment (seeded; half of them inside an utterance, half
   anywhere) the node holding the session gets SIGKILL. The client resumes on the other
   node. Measured: SIGKILL -> resumed `ready`, -> next partial or final at the client;
   finals the client received; finals on the bus (distinct (session, segment), and
   duplicates); utterances of the manifest that no published final covers (lost).
   The killed node is then restarted on its port (its journal flushes) before the next.
2. Throughput: `--streams` concurrent WebSocket sessions, each the same recording at
   `--stream-speed` x real time (default: as fast as the daemon takes it), through
   HAProxy (leastconn over both nodes), directly to the nodes (half to each, no proxy),
   and all to one node, `--rounds` times each, interleaved; audio seconds per wall
   second (median) and finals received. The sending clients run in this process, on
   the same CPUs as the daemons.

Prints a table and writes `--out` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from helpers import free_port  # noqa: E402
from helpers.client import StreamClient  # noqa: E402
from helpers.daemon import Daemon, serve, stream_session  # noqa: E402
from helpers.haproxy import HAProxy  # noqa: E402
from helpers.mosquitto import Subscriber  # noqa: E402
from helpers.nats import NatsCluster  # noqa: E402
from helpers.text import wer  # noqa: E402

AUDIO = REPO / "tests" / "data" / "audio"


def stream_entry() -> dict:
    for line in (AUDIO / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line) if line.strip() else {}
        if entry.get("segments"):
            entry["path"] = AUDIO / entry["audio"]
            return entry
    raise SystemExit("no stream recording in tests/data/audio/manifest.jsonl")


def uncovered(finals: list[dict], spans: list[tuple[float, float]]) -> list[int]:
    """Indexes of spans of which finals cover less than 80 %."""
    out = []
    for i, (s, e) in enumerate(spans):
        heard = sum(max(0.0, min(e, f["end"]) - max(s, f["start"])) for f in finals)
        if heard < 0.8 * (e - s):
            out.append(i)
    return out


class Nodes:
    """Two streamd nodes on fixed ports (so a restarted node is the same HAProxy server)."""

    def __init__(self, stack: contextlib.ExitStack, workdir: Path, mqtt: list[str],
                 env: dict[str, str], extra: list[str]) -> None:
        self.workdir, self.mqtt, self.env, self.extra = workdir, mqtt, env, extra
        self.ports = {"a": free_port(), "b": free_port()}
        self.running: dict[str, Daemon] = {}
        self._stacks = {name: contextlib.ExitStack() for name in self.ports}
        for name in self.ports:
            stack.callback(self._stacks[name].close)
            self.start(name)

    def start(self, name: str) -> None:
        self.running[name] = self._stacks[name].enter_context(serve(
            self.workdir, "--node", name, *self.mqtt, *self.extra, env=self.env,
            log_format="json", port=self.ports[name], startup_timeout=600))

    def kill(self, name: str) -> None:
        daemon = self.running.pop(name)
        os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        self._stacks[name].close()
        self._stacks[name] = contextlib.ExitStack()

    def holding(self) -> str:
        """The node with an open session."""
        import urllib.request

        for name, d in self.running.items():
            with urllib.request.urlopen(f"{d.http}/healthz", timeout=2) as r:
                if json.load(r)["sessions"] >= 1:
                    return name
        raise RuntimeError("no node holds the session")


async def failover_run(i: int, rng: random.Random, nodes: Nodes, lb: HAProxy,
                       sub: Subscriber, entry: dict, speed: float, workdir: Path,
                       kill: bool = True) -> dict:
    spans = [(s["start_s"], s["end_s"]) for s in entry["segments"]]
    session = f"bench-kill-{i}"
    mid = i % 2 == 0
    if not kill:
        where = "no kill"
        def when(e: dict) -> bool:
            return e["type"] == "ready"
    elif mid:  # inside a random utterance, at least 1 s (audio) into it
        k = rng.randrange(1, len(spans) - 1)
        where = f"utterance {k + 1}"
        def when(e: dict) -> bool:
            return (e["type"] == "partial" and spans[k][0] - 1 < e["start"] < spans[k][1]
                    and e["end"] - e["start"] > 1.0)
    else:  # anywhere in 15-85 % of the recording
        at = rng.uniform(0.15, 0.85) * entry["duration_s"]
        where = f"{at:.1f} s"
        def when(e: dict) -> bool:
            return bool(e.get("end", 0.0) >= at)
    with StreamClient(f"ws://127.0.0.1:{lb.port}/v1/stream", entry["path"], "--speed",
                      str(speed), "--session", session, workdir=workdir) as client:
        await asyncio.to_thread(client.wait_for, when, 120)
        victim = nodes.holding() if kill else "-"
        t_kill = time.time()
        if kill:
            nodes.kill(victim)
        rc = await asyncio.to_thread(client.wait, 600)
        events, stderr = client.events, client.stderr_text()
    readies = [t for t, e in events if e["type"] == "ready"]
    t_ready = readies[1] if len(readies) > 1 else None
    nxt = [t for t, e in events if t_ready is not None and t >= t_ready
           and e["type"] in ("partial", "final")]
    ws_finals = [e for _, e in events if e["type"] == "final"]
    topic = f"streamd/{session}/final"
    want = {f["segment"] for f in ws_finals}
    restarted_flush = False
    try:
        await sub.wait_for(lambda m: want <= {p["segment"] for p in sub.payloads(topic)}, 15)
    except TimeoutError:
        restarted_flush = True
    if kill:
        nodes.start(victim)  # as systemd would: its journal goes out
        await asyncio.to_thread(lb.wait_status, victim, "UP", 60)
    with contextlib.suppress(TimeoutError):
        await sub.wait_for(lambda m: want <= {p["segment"] for p in sub.payloads(topic)}, 15)
    published = sub.payloads(topic)
    latest: dict[int, dict] = {}
    for p in published:  # keep the latest ts per segment (docs/protocol.md)
        if p["segment"] not in latest or p["ts"] > latest[p["segment"]]["ts"]:
            latest[p["segment"]] = p
    lost = uncovered(list(latest.values()), spans)
    texts = [latest[k]["text"] for k in sorted(latest)]
    real = "echo" not in nodes.extra  # echo's text is a duration, not words
    error = wer([s["text"] for s in entry["segments"]], texts) if texts and real else None
    return {
        "run": i, "kill_at": where, "victim": victim, "client_exit": rc,
        "resumed": "resuming session" in stderr,
        "gap_ready_s": round(t_ready - t_kill, 3) if t_ready else None,
        "gap_event_s": round(nxt[0] - t_kill, 3) if nxt else None,
        "client_finals": len(ws_finals),
        "client_segments_unique": len(want) == len(ws_finals),
        "published": len(published), "published_segments": len(latest),
        "duplicates": len(published) - len(latest),
        "missing_at_bus": sorted(want - set(latest)),
        "needed_restart_to_flush": restarted_flush,
        "utterances": len(spans), "utterances_lost": [k + 1 for k in lost],
        "wer": round(error, 4) if error is not None else None,  # real pipelines only
    }


def throughput(ports: list[int], streams: int, audio: np.ndarray, speed: float) -> dict:
    """`streams` sessions at once, session j to ports[j % len(ports)]; `speed` 0: each
    sends as fast as the daemon takes it (WebSocket flow control)."""
    speed = speed or 1e9
    t0 = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda j: stream_session(ports[j % len(ports)], audio,
                                                      speed=speed, recv_timeout=300),
                             range(streams)))
    wall = time.monotonic() - t0
    finals = [sum(e["type"] == "final" for e in events) for events in runs]
    audio_s = streams * len(audio) / 16000
    return {"streams": streams, "wall_s": round(wall, 2), "audio_s": round(audio_s, 1),
            "audio_s_per_s": round(audio_s / wall, 1), "finals_per_stream": finals}


async def main_async(args: argparse.Namespace, workdir: Path) -> dict:
    entry = stream_entry()
    audio, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16000
    # All streams may go to one node: the default max_sessions (per core) could refuse them.
    extra = ["--pipeline", args.pipeline, "--max-sessions", str(max(16, args.streams))]
    rng = random.Random(args.seed)
    with NatsCluster(workdir) as nats, contextlib.ExitStack() as stack:
        first, second, third = nats.nodes
        mqtt = ["--mqtt-host", first.host, "--mqtt-port", str(first.port),
                "--mqtt-hosts", f"{second.address},{third.address}"]
        nodes = Nodes(stack, workdir, mqtt, {}, extra)
        lb = stack.enter_context(HAProxy(workdir, list(nodes.ports.items())))
        async with Subscriber(third, ["streamd/+/final"]) as sub:
            kills = []
            undisturbed = None
            if args.undisturbed:
                undisturbed = await failover_run(-1, rng, nodes, lb, sub, entry, args.speed,
                                                 workdir, kill=False)
                print(json.dumps(undisturbed), flush=True)
            for i in range(args.kills):
                run = await failover_run(i, rng, nodes, lb, sub, entry, args.speed, workdir)
                print(json.dumps(run), flush=True)
                kills.append(run)
        paths = {"haproxy": [lb.port], "direct": list(nodes.ports.values()),
                 "one_node": [nodes.ports["a"]]}
        rounds: dict[str, list[dict]] = {name: [] for name in paths}
        for _ in range(args.rounds if args.streams else 0):  # interleaved: a busy
            # moment hits every path alike
            for name, ports in paths.items():
                rounds[name].append(await asyncio.to_thread(
                    throughput, ports, args.streams, audio, args.stream_speed))
    if args.streams == 0:
        return {"kills": kills, "throughput": {}, "undisturbed": undisturbed}
    return {"kills": kills, "undisturbed": undisturbed,
            "throughput": {name: {
        "audio_s_per_s_median": statistics.median(r["audio_s_per_s"] for r in runs),
        "audio_s_per_s": [r["audio_s_per_s"] for r in runs],
        "finals_per_stream": sorted({f for r in runs for f in r["finals_per_stream"]}),
        "rounds": runs} for name, runs in rounds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--speed", type=float, default=6.0,
                        help="failover runs: the client's --speed")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-speed", type=float, default=0.0,
                        help="throughput: each stream's pace, x real time (default 0: as "
                        "fast as the daemon takes it)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput: measurements per path, interleaved")
    parser.add_argument("--pipeline", default="echo",
                        help="the daemons' pipeline: echo (no model) or a real one (whisper)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--undisturbed", action="store_true",
                        help="first one run without a kill (with a real pipeline: the WER "
                        "to compare the failover runs' with)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cluster.json")
    args = parser.parse_args()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="streamd-cluster-bench-") as tmp:
        workdir = Path(tmp)
        os.environ["STATE_DIRECTORY"] = str(workdir / "state")
        t0 = time.monotonic()
        result = asyncio.run(main_async(args, workdir))
    kills = result["kills"]
    gaps = [k["gap_event_s"] for k in kills if k["gap_event_s"] is not None]
    summary = {
        "kills": len(kills),
        "resumed": sum(k["resumed"] and k["client_exit"] == 0 for k in kills),
        "gap_event_s": {"median": statistics.median(gaps) if gaps else None,
                        "max": max(gaps) if gaps else None},
        "utterances": sum(k["utterances"] for k in kills),
        "utterances_lost": sum(len(k["utterances_lost"]) for k in kills),
        "client_finals": sum(k["client_finals"] for k in kills),
        "published_segments": sum(k["published_segments"] for k in kills),
        "duplicates": sum(k["duplicates"] for k in kills),
        "needed_restart_to_flush": sum(k["needed_restart_to_flush"] for k in kills),
    }
    out = {
        "command": "python bench/cluster.py " + " ".join(sys.argv[1:]),
        "pipeline": args.pipeline, "speed": args.speed, "streams": args.streams,
        "stream_speed": args.stream_speed, "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": round(time.monotonic() - t0, 1),
        "summary": summary, **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"\nfailover ({args.pipeline} pipeline, client at {args.speed:g}x, SIGKILL of the "
          "node holding the session)")
    print(f"{'run':>3} {'kill at':>13} {'node':>4} {'->ready s':>9} {'->event s':>9} "
          f"{'client finals':>13} {'on bus':>6} {'dups':>4} {'lost utt.':>9}")
    for k in kills:
        print(f"{k['run']:>3} {k['kill_at']:>13} {k['victim']:>4} "
              f"{k['gap_ready_s'] if k['gap_ready_s'] is not None else '-':>9} "
              f"{k['gap_event_s'] if k['gap_event_s'] is not None else '-':>9} "
              f"{k['client_finals']:>13} {k['published_segments']:>6} {k['duplicates']:>4} "
              f"{len(k['utterances_lost']):>6}/{k['utterances']}")
    for k in filter(None, [result["undisturbed"], *kills]):
        if k["wer"] is not None:
            print(f"WER of the published finals (de-duplicated), run {k['run']} "
                  f"({k['kill_at']}): {k['wer']:.3f}")
    if not result["throughput"]:
        print(f"\nwrote {args.out}")
        return
    pace = f"{args.stream_speed:g}x" if args.stream_speed else "full speed"
    print(f"\nthroughput: {args.streams} streams at {pace}, test recording "
          f"{len(sf.read(stream_entry()['path'])[0]) / 16000:.1f} s each")
    print(f"{'path':>8} {'audio s per s (median)':>22}  rounds  finals per stream")
    for name, t in result["throughput"].items():
        print(f"{name:>8} {t['audio_s_per_s_median']:>22}  {t['audio_s_per_s']}  "
              f"{t['finals_per_stream']}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
