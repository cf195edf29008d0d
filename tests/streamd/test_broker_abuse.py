"""A broker that refuses us, one that is not there, one that goes away under load: each
`streamd serve` (the fast test pipeline) keeps serving, says so once in its log, counts it
in /metrics and shows the MQTT link on /healthz (200 throughout); nothing is lost."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port
from helpers.daemon import Daemon, serve, speech_audio, test_pipeline_env
from helpers.mosquitto import Mosquitto, Subscriber, first_seen
from test_server import s16, start_msg
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(180)
# Retries every second at most, so that the tests see several of them (and a restarted
# broker is found again) within seconds; the default back-off goes up to 30 s.
FAST_RETRY = {"STREAMD_MQTT_RECONNECT_MIN_S": "0.2", "STREAMD_MQTT_RECONNECT_MAX_S": "1"}
JOURNALED = ("speech_start", "final", "done")


def healthz(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(f"{daemon.http}/healthz", timeout=5) as r:
        return r.status, json.load(r)


def metric(daemon: Daemon, series: str) -> float:
    """The value of one exposition line, e.g. `streamd_mqtt_connected`."""
    with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{series} not in /metrics"
    return float(m[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def run_session(url: str, audio: bytes, session: str) -> list[dict]:
    """Stream `audio` (s16le) fast, stop, and return the events up to `done`; waits as
    long as back-pressure holds the session up (minutes, not test_server's 10 s)."""
    events: list[dict] = []
    with connect(url) as ws:
        ws.send(start_msg(session=session))
        for i in range(0, len(audio), 16000):
            ws.send(audio[i : i + 16000])
            time.sleep(0.01)
        ws.send(json.dumps({"type": "stop"}))
        while not events or events[-1]["type"] != "done":
            events.append(json.loads(ws.recv(timeout=120)))
    return events


def mqtt_lines(daemon: Daemon, text: str) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if text in line]


def test_refused_credentials_and_wrong_address(tmp_path: Path) -> None:
    """Bad password: /healthz 200 with mqtt `refused`, one log line however many retries,
    failures counted by reason; no broker at the address: `unreachable`, and `connected`
    once a broker appears there (the outage said in one line)."""
    password = "wrong-horse-battery"
    secret = tmp_path / "mqtt-password"
    secret.write_text(password + "\n")
    missing_port = free_port()
    with Mosquitto(tmp_path, users={"streamd": "right-staple"}) as broker, \
            serve(tmp_path, "--node", "badpass", "--mqtt-host", broker.host,
                  "--mqtt-port", str(broker.port), "--mqtt-username", "streamd",
                  "--mqtt-password-file", str(secret),
                  env={**test_pipeline_env(), **FAST_RETRY}) as refused, \
            serve(tmp_path, "--node", "nobroker", "--mqtt-host", "127.0.0.1",
                  "--mqtt-port", str(missing_port),
                  env={**test_pipeline_env(), **FAST_RETRY}) as unreachable:
        failures = 'streamd_mqtt_connect_failures_total{reason="%s"}'
        wait_until(lambda: metric(refused, failures % "refused") >= 3, 30, "3 refusals")
        wait_until(lambda: metric(unreachable, failures % "unreachable") >= 3, 30,
                   "3 failed attempts")
        status, body = healthz(refused)
        assert status == 200 and body["status"] == "ok"
        mqtt = body["mqtt"]
        assert mqtt["state"] == "refused" and mqtt["broker"] == f"{broker.host}:{broker.port}"
        assert mqtt["outbox"] == 0 and "refused" in mqtt["last_error"].lower()
        assert metric(refused, "streamd_mqtt_connected") == 0
        assert metric(refused, failures % "unreachable") == 0
        lines = mqtt_lines(refused, "mqtt cannot connect to")
        assert len(lines) == 1, lines  # one line per state change, not one per retry
        assert f"{broker.host}:{broker.port}" in lines[0] and "refused" in lines[0]
        assert password not in refused.log_text() and password not in json.dumps(body)

        status, body = healthz(unreachable)
        assert status == 200 and body["mqtt"]["state"] == "unreachable"
        assert body["mqtt"]["broker"] == f"127.0.0.1:{missing_port}"
        assert "Connection refused" in body["mqtt"]["last_error"]
        lines = mqtt_lines(unreachable, "mqtt cannot connect to")
        assert len(lines) == 1 and f"127.0.0.1:{missing_port}" in lines[0], lines

        with Mosquitto(tmp_path, port=missing_port):  # the broker turns up
            wait_until(lambda: healthz(unreachable)[1]["mqtt"]["state"] == "connected", 15,
                       "connected")
            assert metric(unreachable, "streamd_mqtt_connected") == 1
            assert healthz(unreachable)[1]["mqtt"]["last_error"] == ""
            (line,) = mqtt_lines(unreachable, "mqtt connected to")
            assert "without a broker" in line and "failed attempts" in line


