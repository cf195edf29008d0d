"""Scale-out (docs/scale-out.md) with the real programs on loopback: a 3-node NATS
cluster as the MQTT transcript bus (deploy/nats/node.conf), streamd daemons on the fast
test pipeline, and HAProxy in front of two of them (deploy/haproxy/haproxy.cfg); a
streamd node killed under a `streamd-stream` session, which resumes on the other."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers.client import StreamClient
from helpers.daemon import RATE, Daemon, serve, speech_audio, stream_session, test_pipeline_env
from helpers.haproxy import HAProxy
from helpers.mosquitto import Subscriber, first_seen
from helpers.nats import NatsCluster
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
CONTRACT = ("node", "seq", "ts")  # what MQTT payloads add to the WebSocket event


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
        return finals, first_seen(sub.payloads("streamd/+/final"))

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

    async def main() -> tuple[list[dict], list[dict], float, Daemon, list[float]]:
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
                    lambda m: len(first_seen(sub.payloads("streamd/+/final"))) >= len(finals),
                    timeout=60)
            delays = [t - json.loads(m.payload)["ts"] for m, t in zip(
                sub.messages, sub.arrived, strict=True)]
        return finals, first_seen(sub.payloads("streamd/+/final")), t_kill, daemon, delays

    finals, published, t_kill, daemon, delays = asyncio.run(main())
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
          f"{moved[0]['msg'].split()[3]} connected after {moved[0]['ts'] - t_kill:.3f} s; "
          f"finals accepted -> at the subscriber: max {max(delays):.3f} s, "
          f"{len(delays) - len(published)} duplicates")


# --- HAProxy in front of two nodes, and draining ------------------------------------


def _healthz(daemon: Daemon) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{daemon.http}/healthz", timeout=2) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _sessions_total(daemon: Daemon) -> int:
    with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=2) as r:
        text = r.read().decode()
    m = re.search(r'^streamd_sessions_total\{source="websocket"\} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def _open(stack: contextlib.ExitStack, port: int):
    ws = stack.enter_context(connect(f"ws://127.0.0.1:{port}/v1/stream"))
    ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_f32le"}))
    assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    return ws


def _finish(ws, audio: np.ndarray | None = None) -> tuple[list[dict], int]:
    """Send the rest of `audio` and stop; the events up to `done` and the close code."""
    audio = np.zeros(0, np.float32) if audio is None else audio
    step = RATE // 10
    for i in range(0, len(audio), step):
        ws.send(audio[i:i + step].astype("<f4").tobytes())
        time.sleep(0.01)
    ws.send(json.dumps({"type": "stop"}))
    events = []
    while not events or events[-1]["type"] != "done":
        events.append(json.loads(ws.recv(timeout=30)))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    return events, closed.value.rcvd.code


def test_haproxy_balances_and_a_draining_node_finishes_its_session(
        tmp_path: Path, shared_audio_dir: Path) -> None:
    audio = speech_audio(shared_audio_dir)
    env = {**test_pipeline_env(), "STREAMD_SERVER_DRAIN_TIMEOUT_S": "30"}
    with contextlib.ExitStack() as stack:
        nodes = {name: stack.enter_context(serve(tmp_path, "--node", name, env=env,
                                                 log_format="json"))
                 for name in ("a", "b")}
        lb = stack.enter_context(HAProxy(tmp_path, [(n, d.port) for n, d in nodes.items()]))

        events = stream_session(lb.port, audio, speed=20)  # through HAProxy
        assert sum(e["type"] == "final" for e in events) == 3

        held = _open(stack, lb.port)  # a session that stays open across the SIGTERM
        first = len(audio) // 3
        for i in range(0, first, RATE // 10):
            held.send(audio[i:i + RATE // 10].astype("<f4").tobytes())
        busy = [n for n, d in nodes.items() if _healthz(d)[1]["sessions"] == 1]
        assert len(busy) == 1
        name = busy[0]
        (other,) = set(nodes) - {name}
        draining, spare = nodes[name], nodes[other]
        before = _sessions_total(draining)

        t_term = time.monotonic()
        draining.proc.send_signal(signal.SIGTERM)
        while _healthz(draining)[0] != 404:
            assert time.monotonic() - t_term < 10
            time.sleep(0.02)
        assert _healthz(draining)[1]["status"] == "draining"
        # New sessions right away (HAProxy may not have seen the 404 yet: a 503 from the
        # draining node is retried on the other), and all of them go to the other node.
        fresh = [_open(stack, lb.port) for _ in range(3)]
        assert _healthz(spare)[1]["sessions"] == 3
        nolb_s = time.monotonic() - t_term + lb.wait_status(name, "NOLB")
        assert _sessions_total(draining) == before

        # The open session ends normally on the draining node: its finals, done, 1000.
        held_events, code = _finish(held, audio[first:])
        assert code == 1000
        finals = [e for e in held_events if e["type"] == "final"]
        assert len(finals) == 3 and held_events[-1]["segments"] == 3
        assert draining.proc.wait(15) == 0
        exit_s = time.monotonic() - t_term
        records = [json.loads(line) for line in draining.log_text().splitlines()
                   if line.startswith("{")]
        assert any(r["msg"] == "draining" for r in records)
        assert not any("drain timeout" in r["msg"] for r in records)

        for ws in fresh:
            assert _finish(ws)[1] == 1000
        lb.wait_status(name, "DOWN")
        events = stream_session(lb.port, audio, speed=20)  # the other node serves alone
        assert sum(e["type"] == "final" for e in events) == 3
        print(f"\ndrain: /healthz 404 at once, HAProxy NOLB after {nolb_s:.2f} s, "
              f"node exited {exit_s:.2f} s after SIGTERM (its session ended)")


# --- a streamd node dies mid-utterance: the client resumes on the other ---------------


def covered(finals: list[dict], spans: list[tuple[float, float]]) -> list[float]:
    """Per reference span, the fraction of it inside some final's [start, end]."""
    return [sum(max(0.0, min(e, f["end"]) - max(s, f["start"])) for f in finals) / (e - s)
            for s, e in spans]


