"""A session: audio bytes in -> resample -> VAD -> recognizer requests -> events out.

`Session` is sans-I/O: `feed()` / `finalize()` / `stop()` return outputs (event dicts to
emit, `Request`s for the recognizer, `Deferred` events that depend on the results
before them, and `ClearContext` where the recognizer forgets the session's previous
text); the driver hands recognizer results back with `resolve()`. `SessionRunner`
is that driver for asyncio: one ordered queue per session where partials are coalesced
(only the newest partial of a segment is worth computing) and finals are never dropped;
a final also supersedes its segment's partial in flight once the client has had a partial
of that segment, for recognizers that allow it (`supersede_partials`; under load, the
final then waits for no partial of its own session).

A segment is announced (`speech_start`) with its first partial or final that has words:
noise that the VAD took for speech, in which recognition finds no words, emits nothing
at all (no `speech_start`, no empty `final`). Segment numbers count announced segments,
so the VAD's own indices (in `SegmentInfo`) may skip ahead of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import soxr

from streamd import protocol
from streamd.config import VadConfig
from streamd.errors import StreamdError
from streamd.metrics import Metrics
from streamd.recognizer import Hypothesis, SegmentInfo, SegmentRecognizer, clear_context
from streamd.vad import RATE, SegmentEnded, SpeechPaused, SpeechStarted, VadSegmenter

log = logging.getLogger("streamd.session")


@dataclass
class Request:
    kind: Literal["partial", "final"]
    segment: SegmentInfo
    audio: np.ndarray  # [N] float32 at 16 kHz
    created: float = field(default_factory=time.monotonic)  # for latency metrics


@dataclass
class Deferred:
    """Events decided only when the driver reaches this output, after every request
    before it was resolved (e.g. `utterance_end` names the final that came before it)."""

    make: Callable[[], list[dict[str, Any]]]


@dataclass
class ClearContext:
    """The recognizer forgets the session's previous text here, after the finals before it
    (`streamd.recognizer.clear_context`): a client's `finalize` ends what came before, so
    the next segment is not decoded as its continuation."""


Output = dict[str, Any] | Request | Deferred | ClearContext

# After a segment's first partial came back empty, the next one waits only this much new
# audio (not `partial_interval_ms`): 3 of the 13 segments of the stream recording said
# nothing at ~0.5 s and their first partial came 0.45 s later.
RETRY_FIRST = RATE * 100 // 1000
RETRY_FIRST_UNTIL = RATE * 2  # segment length after which silence is no news any more


class Session:
    """State machine of one stream. Not thread-safe; one driver calls it."""

    def __init__(
        self,
        start: protocol.Start,
        vad: VadConfig,
        pipeline: str,
        partial_interval_ms: int = 400,
    ) -> None:
        self.start = start
        self.id = start.session
        self.pipeline = pipeline
        if start.endpoint_ms is not None:  # the client's own endpoint; the end padding
            # must fit in it, or a segment would end after the audio heard so far
            vad = dataclasses.replace(vad, endpoint_silence_ms=start.endpoint_ms,
                                      end_pad_ms=min(vad.end_pad_ms, start.endpoint_ms))
        self.segmenter = VadSegmenter(vad)
        self._resampler = (
            None if start.sample_rate == RATE
            else soxr.ResampleStream(start.sample_rate, RATE, 1, dtype="float32")
        )
        self._partial_every = RATE * partial_interval_ms // 1000
        self._last_partial = 0  # segment length (samples) at the last partial request
        self._spoke = False  # a partial event was sent for the active segment
        self.samples_in = 0  # 16 kHz samples produced so far
        self.segments = 0  # segments announced (speech_start sent)
        self.noise_segments = 0  # VAD segments dropped: recognition found no words
        self._held: dict[int, float] = {}  # VAD index -> start (s) of unannounced segments
        self._numbers: dict[int, int] = {}  # VAD index -> segment number clients see
        # utterance_end: the silence (samples) it waits for; the (VAD index, speech end)
        # of the segment that ended last while no speech has started since; the (VAD
        # index, number) of the latest final sent.
        self._utterance_end = (RATE * start.utterance_end_ms // 1000
                               if start.utterance_end_ms is not None else None)
        self._quiet_since: tuple[int, int] | None = None
        self._last_final: tuple[int, int] | None = None
        self.stopped = False

    def ready(self) -> dict[str, Any]:
        return protocol.ready_event(self.id, self.pipeline)

    def feed(self, data: bytes) -> list[Output]:
        """One binary frame in the client's encoding. Raises BadRequest; state stays intact."""
        return self.feed_samples(protocol.decode_audio(data, self.start))

    def feed_samples(self, audio: np.ndarray) -> list[Output]:
        """Mono float32 samples at the session's declared rate."""
        if self.stopped:
            return []
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        return self._accept(audio)

    def finalize(self) -> list[Output]:
        """The client's `finalize`: end the segment in flight now (its final follows, as
        at an endpoint), then `finalized` once every final before it has been sent."""
        if self.stopped:
            return []
        outputs = self._vad_outputs(self.segmenter.end_segment())
        outputs += self._utterance_end_due()
        outputs.append(ClearContext())
        outputs.append(Deferred(lambda: [protocol.finalized_event(self.id, self.segments)]))
        return outputs

    def stop(self) -> list[Output]:
        """End of audio: flush the resampler and the segment in flight."""
        if self.stopped:
            return []
        outputs: list[Output] = []
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            outputs += self._accept(tail)
        self.stopped = True
        outputs += self._vad_outputs(self.segmenter.flush())
        return outputs

    def done(self) -> dict[str, Any]:
        return protocol.done_event(self.id, self.segments)

    def _announce(self, index: int, last: bool = False) -> tuple[list[dict[str, Any]], int]:
        """(the segment's speech_start if it was still held, its number for clients);
        `last`: the segment's closing event (final or error), its number is forgotten."""
        events: list[dict[str, Any]] = []
        if index not in self._numbers:
            self._numbers[index] = self.segments
            self.segments += 1
            start = self._held.pop(index, None)
            if start is not None:  # else not a VAD segment (direct requests in tests)
                events.append(protocol.speech_start_event(self.id, self.segments - 1, start))
        number = self._numbers.pop(index) if last else self._numbers[index]
        return events, number

    def resolve(self, request: Request, hyp: Hypothesis | None) -> list[dict[str, Any]]:
        """A recognizer result -> the events to emit (none: nothing to say)."""
        seg = request.segment
        if request.kind == "final":
            text = hyp.text.strip() if hyp is not None else ""
            if not text and seg.index in self._held:  # never announced: it was noise
                del self._held[seg.index]
                self.noise_segments += 1
                return []
            events, number = self._announce(seg.index, last=True)
            self._last_final = (seg.index, number)
            words = [w.to_json() for w in hyp.words] if hyp is not None else None
            return events + [protocol.final_event(self.id, number, seg.start, seg.end, text,
                                                  words)]
        if not self.start.partials:
            return []
        if hyp is None or (not hyp.text.strip() and seg.index in self._held):
            if (not self._spoke and not seg.closing and self.segmenter.active
                    and seg.index == self.segmenter.segment):
                # The segment's first partial had nothing to say (Whisper heard too little
                # of it): try again after RETRY_FIRST more samples, not a whole interval.
                length = len(request.audio)
                if length < RETRY_FIRST_UNTIL:
                    self._last_partial = min(self._last_partial,
                                             length - self._partial_every + RETRY_FIRST)
            return []
        if seg.index == self.segmenter.segment:
            self._spoke = True
        events, number = self._announce(seg.index)
        return events + [protocol.partial_event(
            self.id, number, seg.start, seg.end, hyp.text.strip(), hyp.stable.strip() or None
        )]

    def failed(self, request: Request, code: str, message: str) -> list[dict[str, Any]]:
        """A failed recognition -> events: none for a partial (the final still comes); for
        a final, an error naming the segment in its place (announcing it if need be)."""
        if request.kind == "partial":
            return []
        events, number = self._announce(request.segment.index, last=True)
        return events + [protocol.error_event(code, f"segment {number}: {message}", self.id)]

    def _accept(self, audio: np.ndarray) -> list[Output]:
        self.samples_in += len(audio)
        outputs = self._vad_outputs(self.segmenter.accept(audio))
        seg = self.segmenter
        if seg.active and self.start.partials and not seg.paused:
            length = seg.position - seg.segment_start
            if length - self._last_partial >= self._partial_every:
                self._last_partial = length
                info = SegmentInfo(
                    self.id, seg.segment, seg.segment_start / RATE, seg.position / RATE
                )
                outputs.append(Request("partial", info, seg.active_audio()))
        return outputs + self._utterance_end_due()

    def _utterance_end_due(self) -> list[Output]:
        """`utterance_end` once the silence after the last ended segment's speech reaches
        the session's `utterance_end_ms` (not while the VAD weighs new voiced frames)."""
        if self._utterance_end is None or self._quiet_since is None or self.segmenter.candidate:
            return []
        index, speech_end = self._quiet_since
        if self.segmenter.position - speech_end < self._utterance_end:
            return []
        self._quiet_since = None

        def events() -> list[dict[str, Any]]:
            if self._last_final is None or self._last_final[0] != index:
                return []  # that segment was noise or failed: no final to follow
            return [protocol.utterance_end_event(self.id, self._last_final[1],
                                                 speech_end / RATE)]

        return [Deferred(events)]

    def _vad_outputs(self, events: list) -> list[Output]:
        outputs: list[Output] = []
        for event in events:
            if isinstance(event, SpeechStarted):
                self._last_partial, self._spoke = 0, False
                self._quiet_since = None  # speech again: no utterance end
                self._held[event.segment] = event.start / RATE  # announced with its words
            elif isinstance(event, SpeechPaused):
                # The would-be final's audio, as a partial the pipeline may turn into the
                # final early; sent with partials off too (it only returns a partial event
                # when partials are on). Periodic partials wait until speech resumes.
                self._last_partial = event.end - event.start
                info = SegmentInfo(self.id, event.segment, event.start / RATE, event.end / RATE,
                                   closing=True)
                outputs.append(Request("partial", info, event.audio))
            elif isinstance(event, SegmentEnded):
                info = SegmentInfo(self.id, event.segment, event.start / RATE, event.end / RATE)
                outputs.append(Request("final", info, event.audio))
                self._quiet_since = (event.segment, event.speech_end)
        return outputs


