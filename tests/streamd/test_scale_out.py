"""Scale-out (docs/scale-out.md) with the real programs on loopback: a 3-node NATS
cluster as the MQTT transcript bus (deploy/nats/node.conf), streamd daemons on the fast
test pipeline, and HAProxy in front of two of them (deploy/haproxy/haproxy.cfg)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from helpers.daemon import Daemon, serve, speech_audio, stream_session, test_pipeline_env
from helpers.mosquitto import Subscriber
from helpers.nats import NatsCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CONTRACT = ("node", "seq", "ts")  # what MQTT payloads add to the WebSocket event


def _first_seen(payloads: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in payloads:
        if (p["session"], p["seq"]) not in seen:
            seen.add((p["session"], p["seq"]))
            out.append(p)
    return out


def _same_finals(ws_finals: list[dict], published: list[dict], node: str) -> None:
    assert [{k: v for k, v in p.items() if k not in CONTRACT} for p in published] == ws_finals
    assert all(p["node"] == node for p in published)
    seqs = [p["seq"] for p in published]
    assert seqs == sorted(seqs)


def _log_records(daemon: Daemon) -> list[dict]:
    return [json.loads(line) for line in daemon.log_text().splitlines()
            if line.startswith("{")]


@pytest.fixture
def nats(tmp_path: Path):
    with NatsCluster(tmp_path) as cluster:
        yield cluster


def test_finals_cross_the_nats_cluster(tmp_path: Path, nats: NatsCluster,
                                       shared_audio_dir: Path) -> None:
    """streamd publishes to node 1; a subscriber on node 3 gets every final, as sent on
    the WebSocket."""
    first, third = nats.nodes[0], nats.nodes[2]
    audio = speech_audio(shared_audio_dir)

    async def main() -> tuple[list[dict], list[dict]]:
        async with Subscriber(third, ["streamd/+/final"]) as sub:
            with serve(tmp_path, "--node", "n1", "--mqtt-host", first.host,
                       "--mqtt-port", str(first.port), env=test_pipeline_env()) as daemon:
                events = await asyncio.to_thread(stream_session, daemon.port, audio,
                                                 speed=10)
                finals = [e for e in events if e["type"] == "final"]
                await sub.wait_for(lambda m: len(m) >= len(finals), timeout=30)
        return finals, _first_seen(sub.payloads("streamd/+/final"))

    finals, published = asyncio.run(main())
    assert len(finals) == 3
    _same_finals(finals, published, "n1")


def test_nats_node_killed_mid_stream_loses_no_final(tmp_path: Path, nats: NatsCluster,
                                                    shared_audio_dir: Path) -> None:
    """The NATS node streamd publishes to gets SIGKILL mid-session: streamd moves to the
    next broker of `mqtt.hosts`, and a subscriber on another node misses no final."""
    first, second, third = nats.nodes
    audio = speech_audio(shared_audio_dir, names=(
        "librispeech_61-70968-0002.wav", "cmu_arctic_axb_a0004.wav",
        "cmu_arctic_axb_a0005.wav", "cmu_arctic_axb_a0006.wav",
        "ljspeech_LJ001-0030.wav"))

    async def main() -> tuple[list[dict], list[dict], float, Daemon]:
        async with Subscriber(third, ["streamd/+/final"]) as sub:
            with serve(tmp_path, "--node", "n1", "--mqtt-host", first.host,
                       "--mqtt-port", str(first.port),
                       "--mqtt-hosts", f"{second.address},{third.address}",
                       env=test_pipeline_env(), log_format="json") as daemon:
                session = asyncio.create_task(asyncio.to_thread(
                    stream_session, daemon.port, audio, speed=3))
                await sub.wait_for(lambda m: len(m) >= 1, timeout=60)
                t_kill = time.time()
                first.kill()
                events = await session
                finals = [e for e in events if e["type"] == "final"]
                await sub.wait_for(
                    lambda m: len(_first_seen(sub.payloads("streamd/+/final"))) >= len(finals),
                    timeout=60)
        return finals, _first_seen(sub.payloads("streamd/+/final")), t_kill, daemon

    finals, published, t_kill, daemon = asyncio.run(main())
    assert len(finals) == 5
    _same_finals(finals, published, "n1")
    assert published[-1]["ts"] > t_kill  # finals were still coming when the node died
    moved = [r for r in _log_records(daemon)
             if r["msg"].startswith("mqtt connected to") and r["ts"] > t_kill]
    assert moved, "streamd never connected to another broker"
    assert moved[0]["msg"].split()[3] in (second.address, third.address)
    lost = min(r["ts"] for r in _log_records(daemon)
               if r["msg"].startswith(f"mqtt connection lost to {first.address}"))
    print(f"\nfailover: SIGKILL of {first.name}; link loss seen after {lost - t_kill:.3f} s, "
          f"{moved[0]['msg'].split()[3]} connected after {moved[0]['ts'] - t_kill:.3f} s")
