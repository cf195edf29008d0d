"""Sans-I/O speech segmenter: 16 kHz float samples in, segment events out.

webrtcvad classifies fixed frames (10/20/30 ms); a frame also needs energy above a
floor, so faint noise is never speech. A segment is only confirmed (SpeechStarted)
once it holds `min_speech_ms` of voiced frames, so every started segment gets exactly
one SegmentEnded and pure noise or silence never produces one. Positions are sample
indices of the 16 kHz stream, always on frame boundaries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import webrtcvad

from streamd.config import VadConfig

RATE = 16000


@dataclass(frozen=True)
class SpeechStarted:
    segment: int
    start: int  # sample index, includes the start padding


@dataclass(frozen=True)
class SegmentEnded:
    segment: int
    start: int
    end: int  # exclusive
    audio: np.ndarray  # [end - start] float32
    reason: Literal["endpoint", "max_length", "flush", "finalize"]
    speech_end: int = 0  # end (exclusive) of the last voiced frame: the end padding starts


@dataclass(frozen=True)
class SpeechPaused:
    """The active segment has been silent for the end padding: if the endpoint comes
    without new speech, its SegmentEnded carries exactly this audio. Lets a recognizer
    start the final's work during the rest of the endpoint wait."""

    segment: int
    start: int
    end: int  # exclusive
    audio: np.ndarray  # [end - start] float32


VadEvent = SpeechStarted | SpeechPaused | SegmentEnded


@dataclass
class _Frame:
    index: int
    audio: np.ndarray
    level_db: float
    voiced: bool


