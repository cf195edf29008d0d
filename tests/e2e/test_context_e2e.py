"""Context (issue 17) end to end: the real tiny.en behind `streamd serve`, the bundled JFK
recording (streamd/data/jfk.wav) streamed at real time, segmented by the daemon's VAD.

Decoded alone, the segment after JFK's half-second pause came out as "Thank you, your
country can do for you."; with the session's previous finals as a `<|startofprev|>`
prompt the joined finals read the sentence.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import REPO, Daemon, serve
from helpers.text import normalize
from websockets.sync.client import connect

pytestmark = pytest.mark.e2e

JFK = REPO / "streamd" / "data" / "jfk.wav"
RATE = 16000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("context")
    config = workdir / "streamd.toml"
    config.write_text("[recognition]\nbatch_sizes = [1, 2]\n")  # two sessions, short warm-up
    with serve(workdir, "--config", str(config), "--node", "ctx", startup_timeout=600,
               env={"JAX_LOG_COMPILES": "1"}) as d:
        yield d


def stream(daemon: Daemon, audio: np.ndarray, **start: object) -> list[dict]:
    """Streams `audio` at real time in 100 ms frames, then stop; every event up to done."""
    frame = RATE // 10
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    events: list[dict] = []
    with connect(daemon.url, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le",
                            "channels": 1, **start}))
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(pcm), frame)):
            time.sleep(max(0.0, t0 + k * 0.1 - time.monotonic()))
            ws.send(pcm[i : i + frame].tobytes())
        ws.send(json.dumps({"type": "stop"}))
        while True:
            event = json.loads(ws.recv(timeout=120))
            events.append(event)
            if event["type"] == "done":
                return events


def finals(events: list[dict]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "final"]


def test_jfk_finals_read_the_whole_sentence(daemon: Daemon) -> None:
    """Context on (the default) and off, two sessions at once: with context every final
    joined reads "ask not what your country can do for you", whatever the VAD split."""
    audio, rate = sf.read(JFK, dtype="float32")
    assert rate == RATE
    got: dict[str, list[dict]] = {}

    def run(name: str, **start: object) -> None:
        got[name] = stream(daemon, audio, session=name, **start)

    # The second session with a long `prompt`: prompts of any length, one shape.
    off = threading.Thread(target=run, args=("jfk-off",), kwargs={"context": False})
    off.start()
    run("jfk-on")
    off.join(180)
    run("jfk-prompt", prompt="Inaugural address of John F. Kennedy, 1961. " * 10)
    with_context, alone = finals(got["jfk-on"]), finals(got["jfk-off"])
    print("context on: ", with_context)
    print("context off:", alone)
    assert len(with_context) >= 2  # the VAD splits the recording at its pauses
    assert "ask not what your country can do for you" in normalize(" ".join(with_context))
    # Both sessions saw the same segmentation (same audio, same VAD).
    spans = [[(e["start"], e["end"]) for e in got[k] if e["type"] == "final"]
             for k in ("jfk-on", "jfk-off")]
    assert spans[0] == spans[1]
    print("with a prompt:", finals(got["jfk-prompt"]))
    logs = daemon.log_text().split("streamd.daemon: ready", 1)
    assert len(logs) == 2 and "Compiling" in logs[0], "compiles are logged at warm-up"
    assert "Compiling" not in logs[1], "something compiled while serving"


def test_start_prompt_is_validated(daemon: Daemon) -> None:
    """A `prompt` over the limit or not a string is refused (bad_request); the session
    goes on, and a valid prompt is accepted."""
    with connect(daemon.url) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "prompt": "x" * 501}))
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["code"] == "bad_request"
        assert "prompt" in event["message"]
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "prompt": "Kennedy, Fellow"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
