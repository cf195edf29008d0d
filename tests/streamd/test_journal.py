"""The on-disk MQTT outbox (streamd/journal.py): order, lock, and finals that survive a
SIGKILL of the publisher and of the daemon while the broker is away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from helpers.daemon import serve, speech_audio, stream_session, test_pipeline_env
from helpers.mosquitto import Mosquitto, Subscriber

from streamd.config import MqttConfig, load_config
from streamd.errors import ConfigError
from streamd.journal import Journal
from streamd.mqtt import MqttPublisher, journal_path

pytestmark = pytest.mark.timeout(120)
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "ack_timeout_s": 5.0}


def _rows(path: Path) -> list[tuple[str, bytes]]:
    with contextlib.closing(sqlite3.connect(path)) as db:  # closed: no lock left behind
        return [(t, bytes(p)) for t, p in db.execute(
            "SELECT topic, payload FROM outbox ORDER BY id")]


def test_journal_order_remove_reopen_and_lock(tmp_path: Path) -> None:
    path = tmp_path / "j" / "outbox.sqlite"
    journal = Journal(path)
    ids = [journal.append(f"t/{k}", f"p{k}".encode()) for k in range(5)]
    assert ids == sorted(ids)
    journal.remove_through(ids[1])
    assert [(t, p) for _, t, p in journal.entries()] == [
        ("t/2", b"p2"), ("t/3", b"p3"), ("t/4", b"p4")]
    assert journal.size_bytes > 0
    with pytest.raises(ConfigError, match="mqtt.journal"):
        Journal(path)  # one daemon per journal: the second one fails at start
    journal.close()
    again = Journal(path)
    assert [t for _, t, _ in again.entries()] == ["t/2", "t/3", "t/4"]
    assert again.append("t/5", b"p5") > ids[-1]  # ids never go back
    again.close()


def test_journal_path_policy(tmp_path: Path) -> None:
    assert journal_path("off", "n1", {"STATE_DIRECTORY": "/s"}) is None
    assert journal_path("/x/j.sqlite", "n1", {"STATE_DIRECTORY": "/s"}) == "/x/j.sqlite"
    assert journal_path("", "n1", {"STATE_DIRECTORY": "/s:/t"}) == "/s/mqtt-journal-n1.sqlite"
    assert journal_path("", "n1", {"XDG_STATE_HOME": "/x"}) == \
        "/x/streamd/mqtt-journal-n1.sqlite"
    cfg = load_config(environ={"STREAMD_MQTT_JOURNAL": "off", "STREAMD_MQTT_HOST": "b"})
    assert cfg.mqtt.journal == "off"


_CHILD = textwrap.dedent("""
    import asyncio, sys
    from streamd.config import MqttConfig
    from streamd.mqtt import MqttPublisher

    async def main():
        config = MqttConfig(host="127.0.0.1", port=int(sys.argv[1]),
                            reconnect_min_s=0.05, reconnect_max_s=0.2)
        pub = MqttPublisher(config, "doomed", journal=sys.argv[2])
        await pub.start()
        for k in range(5):
            await pub.publish({"type": "partial", "session": "j", "segment": k, "text": "p"})
            await pub.publish({"type": "final", "session": "j", "segment": k, "text": str(k)})
        await pub.publish({"type": "final", "session": "k", "segment": 0, "text": "other"})
        print("accepted", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_publisher_killed_while_broker_away_resends_from_journal(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # not started: the broker is away
    path = tmp_path / "outbox.sqlite"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(broker.port), str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "accepted"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    before = _rows(path)
    assert [t for t, _ in before] == ["streamd/j/final"] * 5 + ["streamd/k/final"]

    async def main() -> None:
        pub = MqttPublisher(MqttConfig(host=broker.host, port=broker.port, **FAST), "doomed",
                            journal=str(path))
        assert pub.recovered == 6 and pub.outbox_depth == 6
        # The session goes on after its recovered events: seq continues (partials count).
        await pub.publish({"type": "final", "session": "j", "segment": 5, "text": "5"})
        broker.start()
        async with Subscriber(broker, ["streamd/+/final"]) as sub:
            await pub.start()
            await sub.wait_for(lambda m: len(m) >= 7)
            assert await pub.stop(5) == 0
        got = [(str(m.topic), m.payload) for m in sub.messages]
        assert got[:6] == before  # same bytes: same seq and ts, in order
        last = json.loads(got[6][1])
        assert last["text"] == "5" and last["seq"] == 10  # 5 partials + 5 finals before
        assert [json.loads(p)["seq"] for _, p in got[:5]] == [1, 3, 5, 7, 9]
        assert _rows(path) == []  # acknowledged: gone from disk

    try:
        asyncio.run(main())
    finally:
        broker.stop(kill=True)


def test_daemon_killed_while_broker_away_republishes_accepted_finals(
        tmp_path: Path, shared_audio_dir: Path) -> None:
    """Broker down, a session streamed (its speech_starts, finals and done accepted),
    SIGKILL, restart, broker up: a subscriber gets every accepted event once more, in
    order, with the same payloads (same seq)."""
    broker = Mosquitto(tmp_path, persistence=True)
    sub_id = f"journal-{os.getpid()}"
    topics = [f"streamd/+/{kind}" for kind in ("speech_start", "final", "done")]

    async def subscribe_once() -> None:  # a persistent session that the broker keeps
        async with Subscriber(broker, topics, persistent=True, client_id=sub_id):
            pass

    broker.start()
    asyncio.run(subscribe_once())
    broker.stop()
    journal = Path(os.environ["STATE_DIRECTORY"]) / "mqtt-journal-jn.sqlite"
    args = ("--node", "jn", "--mqtt-host", broker.host, "--mqtt-port", str(broker.port))
    try:
        with serve(tmp_path, *args, env=test_pipeline_env()) as daemon:
            events = stream_session(daemon.port, speech_audio(shared_audio_dir), speed=20)
            os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(10)
        journaled = [e for e in events if e["type"] in ("speech_start", "final", "done")]
        assert [e["type"] for e in journaled] == ["speech_start", "final"] * 3 + ["done"]
        accepted = _rows(journal)  # partials are not journaled
        assert [t for t, _ in accepted] == [f"streamd/{e['session']}/{e['type']}"
                                            for e in journaled]
        seqs = [json.loads(p)["seq"] for _, p in accepted]
        assert seqs == sorted(set(seqs)) and len(seqs) == 7

        async def deliver() -> list[tuple[str, bytes]]:
            with serve(tmp_path, *args, env=test_pipeline_env()) as again:
                broker.start()
                async with Subscriber(broker, topics, persistent=True,
                                      client_id=sub_id) as sub:
                    await sub.wait_for(lambda m: len(m) >= 7)
                    await asyncio.sleep(0.5)  # nothing more comes
                with urllib.request.urlopen(f"{again.http}/metrics", timeout=5) as r:
                    metrics = r.read().decode()
            assert "streamd_mqtt_recovered_total 7.0" in metrics
            assert 'streamd_queue_depth{queue="mqtt_outbox"} 0.0' in metrics
            assert "streamd_mqtt_journal_bytes " in metrics
            return [(str(m.topic), m.payload) for m in sub.messages]

        got = asyncio.run(deliver())
        assert got == accepted  # every accepted event, once, in order, byte for byte
        for event, (_, payload) in zip(journaled, got, strict=True):
            published = json.loads(payload)
            assert {k: published[k] for k in event} == event
            assert published["node"] == "jn"
        assert _rows(journal) == []
    finally:
        broker.stop(kill=True)