def level_dbfs(audio: np.ndarray) -> float:
    """RMS level in dB relative to full scale (1.0)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
    return 20.0 * np.log10(max(rms, 1e-10))


class VadSegmenter:
    """`accept(samples) -> events`; `flush() -> events` ends speech in flight (client stop)."""

    def __init__(self, config: VadConfig) -> None:
        self.config = config
        self.frame_len = RATE * config.frame_ms // 1000
        ms = config.frame_ms
        self._pad_frames = -(-config.start_pad_ms // ms)
        self._end_pad_frames = -(-config.end_pad_ms // ms)
        self._endpoint_frames = -(-config.endpoint_silence_ms // ms)
        self._min_frames = max(1, -(-config.min_speech_ms // ms))
        self._max_frames = int(config.max_segment_s * 1000) // ms
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._pending = np.zeros(0, np.float32)
        self._next_index = 0
        self._ring: deque[_Frame] = deque(maxlen=max(self._pad_frames, 1))
        self._frames: list[_Frame] = []  # candidate or active segment, pre-roll included
        self._voiced = 0  # voiced frames in self._frames
        self._state: Literal["idle", "candidate", "active"] = "idle"
        self._segment = 0

    @property
    def position(self) -> int:
        """Samples consumed into whole frames so far."""
        return self._next_index * self.frame_len

    @property
    def active(self) -> bool:
        return self._state == "active"

    @property
    def candidate(self) -> bool:
        """Voiced frames heard, but not yet enough to confirm a segment."""
        return self._state == "candidate"

    @property
    def paused(self) -> bool:
        """Active, and silent for at least the end padding (see SpeechPaused)."""
        return (self._state == "active" and self._end_pad_frames > 0
                and self._silence_run() >= self._end_pad_frames)

    @property
    def segment(self) -> int:
        """Index of the active segment, or of the next one when idle."""
        return self._segment

    @property
    def segment_start(self) -> int:
        return self._frames[0].index * self.frame_len if self._frames else self.position

    def active_audio(self) -> np.ndarray:
        """Audio of the active segment so far, [N] float32 (empty when none is active)."""
        if self._state != "active":
            return np.zeros(0, np.float32)
        return np.concatenate([f.audio for f in self._frames])

    def accept(self, samples: np.ndarray) -> list[VadEvent]:
        """Feed 16 kHz mono float32 samples of any length."""
        buf = np.concatenate([self._pending, np.asarray(samples, np.float32)])
        n = len(buf) // self.frame_len
        self._pending = buf[n * self.frame_len :]
        events: list[VadEvent] = []
        for k in range(n):
            events.extend(self._frame(buf[k * self.frame_len : (k + 1) * self.frame_len]))
        return events

    def end_segment(self) -> list[VadEvent]:
        """End the active segment now (a client's `finalize`), as the endpoint would have
        after the audio so far: the end padding as far as it was heard. The stream goes
        on; samples short of a frame stay pending. Nothing when no segment is active (a
        candidate is not speech yet and is left to the VAD)."""
        if self._state != "active":
            return []
        end = min(self._last_voiced() + 1 + self._end_pad_frames, self._next_index)
        return [self._end(end, "finalize")]

    def flush(self) -> list[VadEvent]:
        """End the active segment now (a partial frame is dropped) and reset to idle."""
        events: list[VadEvent] = []
        if self._state == "active":
            end = min(self._last_voiced() + 1 + self._end_pad_frames, self._next_index)
            events.append(self._end(end, "flush"))
        self._state = "idle"
        self._frames = []
        self._ring.clear()
        self._pending = np.zeros(0, np.float32)
        return events

    def _is_speech(self, frame: np.ndarray, level: float) -> bool:
        if level < self.config.energy_floor_dbfs:
            return False
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        return self._vad.is_speech(pcm, RATE)

    def _frame(self, audio: np.ndarray) -> list[VadEvent]:
        level = level_dbfs(audio)
        frame = _Frame(self._next_index, audio, level, self._is_speech(audio, level))
        self._next_index += 1
        if self._state == "idle":
            if not frame.voiced:
                if self._pad_frames:
                    self._ring.append(frame)
                return []
            self._frames = [*self._ring, frame]
            # A dropped candidate's frames may sit in the ring, voiced ones included.
            self._voiced = sum(f.voiced for f in self._frames)
            self._ring.clear()
            self._state = "candidate"
        else:
            self._frames.append(frame)
            self._voiced += frame.voiced
        silence = self._silence_run()
        if self._state == "candidate":
            if self._voiced >= self._min_frames:
                self._state = "active"
                return [SpeechStarted(self._segment, self.segment_start)]
            if silence >= self._endpoint_frames:  # too little speech: noise, forget it
                self._to_idle(self._frames)
            return []
        if silence >= self._endpoint_frames:
            end = self._last_voiced() + 1 + self._end_pad_frames
            return [self._end(end, "endpoint")]
        if self._next_index - self._frames[0].index >= self._max_frames:
            return self._split()
        if self._end_pad_frames and silence == self._end_pad_frames:
            audio = np.concatenate([f.audio for f in self._frames])
            return [SpeechPaused(self._segment, self.segment_start, self.position, audio)]
        return []

    def _silence_run(self) -> int:
        run = 0
        for f in reversed(self._frames):
            if f.voiced:
                break
            run += 1
        return run

    def _last_voiced(self) -> int:
        return max(f.index for f in self._frames if f.voiced)

    def _end(self, end: int,
             reason: Literal["endpoint", "max_length", "flush", "finalize"]) -> SegmentEnded:
        """Close the active segment at frame `end` (exclusive); later frames go back to idle."""
        first = self._frames[0].index
        kept = [f for f in self._frames if f.index < end]
        voiced = [f.index for f in kept if f.voiced]
        speech_end = (max(voiced) + 1) * self.frame_len if voiced else end * self.frame_len
        event = SegmentEnded(
            self._segment, first * self.frame_len, end * self.frame_len,
            np.concatenate([f.audio for f in kept]), reason, speech_end,
        )
        self._segment += 1
        self._to_idle([f for f in self._frames if f.index >= end])
        return event

    def _to_idle(self, leftover: list[_Frame]) -> None:
        self._state = "idle"
        self._frames = []
        self._ring.clear()
        if self._pad_frames:
            self._ring.extend(leftover[-self._pad_frames :])

    def _split(self) -> list[VadEvent]:
        """Over the maximum length: cut at the quietest frame of the later half."""
        first = self._frames[0].index
        half = first + self._max_frames // 2
        candidates = [f for f in self._frames if f.index >= half]
        cut = min(reversed(candidates), key=lambda f: f.level_db).index
        rest = [f for f in self._frames if f.index >= cut]
        ended = self._end(cut, "max_length")
        # Speech continues: the remainder is the next segment, already confirmed.
        self._ring.clear()
        self._frames = rest
        self._voiced = sum(f.voiced for f in rest)
        self._state = "active"
        return [ended, SpeechStarted(self._segment, self.segment_start)]