Emit = Callable[[dict[str, Any]], Awaitable[None]]


class SessionRunner:
    """Drives a Session's outputs in order: events emitted, recognizer requests awaited.

    `push()` is synchronous (callable from the receive loop); a single worker task runs
    requests one at a time, so calls to the recognizer never overlap for a session.
    """

    def __init__(
        self,
        session: Session,
        recognizer: SegmentRecognizer,
        emit: Emit,
        metrics: Metrics | None = None,
        max_pending: int = 64,
    ) -> None:
        self.session = session
        self.max_pending = max_pending
        self._room = asyncio.Event()
        self._room.set()
        self.recognizer = recognizer
        self._emit = emit
        self._metrics = metrics
        self._items: deque[Output] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        # The request being recognized and its task; the segment given a partial event last.
        self._current: tuple[Request, asyncio.Task] | None = None
        self._spoken: int | None = None
        self._supersede_partials = bool(getattr(recognizer, "supersede_partials", False))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"session-{self.session.id}")

    @property
    def pending(self) -> int:
        return len(self._items)

    def push(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Request):
                seg = out.segment.index
                stale = [
                    o for o in self._items
                    if isinstance(o, Request) and o.kind == "partial" and o.segment.index == seg
                ]
                for o in stale:  # coalesce: a newer partial or the final supersedes them
                    self._items.remove(o)
                    self._count_drop("partial_coalesced")
                if out.kind == "final":
                    self._supersede(seg)
            self._items.append(out)
        if outputs:
            self._wake.set()
        if len(self._items) >= self.max_pending:
            self._room.clear()

    def _supersede(self, segment: int) -> None:
        """The final of `segment` is due: cancel that segment's partial in flight, if the
        client already had a partial of it. A session runs one request at a time, so its
        final would otherwise wait for that partial, and under load for all that runs
        before it (the engine withdraws a cancelled request that has not started). Not a
        `closing` partial: a pipeline may make it the final early (whisper), and not the
        segment's first partial: every segment keeps at least one. Only where the
        recognizer says its partials may be cancelled (`SegmentRecognizer`)."""
        if self._current is None or not self._supersede_partials:
            return
        req, task = self._current
        if (req.kind == "partial" and not req.segment.closing and req.segment.index == segment
                and self._spoken == segment and not task.done()):
            task.cancel()
            self._count_drop("partial_superseded")

    async def wait_room(self) -> None:
        """Back-pressure for sources that can wait (a socket): returns once the backlog
        (finals and events; partials are coalesced) is under `max_pending`."""
        await self._room.wait()

    async def finish(self) -> None:
        """Process everything pushed so far, then stop. The caller pushes stop() first."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                while not self._items:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                out = self._items.popleft()
                if len(self._items) < self.max_pending:
                    self._room.set()
                if isinstance(out, Request):
                    for event in await self._recognize_current(out):
                        await self._emit(event)
                elif isinstance(out, Deferred):
                    for event in out.make():
                        await self._emit(event)
                elif isinstance(out, ClearContext):
                    clear_context(self.recognizer)
                else:
                    await self._emit(out)
        finally:
            self.recognizer.close()

    async def _recognize_current(self, req: Request) -> list[dict[str, Any]]:
        """`_recognize` as a task that `_supersede` may cancel (then no events)."""
        task = asyncio.create_task(self._recognize(req))
        self._current = (req, task)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:  # the runner itself is cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the recognizer's call ends before close() in _run
            raise
        finally:
            self._current = None
        if task.cancelled():
            return []
        events = task.result()
        if req.kind == "partial" and any(e["type"] == "partial" for e in events):
            self._spoken = req.segment.index
        return events

    async def _recognize(self, req: Request) -> list[dict[str, Any]]:
        t0 = time.monotonic()
        try:
            if req.kind == "partial":
                hyp = await self.recognizer.partial(req.audio, req.segment)
            else:
                hyp = await self.recognizer.final(req.audio, req.segment)
        except StreamdError as exc:
            return self._failed(req, exc.code, str(exc))
        except Exception as exc:  # pipeline bug: report it, keep the session alive
            log.exception("recognizer %s failed in session %s", req.kind, self.session.id)
            message = f"{req.kind} recognition failed: {type(exc).__name__}"
            return self._failed(req, "internal", message)
        now = time.monotonic()
        noise = self.session.noise_segments
        events = self.session.resolve(req, hyp)
        if self._metrics is not None:
            audio_s = len(req.audio) / RATE
            self._metrics.observe_recognition(req.kind, now - req.created, now - t0, audio_s)
            if any(e["type"] == "final" for e in events):
                self._metrics.segments.inc()
            if self.session.noise_segments > noise:
                self._metrics.noise_segments.inc()
        return events

    def _failed(self, req: Request, code: str, message: str) -> list[dict[str, Any]]:
        if self._metrics is not None:
            self._metrics.errors.labels(code=code).inc()
        return self.session.failed(req, code, message)

    def _count_drop(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.drops.labels(reason=reason).inc()
