"""MqttPublisher against a real mosquitto: topics, QoS, order, outages, will, back-pressure."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.mosquitto import Mosquitto, Subscriber, first_seen

from streamd.config import MqttConfig
from streamd.errors import BadRequest, ConfigError
from streamd.mqtt import MqttPublisher

pytest_plugins = ["helpers.mosquitto"]  # the `mosquitto` fixture
pytestmark = pytest.mark.timeout(60)

FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "ack_timeout_s": 5.0}


def _settings(broker: Mosquitto, **kw: object) -> MqttConfig:
    kw = {**FAST, **kw}
    return MqttConfig(host=broker.host, port=broker.port, **kw)  # type: ignore[arg-type]


def _final(session: str, k: int) -> dict:
    return {"type": "final", "session": session, "segment": k, "start": float(k),
            "end": k + 0.5, "text": f"segment {k}"}


async def _status(broker: Mosquitto, node: str, want: str, timeout: float = 10) -> dict:
    """The retained status of `node`, read by a fresh client, once its state is `want`."""
    deadline = time.monotonic() + timeout
    while True:
        async with Subscriber(broker, [f"streamd/status/{node}"]) as sub:
            try:
                await sub.wait_for(lambda m: bool(m), timeout=1.0)
                msg = sub.messages[-1]
                status = sub.payloads("streamd/status/+")[-1]
                if status["state"] == want:
                    assert msg.retain and msg.qos == 1
                    return status
            except TimeoutError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"status of {node} never became {want!r}")
        await asyncio.sleep(0.1)


def test_settings_validation() -> None:
    with pytest.raises(ConfigError, match="mqtt.prefix"):
        MqttConfig(host="x", prefix="a/#")
    with pytest.raises(ConfigError, match="mqtt.reconnect_min_s"):
        MqttConfig(host="x", reconnect_min_s=5, reconnect_max_s=1)
    with pytest.raises(ConfigError, match="mqtt.inflight_max"):
        MqttConfig(host="x", inflight_max=21)
    with pytest.raises(ConfigError, match="node"):
        MqttPublisher(MqttConfig(host="x"), "a/b")
    with pytest.raises(ConfigError, match="mqtt.host"):
        MqttPublisher(MqttConfig(), "n")  # MQTT not enabled
    cfg = MqttConfig(host="broker", port=8883, prefix="site/asr", username="", password="",
                     keepalive_s=7, outbox_size=12)
    pub = MqttPublisher(cfg, "n")
    assert pub.broker == ("broker", 8883) and pub.status_topic == "site/asr/status/n"
    assert pub.health()["outbox_max"] == 12 and pub.client_id.startswith("streamd-n-")
    assert cfg.connect_timeout == cfg.ack_timeout_s == 10.0
    several = MqttConfig(host="a", hosts=("b:1", "a:1883"))
    assert several.brokers == (("a", 1883), ("b", 1)) and several.connect_timeout == 3.0


def test_events_topics_fields_and_order(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with Subscriber(mosquitto, ["streamd/#"]) as sub:
            pub = MqttPublisher(_settings(mosquitto), "node1")
            t0 = time.time()
            await pub.start()
            assert await pub.wait_connected(10)
            with pytest.raises(BadRequest):
                await pub.publish({"type": "final", "session": "a/b", "text": "x"})
            for s in ("s1", "s2"):
                await pub.publish({"type": "speech_start", "session": s, "segment": 0,
                                   "start": 0.0})
            for k in range(20):
                for s in ("s1", "s2"):
                    await pub.publish({"type": "partial", "session": s, "segment": k,
                                       "start": 0.0, "end": 0.1, "text": "par"})
                    await pub.publish(_final(s, k))
                await asyncio.sleep(0.005)  # a live session's pace; bursts are coalesced
            for s in ("s1", "s2"):
                await pub.publish({"type": "done", "session": s, "segments": 20})
            await sub.wait_for(lambda m: len(m) >= 2 + 80 + 2 + 1)
            assert await pub.stop(5) == 0

        status = sub.payloads("streamd/status/node1")[0]
        assert status["state"] == "online" and status["node"] == "node1"
        assert status["version"] and status["ts"] >= t0
        for s in ("s1", "s2"):
            msgs = [m for m in sub.messages if m.topic.matches(f"streamd/{s}/+")]
            kinds = [str(m.topic).rsplit("/", 1)[1] for m in msgs]
            assert kinds[0] == "speech_start" and kinds[-1] == "done"
            assert all(m.qos == 1 for m, k in zip(msgs, kinds, strict=True) if k != "partial")
            assert all(m.qos == 0 for m, k in zip(msgs, kinds, strict=True) if k == "partial")
            assert not any(m.retain for m in msgs)
            finals = sub.payloads(f"streamd/{s}/final")
            assert [f["text"] for f in finals] == [f"segment {k}" for k in range(20)]
            assert all(f["node"] == "node1" and f["session"] == s for f in finals)
            assert all(t0 <= f["ts"] <= time.time() for f in finals)
            seqs = [p["seq"] for p in sub.payloads(f"streamd/{s}/+")]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert len(sub.payloads(f"streamd/{s}/partial")) == 20
        assert pub.dropped_partials == 0 and pub.reconnects == 0
        assert pub.published == 2 * (1 + 20 + 1)

    asyncio.run(main())


def test_partials_are_coalesced_per_session(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with Subscriber(mosquitto, ["streamd/+/partial", "streamd/+/final"]) as sub:
            pub = MqttPublisher(_settings(mosquitto), "node6")
            await pub.start()
            assert await pub.wait_connected(10)
            for k in range(10):  # a burst without yielding: only the newest may go out
                for s in ("c1", "c2"):
                    await pub.publish({"type": "partial", "session": s, "segment": 0,
                                       "start": 0.0, "end": k / 10, "text": f"p{k}"})
            await pub.publish(_final("c1", 0))
            await sub.wait_for(lambda m: any(x.topic.matches("+/+/final") for x in m))
            assert await pub.stop(5) == 0
        for s in ("c1", "c2"):
            assert [p["text"] for p in sub.payloads(f"streamd/{s}/partial")] == ["p9"]
        assert pub.dropped_partials == 2 * 9
        assert sub.payloads("streamd/c1/final")[0]["seq"] == 10

    asyncio.run(main())


def test_stop_flushes_then_offline_status(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with Subscriber(mosquitto, ["streamd/+/final"]) as sub:
            pub = MqttPublisher(_settings(mosquitto), "node2")
            await pub.start()
            assert await pub.wait_connected(10)
            for k in range(200):
                await pub.publish(_final("flush", k))
            assert pub.outbox_depth > 0  # nothing acknowledged yet: stop() must flush
            assert await pub.stop(10) == 0
            assert pub.outbox_depth == 0
            await sub.wait_for(lambda m: len(m) >= 200)
        assert [f["seq"] for f in sub.payloads("streamd/flush/final")] == list(range(200))
        status = await _status(mosquitto, "node2", "offline")
        assert status["reason"] == "shutdown"
        with pytest.raises(RuntimeError):
            await pub.publish(_final("flush", 200))

    asyncio.run(main())


def test_stop_gives_up_on_a_hung_broker_in_time(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        pub = MqttPublisher(_settings(mosquitto), "node7")
        await pub.start()
        assert await pub.wait_connected(10)
        mosquitto.pause()
        try:
            for k in range(3):
                await pub.publish(_final("hung", k))
            t = time.monotonic()
            assert await pub.stop(1.0) == 3  # never acknowledged: reported, not hidden
            assert time.monotonic() - t < 6  # 1 s flush + 1 s goodbye, with slack
        finally:
            mosquitto.resume()
        status = await _status(mosquitto, "node7", "offline")
        assert status["reason"] in ("shutdown", "lost")

    asyncio.run(main())


_CHILD = textwrap.dedent("""
    import asyncio, sys
    from streamd.config import MqttConfig
    from streamd.mqtt import MqttPublisher

    async def main():
        pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=int(sys.argv[1])), "doomed")
        await pub.start()
        assert await pub.wait_connected(10)
        print("connected", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_last_will_marks_killed_daemon_offline(mosquitto: Mosquitto, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(mosquitto.port)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "connected"
        online = asyncio.run(_status(mosquitto, "doomed", "online"))
        os.kill(child.pid, signal.SIGKILL)  # no DISCONNECT: the broker must send the will
        child.wait(10)
        offline = asyncio.run(_status(mosquitto, "doomed", "offline"))
        assert offline["node"] == "doomed" and offline["reason"] == "lost"
        assert offline["version"] == online["version"]
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)


def test_partials_dropped_finals_kept_while_broker_away(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)  # configured, not started: nothing listens on the port

    async def main() -> None:
        pub = MqttPublisher(_settings(broker), "node3")
        await pub.start()
        for _ in range(100):  # wait for a failed attempt
            if pub.connect_failures:
                break
            await asyncio.sleep(0.05)
        assert not pub.connected and pub.connect_failures >= 1
        for k in range(5):
            await pub.publish({"type": "partial", "session": "p", "segment": 0,
                               "start": 0.0, "end": k / 10, "text": "x" * k})
            await pub.publish(_final("p", k))
        assert pub.dropped_partials == 5 and pub.outbox_depth == 5
        broker.start()
        try:
            async with Subscriber(broker, ["streamd/p/+"]) as sub:
                # The subscriber may come after the flush: check delivery with stop().
                assert await pub.stop(10) == 0
            assert pub.reconnects == 0 and pub.published == 5
            assert not any(m.topic.matches("streamd/p/partial") for m in sub.messages)
        finally:
            broker.stop(kill=True)

    asyncio.run(main())


def test_outbox_bound_and_back_pressure(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistence=True)

    async def main() -> None:
        broker.start()
        # A persistent subscriber session: the restarted broker queues for it.
        async with Subscriber(broker, ["streamd/bp/final"], persistent=True,
                              client_id=sub_id):
            pass
        broker.stop()
        pub = MqttPublisher(_settings(broker, outbox_size=3), "node4")
        await pub.start()
        for k in range(3):
            await asyncio.wait_for(pub.publish(_final("bp", k)), 1)
        fourth = asyncio.create_task(pub.publish(_final("bp", 3)))
        await asyncio.sleep(0.5)
        assert not fourth.done() and pub.outbox_depth == 3  # blocked, nothing dropped
        broker.start()
        await asyncio.wait_for(fourth, 10)
        assert await pub.stop(10) == 0
        async with Subscriber(broker, ["streamd/bp/final"], persistent=True,
                              client_id=sub_id) as sub:
            await sub.wait_for(lambda m: len(first_seen(sub.payloads("streamd/bp/final"))) >= 4)
        finals = first_seen(sub.payloads("streamd/bp/final"))
        assert [f["segment"] for f in finals] == [0, 1, 2, 3]
        assert [f["seq"] for f in finals] == [0, 1, 2, 3]

    sub_id = f"bp-{os.getpid()}"
    try:
        asyncio.run(main())
    finally:
        broker.stop(kill=True)


def test_broker_restart_mid_stream_keeps_every_final(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, persistence=True)
    n = 120

    async def main() -> None:
        broker.start()
        async with Subscriber(broker, ["streamd/+/final", "streamd/status/+"],
                              persistent=True) as sub:
            pub = MqttPublisher(_settings(broker), "node5")
            await pub.start()
            assert await pub.wait_connected(10)

            async def produce() -> None:
                for k in range(n):
                    await pub.publish(_final("ms", k))
                    await asyncio.sleep(0.01)

            producer = asyncio.create_task(produce())
            await asyncio.sleep(0.4)
            t_restart = time.time()
            await asyncio.to_thread(broker.restart, down_s=0.5)
            await asyncio.wait_for(producer, 20)
            assert await pub.wait_connected(10)
            await sub.wait_for(lambda m: len(first_seen(sub.payloads("streamd/ms/final"))) >= n,
                               timeout=20)
            assert await pub.stop(10) == 0
            assert pub.reconnects >= 1 and sub.connects >= 2
            online = [s for s in sub.payloads("streamd/status/node5") if s["state"] == "online"]
            assert online[-1]["ts"] >= t_restart  # re-announced after the restart

        finals = first_seen(sub.payloads("streamd/ms/final"))
        assert [f["segment"] for f in finals] == list(range(n))
        assert [f["seq"] for f in finals] == list(range(n))

    try:
        asyncio.run(main())
    finally:
        broker.stop(kill=True)


def test_unacknowledged_finals_are_sent_again(tmp_path: Path) -> None:
    """Finals written to a hung broker that then dies must go again to its successor."""
    broker = Mosquitto(tmp_path, persistence=True)

    async def main() -> None:
        broker.start()
        async with Subscriber(broker, ["streamd/ua/final"], persistent=True) as sub:
            pub = MqttPublisher(_settings(broker), "node8")
            await pub.start()
            assert await pub.wait_connected(10)
            for k in range(5):
                await pub.publish(_final("ua", k))
            await sub.wait_for(lambda m: len(m) >= 5)
            broker.pause()
            for k in range(5, 10):
                await pub.publish(_final("ua", k))
            await asyncio.sleep(0.3)  # written to the socket, never acknowledged
            assert pub.outbox_depth == 5
            broker.stop(kill=True)  # the bytes it had not read die with it
            broker.start()
            await sub.wait_for(lambda m: len(first_seen(sub.payloads("streamd/ua/final"))) >= 10)
            assert await pub.stop(10) == 0
        finals = first_seen(sub.payloads("streamd/ua/final"))
        assert [f["seq"] for f in finals] == list(range(10))

    try:
        asyncio.run(main())
    finally:
        broker.stop(kill=True)


def test_tls_and_password(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, tls=True, users={"streamd": "s3cret"})

    async def main() -> None:
        async with Subscriber(broker, ["streamd/tls/final"]) as sub:
            wrong = MqttPublisher(_settings(broker, tls=True, tls_ca_file=str(broker.ca_file),
                                            username="streamd", password="wrong"), "bad")
            await wrong.start()
            await wrong.publish(_final("tls", 0))
            assert not await wrong.wait_connected(0.5)
            assert wrong.connect_failures >= 1 and wrong.outbox_depth == 1
            assert await wrong.stop(0.2) == 1

            no_ca = MqttPublisher(_settings(broker, tls=True, username="streamd",
                                            password="s3cret"), "no-ca")
            await no_ca.start()  # the system CAs do not know our test CA
            assert not await no_ca.wait_connected(0.5)
            await no_ca.stop(0.2)

            pub = MqttPublisher(_settings(broker, tls=True, tls_ca_file=str(broker.ca_file),
                                          username="streamd", password="s3cret"), "good")
            await pub.start()
            assert await pub.wait_connected(10)
            await pub.publish(_final("tls", 0))
            await sub.wait_for(lambda m: len(m) >= 1)
            assert await pub.stop(5) == 0
        assert sub.payloads("streamd/tls/final")[0]["node"] == "good"

    with broker:
        asyncio.run(main())


def test_reconnect_backoff_grows_with_jitter() -> None:
    pub = MqttPublisher(MqttConfig(host="x", reconnect_min_s=0.5, reconnect_max_s=8), "n")
    for failures, cap in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 8.0)]:
        delays = [pub._backoff(failures) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap
        assert max(delays) - min(delays) > cap / 4  # jittered, not constant


def test_mosquitto_helper_restarts_on_its_port_and_leaves_nothing(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    with broker:
        pid = broker._proc.pid
        broker.restart(kill=True)
        assert broker.running and broker._proc.pid != pid
        with socket.create_connection((broker.host, broker.port), timeout=1):
            pass
        pid = broker._proc.pid
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie or a leak
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=1)

    bad = Mosquitto(tmp_path, extra_config=("no_such_option 1",))
    with pytest.raises(RuntimeError, match="mosquitto exited"):
        bad.start()
    assert not bad.running


def test_moves_to_the_next_broker_with_the_outbox_intact(tmp_path: Path) -> None:
    """Two brokers; the one in use dies mid-stream: the publisher goes on with the other,
    every final arrives once at least, in order (de-duplicated on seq)."""
    first, second = Mosquitto(tmp_path), Mosquitto(tmp_path)
    n = 60

    async def main() -> None:
        async with Subscriber(first, ["streamd/mb/final"]) as sub1, \
                Subscriber(second, ["streamd/mb/final"]) as sub2:
            pub = MqttPublisher(_settings(first, hosts=(f"{second.host}:{second.port}",)), "mb")
            assert pub.config.brokers == ((first.host, first.port),
                                            (second.host, second.port))
            await pub.start()
            assert await pub.wait_connected(10) and pub.broker == (first.host, first.port)
            for k in range(n):
                await pub.publish(_final("mb", k))
                await asyncio.sleep(0.01)
                if k == n // 3:
                    first.pause()  # written to, never acknowledging: then gone
                    await asyncio.sleep(0.2)
                    first.stop(kill=True)
            def both() -> list[dict]:
                return sub1.payloads("streamd/mb/final") + sub2.payloads("streamd/mb/final")

            await sub2.wait_for(lambda m: len(first_seen(both())) >= n)
            assert pub.broker == (second.host, second.port) and pub.reconnects == 1
            assert await pub.stop(5) == 0
        finals = first_seen(both())
        assert [f["seq"] for f in finals] == list(range(n))
        assert sub2.payloads("streamd/mb/final")  # the second broker took over

    with first, second:
        asyncio.run(main())
