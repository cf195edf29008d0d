"""The real `deepgram-sdk` live client pointed at a local `streamd serve` (/v1/listen).

    dg = Listener(port, token, interim_results=True)   # query options, as the SDK sends
    assert dg.start()
    dg.send(audio)              # 16 kHz float32, as linear16 binary messages
    dg.close_stream()           # CloseStream; waits for Metadata (or the close)
    dg.finals(), dg.of("speech_started"), ...
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
from deepgram import DeepgramClient, DeepgramClientOptions, LiveTranscriptionEvents
from deepgram.clients.listen.v1.websocket.response import LiveResultResponse

RATE = 16000
EVENTS = {
    LiveTranscriptionEvents.Transcript: "result",
    LiveTranscriptionEvents.SpeechStarted: "speech_started",
    LiveTranscriptionEvents.UtteranceEnd: "utterance_end",
    LiveTranscriptionEvents.Metadata: "metadata",
    LiveTranscriptionEvents.Error: "error",
    LiveTranscriptionEvents.Close: "close",
}


def s16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


class Listener:
    """A `deepgram-sdk` live client on a local daemon; records every event it delivers."""

    def __init__(self, port: int, token: str, **options: Any) -> None:
        config = DeepgramClientOptions(url=f"ws://127.0.0.1:{port}")
        self.conn = DeepgramClient(token, config).listen.websocket.v("1")
        self.events: list[tuple[str, Any]] = []
        self.closed = threading.Event()
        self._lock = threading.Lock()
        for event, key in EVENTS.items():
            self.conn.on(event, self._handler(key))
        self.options = {"encoding": "linear16", "sample_rate": RATE, "channels": 1, **options}

    def _handler(self, key: str):
        def handle(_client: Any, *args: Any, **kwargs: Any) -> None:
            with self._lock:
                self.events.append((key, kwargs.get(key)))
            if key in ("metadata", "close"):
                self.closed.set()
        return handle

    def start(self) -> bool:
        return self.conn.start(self.options)

    def send(self, audio: np.ndarray, chunk_s: float = 0.1, pace: float = 0.01) -> None:
        """16 kHz float32 `audio` as linear16 messages of `chunk_s`, `pace` s apart."""
        step = round(RATE * chunk_s)
        for i in range(0, len(audio), step):
            assert self.conn.send(s16(audio[i : i + step]))
            time.sleep(pace)

    def close_stream(self, timeout: float = 30) -> None:
        """CloseStream, then wait for Metadata (the server closes after it)."""
        self.conn.send(json.dumps({"type": "CloseStream"}))
        assert self.closed.wait(timeout), self.events
        self.conn.finish()

    def of(self, key: str) -> list[Any]:
        with self._lock:
            return [v for k, v in self.events if k == key]

    def finals(self) -> list[LiveResultResponse]:
        return [r for r in self.of("result") if r.is_final]

    def wait(self, pred, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, self.events
            time.sleep(0.05)