def test_broker_outage_under_load_loses_nothing(tmp_path: Path,
                                                shared_audio_dir: Path) -> None:
    """Sessions stream while the broker is away (15 s) with a small outbox: the outbox
    (and journal) never holds more than its bound, sessions wait for room (back-pressure)
    instead of dropping anything, /healthz stays 200 and says `unreachable`; once the
    broker is back every session's speech_start, finals and done reach the subscriber, in
    order, equal to what the WebSocket clients got."""
    outbox_size, sessions, rounds = 12, 3, 2
    audio = s16(speech_audio(shared_audio_dir))  # 3 utterances: 7 journaled events
    broker = Mosquitto(tmp_path, persistence=True)
    sub_id = "outage-sub"
    topics = [f"streamd/+/{kind}" for kind in JOURNALED]
    env = {**test_pipeline_env(), **FAST_RETRY, "STREAMD_MQTT_OUTBOX_SIZE": str(outbox_size)}

    async def subscribe_once() -> None:  # the broker keeps this session's QoS 1 messages
        async with Subscriber(broker, topics, persistent=True, client_id=sub_id):
            pass

    broker.start()
    try:
        asyncio.run(subscribe_once())
        with serve(tmp_path, "--node", "outage", "--mqtt-host", broker.host,
                   "--mqtt-port", str(broker.port), env=env) as daemon:
            url = f"ws://127.0.0.1:{daemon.port}/v1/stream"
            wait_until(lambda: healthz(daemon)[1]["mqtt"]["state"] == "connected", 15,
                       "connected")
            broker.stop()
            wait_until(lambda: healthz(daemon)[1]["mqtt"]["state"] == "unreachable", 15,
                       "unreachable")
            results: dict[str, list[dict]] = {}

            def client(name: str) -> None:
                for k in range(rounds):
                    session = f"{name}-{k}"
                    results[session] = run_session(url, audio, session)

            threads = [threading.Thread(target=client, args=(f"load{i}",), daemon=True)
                       for i in range(sessions)]
            for t in threads:
                t.start()
            outage_end = time.monotonic() + 15
            peak, waiting, codes, states = 0, 0, set(), set()
            while time.monotonic() < outage_end:
                status, body = healthz(daemon)
                codes.add(status)
                states.add(body["mqtt"]["state"])
                peak = max(peak, body["mqtt"]["outbox"])
                waiting = max(waiting, body["mqtt"]["waiting"])
                time.sleep(0.2)
            waited = metric(daemon, "streamd_mqtt_backpressure_seconds_total")
            assert codes == {200} and states == {"unreachable"}
            assert peak == outbox_size  # filled, never past the bound (journal rows: same)
            assert 1 <= waiting <= sessions  # each held-up session waits with one event
            assert waited > 1.0  # sessions waited for room: back-pressure, no drop
            assert len(results) < sessions * rounds  # the load was held up, not dropped
            failures = metric(daemon,
                              'streamd_mqtt_connect_failures_total{reason="unreachable"}')
            broker.start()

            async def collect() -> list[dict]:
                async with Subscriber(broker, topics, persistent=True,
                                      client_id=sub_id) as sub:
                    for t in threads:
                        await asyncio.to_thread(t.join, 90)
                    want = sum(len([e for e in r if e["type"] in JOURNALED])
                               for r in results.values())
                    await sub.wait_for(lambda m: len(first_seen(
                        [json.loads(x.payload) for x in m])) >= want, timeout=30)
                    return first_seen([json.loads(x.payload) for x in sub.messages])

            got = asyncio.run(collect())
            # Delivered to the subscriber can come just before the daemon reads its PUBACK.
            wait_until(lambda: healthz(daemon)[1]["mqtt"]["outbox"] == 0, 10, "outbox empty")
            assert metric(daemon, 'streamd_queue_depth{queue="mqtt_outbox"}') == 0
            log = daemon.log_text()
    finally:
        broker.stop(kill=True)
    assert len(results) == sessions * rounds
    for session, events in results.items():
        expected = [e for e in events if e["type"] in JOURNALED]
        assert [e["type"] for e in expected] == ["speech_start", "final"] * 3 + ["done"]
        published = [p for p in got if p["session"] == session]
        assert [{k: v for k, v in p.items() if k not in ("node", "seq", "ts")}
                for p in published] == expected, session
        seqs = [p["seq"] for p in published]
        assert seqs == sorted(set(seqs))
    # The outage in the log: lost, a line for the failed retries (two if the first one
    # met the broker still closing), back; not a line per retry.
    assert failures >= 8
    assert log.count("mqtt connection lost to") == 1
    assert 1 <= log.count("mqtt cannot connect to") <= 2
    assert len(re.findall(r"mqtt connected to .* without a broker", log)) == 1