def by_segment(payloads: list[dict]) -> dict[int, list[dict]]:
    """Published finals grouped by segment number (the de-duplication key with
    `session`, docs/protocol.md *Resuming a session*)."""
    groups: dict[int, list[dict]] = {}
    for p in payloads:
        groups.setdefault(p["segment"], []).append(p)
    return groups


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_streamd_node_killed_mid_utterance_client_resumes(
        tmp_path: Path, nats: NatsCluster, shared_manifest: list[dict],
        sig: signal.Signals) -> None:
    """streamd-stream plays the 11-utterance recording through HAProxy to two nodes that
    publish to the NATS cluster; the node holding the session gets SIGKILL in the middle
    of an utterance. The client resumes on the other node; the subscriber ends up with a
    final for every utterance (by the manifest's spans), duplicates only of a segment
    number, and the gap (SIGKILL -> next event) is printed. With SIGTERM (no drain) the
    node ends the session early (its finals, `done`, close 1001): the client resumes the
    same way."""
    entry = next(e for e in shared_manifest if e.get("segments"))
    spans = [(s["start_s"], s["end_s"]) for s in entry["segments"]]
    first, second, third = nats.nodes
    mqtt = ("--mqtt-host", first.host, "--mqtt-port", str(first.port),
            "--mqtt-hosts", f"{second.address},{third.address}")
    session = "kill-1"

    async def main() -> dict:
        async with Subscriber(third, [f"streamd/{session}/final"]) as sub:
            with contextlib.ExitStack() as stack:
                nodes = {n: stack.enter_context(serve(
                    tmp_path, "--node", n, *mqtt, env=test_pipeline_env(), log_format="json"))
                    for n in ("a", "b")}
                lb = stack.enter_context(HAProxy(tmp_path, [(n, d.port)
                                                            for n, d in nodes.items()]))
                client = stack.enter_context(StreamClient(
                    f"ws://127.0.0.1:{lb.port}/v1/stream", entry["path"], "--speed", "4",
                    "--session", session, workdir=tmp_path))
                # Mid-utterance: a partial of the 3rd utterance (17.1-24.0 s), 2 s in.
                await asyncio.to_thread(
                    client.wait_for, lambda e: e["type"] == "partial"
                    and spans[2][0] - 1 < e["start"] < spans[2][1]
                    and e["end"] - e["start"] > 2.0, 60)
                (victim,) = [n for n, d in nodes.items() if _healthz(d)[1]["sessions"] == 1]
                t_kill = time.time()
                os.killpg(nodes[victim].proc.pid, sig)
                nodes[victim].proc.wait(30)
                rc = await asyncio.to_thread(client.wait, 120)
                assert rc == 0, client.stderr_text()
                events = client.events
                ws_finals = [e for _, e in events if e["type"] == "final"]
                want = {f["segment"] for f in ws_finals}
                try:
                    await sub.wait_for(lambda m: want <= {
                        p["segment"] for p in sub.payloads(f"streamd/{session}/final")},
                        timeout=20)
                    restarted = False
                except TimeoutError:  # accepted by the victim, still in its journal
                    with serve(tmp_path, "--node", victim, *mqtt, env=test_pipeline_env()):
                        await sub.wait_for(lambda m: want <= {
                            p["segment"] for p in sub.payloads(f"streamd/{session}/final")},
                            timeout=30)
                    restarted = True
            return dict(events=events, t_kill=t_kill, victim=victim, restarted=restarted,
                        stderr=client.stderr_text(),
                        published=sub.payloads(f"streamd/{session}/final"))

    r = asyncio.run(main())
    events, t_kill, victim = r["events"], r["t_kill"], r["victim"]
    survivor = ({"a", "b"} - {victim}).pop()
    assert f"resuming session {session}" in r["stderr"]

    # The client: one resumed `ready`, segment numbers once each, in order, no gap.
    readies = [(t, e) for t, e in events if e["type"] == "ready"]
    assert len(readies) == 2 and "resume" not in readies[0][1]
    t_ready, resumed = readies[1]
    finals_before = [e for t, e in events if e["type"] == "final" and t < t_ready]
    assert resumed["resume"]["segment"] == len(finals_before) >= 2
    assert resumed["resume"]["offset"] == pytest.approx(finals_before[-1]["end"], abs=0.001)
    ws_finals = [e for _, e in events if e["type"] == "final"]
    assert [f["segment"] for f in ws_finals] == list(range(len(ws_finals)))
    assert events[-1][1] == {"type": "done", "session": session, "segments": len(ws_finals)}
    for a, b in zip(ws_finals, ws_finals[1:], strict=False):
        assert a["end"] <= b["start"] + 0.011
    for f in ws_finals:  # the test recognizer's text: the duration it was given
        assert float(f["text"]) == pytest.approx(f["end"] - f["start"], abs=0.021)
    assert min(covered(ws_finals, spans)) >= 0.8, (ws_finals, spans)

    # The subscriber: every segment the client saw, each utterance covered, duplicates
    # only of a segment number (the victim's final that the client never received,
    # recognized again by the survivor from the re-sent audio).
    groups = by_segment(r["published"])
    assert set(groups) == {f["segment"] for f in ws_finals}
    deduped = [g[0] for _, g in sorted(groups.items())]
    assert min(covered(deduped, spans)) >= 0.8
    duplicates = {k: g for k, g in groups.items() if len(g) > 1}
    for g in duplicates.values():
        assert {p["node"] for p in g} == {victim, survivor} or len(
            {(p["node"], p["seq"]) for p in g}) == 1, g  # another node, or a re-send
        assert max(p["start"] for p in g) < min(p["end"] for p in g), g  # same audio
    assert all(p["node"] == survivor for p in r["published"]
               if p["segment"] >= len(finals_before))

    after = [(t, e) for t, e in events if t >= t_ready and e["type"] in ("partial", "final")]
    print(f"\nnode death: {sig.name} of {victim} in utterance 3; resumed on {survivor} "
          f"(ready) after {t_ready - t_kill:.3f} s, next partial/final after "
          f"{after[0][0] - t_kill:.3f} s; {len(ws_finals)} finals at the client, "
          f"{len(r['published'])} published ({len(duplicates)} duplicate segment numbers: "
          f"{sorted(duplicates)}); victim restarted to flush its journal: {r['restarted']}")
