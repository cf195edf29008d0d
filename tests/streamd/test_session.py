"""Sans-I/O Session driven without sockets, and the SessionRunner's ordering policy."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soundfile as sf
import soxr

from streamd.config import VadConfig
from streamd.errors import BadRequest
from streamd.protocol import Start
from streamd.recognizer import Hypothesis, SegmentInfo
from streamd.session import ClearContext, Deferred, Request, Session, SessionRunner


def utterance(shared_audio_dir) -> np.ndarray:
    audio, _ = sf.read(shared_audio_dir / "librispeech_61-70968-0002.wav", dtype="float32")
    gap = np.zeros(16000, np.float32)
    return np.concatenate([gap, audio, gap, audio, gap])  # two utterances, 1 s apart


def feed_all(session: Session, data: bytes, chunk: int) -> list:
    outputs = []
    for i in range(0, len(data), chunk):
        outputs += session.feed(data[i : i + chunk])
    return outputs + session.stop()


def new_session(rate: int = 16000, encoding: str = "pcm_s16le", channels: int = 1,
                partials: bool = True) -> Session:
    start = Start(rate, encoding, channels, "s1", None, partials)
    return Session(start, VadConfig(), "test", partial_interval_ms=400)


def encode(audio: np.ndarray, rate: int, encoding: str, channels: int) -> bytes:
    if rate != 16000:
        audio = soxr.resample(audio, 16000, rate).astype(np.float32)
    audio = np.repeat(audio[:, None], channels, axis=1).reshape(-1)
    if encoding == "pcm_s16le":
        return (audio * 32767).astype("<i2").tobytes()
    return audio.astype("<f4").tobytes()


def finals(outputs: list) -> list[Request]:
    return [o for o in outputs if isinstance(o, Request) and o.kind == "final"]


def test_outputs_in_order(shared_audio_dir) -> None:
    session = new_session()
    outputs = feed_all(session, encode(utterance(shared_audio_dir), 16000, "pcm_s16le", 1), 3200)
    # Only recognizer requests: speech_start waits for the segment's first words.
    assert all(isinstance(o, Request) for o in outputs)
    kinds = [o.kind for o in outputs]
    # partial requests, final; twice.
    assert kinds.count("final") == 2 and kinds[-1] == "final"
    second = kinds.index("final") + 1
    for k in kinds[: second - 1] + kinds[second:-1]:
        assert k == "partial"
    reqs = [o for o in outputs if isinstance(o, Request)]
    for r in reqs:
        seg = r.segment
        assert len(r.audio) == round((seg.end - seg.start) * 16000)
    parts = [r for r in reqs if r.kind == "partial" and r.segment.index == 0]
    periodic = [p for p in parts if not p.segment.closing]
    assert len(periodic) >= 5  # ~3 s of speech, one per 400 ms
    gaps = np.diff([round(p.segment.end * 16000) for p in periodic])
    assert (gaps >= 6400).all()
    f0, f1 = finals(outputs)
    # The last request before each final is the closing partial on exactly its audio.
    for f in (f0, f1):
        k = outputs.index(f)
        closing = outputs[k - 1]
        assert isinstance(closing, Request) and closing.segment.closing
        assert closing.segment.start == f.segment.start and closing.segment.end == f.segment.end
        np.testing.assert_array_equal(closing.audio, f.audio)
        assert sum(r.segment.closing for r in reqs if r.segment.index == f.segment.index) == 1
    assert f0.segment.index == 0 and f1.segment.index == 1
    assert 0.6 <= f0.segment.start <= 1.0 and 3.8 <= f0.segment.end <= 4.4
    assert f1.segment.start - f0.segment.start == pytest.approx(3.97, abs=0.05)  # same audio
    # Each segment is announced with its first words, then gets its final.
    events = []
    for r in reqs:
        events += session.resolve(r, Hypothesis("words"))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "speech_start" and kinds.count("speech_start") == 2
    second = kinds.index("speech_start", 1)
    assert kinds[second - 1] == "final" and kinds[-1] == "final"
    assert [e["segment"] for e in events if e["type"] != "partial"] == [0, 0, 1, 1]
    assert events[0]["start"] == round(f0.segment.start, 3)
    assert session.segments == 2 and session.done()["segments"] == 2


def test_segments_without_words_are_dropped_silently(shared_audio_dir) -> None:
    """A VAD segment in which recognition finds no words (noise the VAD took for speech)
    emits nothing: no speech_start, no empty final; the next segment with words is
    number 0 and starts with its speech_start."""
    session = new_session()
    outputs = feed_all(session, encode(utterance(shared_audio_dir), 16000, "pcm_s16le", 1), 3200)
    events = []
    for r in outputs:  # segment 0 is "noise": empty partials and an empty final
        noise = r.segment.index == 0
        events += session.resolve(r, Hypothesis("" if noise else "words"))
    assert session.noise_segments == 1
    assert [e["type"] for e in events if e["type"] != "partial"] == ["speech_start", "final"]
    assert all(e["segment"] == 0 for e in events)
    f1 = finals(outputs)[1]
    assert events[0]["start"] == round(f1.segment.start, 3)
    assert session.done()["segments"] == 1
    # A segment announced by a partial keeps its (empty) final: exactly one per segment.
    session = new_session()
    outputs = feed_all(session, encode(utterance(shared_audio_dir), 16000, "pcm_s16le", 1), 3200)
    events = []
    for r in outputs:
        events += session.resolve(r, Hypothesis("uh" if r.kind == "partial" else ""))
    finals_ = [e for e in events if e["type"] == "final"]
    assert [f["text"] for f in finals_] == ["", ""] and session.noise_segments == 0


@pytest.mark.parametrize("rate,encoding,channels", [(8000, "pcm_s16le", 1),
                                                    (22050, "pcm_f32le", 1),
                                                    (48000, "pcm_s16le", 2)])
def test_resampling_keeps_the_timeline(shared_audio_dir, rate, encoding, channels) -> None:
    audio = utterance(shared_audio_dir)
    ref = finals(feed_all(new_session(), encode(audio, 16000, "pcm_s16le", 1), 3200))
    session = new_session(rate, encoding, channels)
    frame = session.start.frame_bytes
    got = finals(feed_all(session, encode(audio, rate, encoding, channels), 997 * frame))
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref, strict=True):
        assert abs(a.segment.start - b.segment.start) <= 0.07
        assert abs(a.segment.end - b.segment.end) <= 0.07
    # The resampler's output length tracks the input (no drift, nothing lost at stop).
    assert abs(session.samples_in - len(audio)) <= 16


def test_bad_frames_raise_and_leave_state_intact(shared_audio_dir) -> None:
    session = new_session(encoding="pcm_f32le")
    audio = utterance(shared_audio_dir).astype("<f4").tobytes()
    out = session.feed(audio[: 16000 * 4 * 2])
    with pytest.raises(BadRequest, match="multiple of 4"):
        session.feed(b"\0" * 6)
    with pytest.raises(BadRequest, match="NaN"):
        session.feed(np.array([np.nan, 0], "<f4").tobytes())
    out += session.feed(audio[16000 * 4 * 2 :]) + session.stop()
    clean = new_session(encoding="pcm_f32le")
    ref = clean.feed(audio[: 16000 * 4 * 2]) + clean.feed(audio[16000 * 4 * 2 :]) + clean.stop()
    assert [f.segment for f in finals(out)] == [f.segment for f in finals(ref)]
    assert session.feed(b"\0\0\0\0") == [] and session.stop() == []  # after stop: inert


def test_no_partials_when_disabled(shared_audio_dir) -> None:
    session = new_session(partials=False)
    outputs = feed_all(session, encode(utterance(shared_audio_dir), 16000, "pcm_s16le", 1), 3200)
    # Only the closing requests (the final computed early), which resolve to no event.
    reqs = [o for o in outputs if isinstance(o, Request)]
    assert all(r.kind == "final" or r.segment.closing for r in reqs)
    assert all(session.resolve(r, Hypothesis("x")) == [] for r in reqs if r.kind == "partial")
    # The final announces its segment: speech_start, then the final.
    events = session.resolve(finals(outputs)[0], Hypothesis("x"))
    assert [e["type"] for e in events] == ["speech_start", "final"]


def test_empty_first_partial_is_retried_soon(shared_audio_dir) -> None:
    """When a segment's first partial has nothing to say, the next comes after 100 ms more
    audio instead of a whole partial interval; once a partial was sent, the interval holds."""
    audio = encode(utterance(shared_audio_dir), 16000, "pcm_s16le", 1)
    frame = 3200  # 100 ms of s16 audio per feed

    def partial_ends(answer) -> list[float]:
        session, ends = new_session(), []
        for i in range(0, 16000 * 2 * 4, frame):  # the first 4 s: segment 0 from ~0.7 s
            for out in session.feed(audio[i : i + frame]):
                if isinstance(out, Request) and out.kind == "partial":
                    if out.segment.closing or out.segment.index > 0:
                        continue  # the pause's request, or the next segment
                    ends.append(out.segment.end - out.segment.start)  # segment length
                    session.resolve(out, answer(len(ends)))
        return ends

    always = partial_ends(lambda k: Hypothesis("hello"))
    assert np.diff(always).min() >= 0.4 - 1e-9  # one per 400 ms of audio
    first_empty = partial_ends(lambda k: None if k == 1 else Hypothesis("hello"))
    assert first_empty[0] == always[0]
    # 100 ms, seen at the client's 100 ms frames on the VAD's 30 ms frames: < 0.24 s
    assert 0.1 <= first_empty[1] - first_empty[0] < 0.24
    assert np.diff(first_empty[1:]).min() >= 0.4 - 1e-9  # back to the interval
    never = partial_ends(lambda k: None)  # retried after 100 ms for the first 2 s only
    soon = [b - a for a, b in zip(never, never[1:], strict=False) if b < 2.0]
    # (a pause in the speech holds partials back; it shows as one longer gap)
    assert sum(g < 0.24 for g in soon) >= 5 and sorted(soon)[len(soon) // 2] < 0.24
    late = [b - a for a, b in zip(never, never[1:], strict=False) if a >= 2.0]
    assert late and min(late) >= 0.4 - 1e-9


def test_resolve_builds_contract_events() -> None:
    session = new_session()
    seg = SegmentInfo("s1", 3, 1.23456, 2.5)
    partial, = session.resolve(Request("partial", seg, np.zeros(10, np.float32)),
                               Hypothesis("hello wor", stable="hello"))
    assert partial["type"] == "partial" and partial["stable"] == "hello"
    assert partial["segment"] == 0  # numbers count this session's segments
    assert session.resolve(Request("partial", seg, np.zeros(1, np.float32)), None) == []
    final, = session.resolve(Request("final", seg, np.zeros(10, np.float32)),
                             Hypothesis(" hello world ", words=()))
    assert final == {"type": "final", "session": "s1", "segment": 0, "start": 1.235,
                     "end": 2.5, "text": "hello world"}


class _SlowRecognizer:
    """Records calls; partials are slow, so later ones queue up behind them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.closed = False

    async def partial(self, audio: np.ndarray, segment: SegmentInfo) -> Hypothesis | None:
        self.calls.append(("partial", segment.index, len(audio)))
        await asyncio.sleep(0.05)
        return Hypothesis(f"p{len(audio)}")

    async def final(self, audio: np.ndarray, segment: SegmentInfo) -> Hypothesis:
        self.calls.append(("final", segment.index, len(audio)))
        if segment.index == 1:
            raise RuntimeError("model exploded")
        return Hypothesis(f"f{len(audio)}")

    def close(self) -> None:
        self.closed = True


def test_runner_coalesces_partials_never_drops_finals(shared_audio_dir) -> None:
    from streamd.metrics import Metrics

    audio = encode(np.concatenate([utterance(shared_audio_dir)] * 2), 16000, "pcm_s16le", 1)
    session = new_session()
    recognizer = _SlowRecognizer()
    metrics = Metrics()
    emitted: list[dict] = []

    async def emit(event: dict) -> None:
        emitted.append(event)

    async def main() -> None:
        runner = SessionRunner(session, recognizer, emit, metrics)
        runner.start()
        for i in range(0, len(audio), 3200):  # all at once: the runner falls behind
            runner.push(session.feed(audio[i : i + 3200]))
        runner.push(session.stop())
        await runner.finish()

    asyncio.run(main())
    assert recognizer.closed
    finals_ = [e for e in emitted if e["type"] == "final"]
    errors = [e for e in emitted if e["type"] == "error"]
    # Four segments: one final each, except segment 1 whose recognizer failed -> an error.
    assert [f["segment"] for f in finals_] == [0, 2, 3]
    assert len(errors) == 1 and errors[0]["code"] == "internal"
    assert "segment 1" in errors[0]["message"]
    for f in finals_:
        assert f["text"] == f"f{round((f['end'] - f['start']) * 16000)}"
    # Partials were coalesced: far fewer recognizer calls than requests made.
    assert sum(c[0] == "partial" for c in recognizer.calls) <= 4
    assert metrics.drops.labels(reason="partial_coalesced")._value.get() >= 10
    # Order: every event of segment k comes after segment k-1's final or error.
    order = [(e.get("segment"), e["type"]) for e in emitted]
    seg_seq = [s for s, _ in order if s is not None]
    assert seg_seq == sorted(seg_seq)


def test_runner_back_pressure_on_backlog() -> None:
    class Gated:
        def __init__(self) -> None:
            self.gate = asyncio.Event()

        async def partial(self, audio, segment):
            return None

        async def final(self, audio, segment):
            await self.gate.wait()
            return Hypothesis("x")

        def close(self) -> None:
            pass

    async def main() -> list[dict]:
        emitted: list[dict] = []

        async def emit(event: dict) -> None:
            emitted.append(event)

        rec = Gated()
        runner = SessionRunner(new_session(), rec, emit, max_pending=3)
        runner.start()
        reqs = [Request("final", SegmentInfo("s1", i, i, i + 0.5), np.zeros(8000, np.float32))
                for i in range(5)]
        runner.push(reqs)
        with pytest.raises(TimeoutError):  # backlog full: a socket reader would pause here
            await asyncio.wait_for(runner.wait_room(), 0.1)
        rec.gate.set()
        await asyncio.wait_for(runner.wait_room(), 2)
        await runner.finish()
        return emitted

    emitted = asyncio.run(main())
    assert [e["segment"] for e in emitted if e["type"] == "final"] == [0, 1, 2, 3, 4]


def test_final_supersedes_its_segments_partial_in_flight() -> None:
    """Once the client had a partial of a segment, its final does not wait for the
    segment's next partial in flight (cancelled, counted); a segment's first partial is
    waited for."""
    from streamd.metrics import Metrics

    class Held:
        supersede_partials = True

        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.cancelled: list[int] = []

        async def partial(self, audio, segment):
            if len(audio) > 1:  # the first partial of each segment is quick
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.cancelled.append(segment.index)
                    raise
            return Hypothesis(f"p{len(audio)}")

        async def final(self, audio, segment):
            return Hypothesis("f")

        def close(self) -> None:
            pass

    def req(kind: str, index: int, samples: int, closing: bool = False) -> Request:
        info = SegmentInfo("s1", index, 0.0, 1.0, closing=closing)
        return Request(kind, info, np.zeros(samples, np.float32))

    async def main() -> tuple[list[dict], Held, Metrics]:
        emitted: list[dict] = []

        async def emit(event: dict) -> None:
            emitted.append(event)

        rec, metrics = Held(), Metrics()
        runner = SessionRunner(new_session(), rec, emit, metrics)
        runner.start()
        runner.push([req("partial", 0, 1)])  # said
        await asyncio.sleep(0.05)
        runner.push([req("partial", 0, 2)])  # held
        await asyncio.sleep(0.05)
        runner.push([req("final", 0, 3)])  # supersedes the held partial
        await asyncio.sleep(0.05)
        assert [e["type"] for e in emitted] == ["partial", "final"]
        runner.push([req("partial", 1, 2)])  # segment 1's first partial: waited for
        await asyncio.sleep(0.05)
        runner.push([req("final", 1, 3)])
        await asyncio.sleep(0.05)
        assert [e["type"] for e in emitted] == ["partial", "final"]
        rec.release.set()
        await runner.finish()
        return emitted, rec, metrics

    emitted, rec, metrics = asyncio.run(main())
    assert [(e["type"], e["segment"]) for e in emitted] == [
        ("partial", 0), ("final", 0), ("partial", 1), ("final", 1)]
    assert emitted[0]["text"] == "p1" and rec.cancelled == [0]
    assert metrics.drops.labels(reason="partial_superseded")._value.get() == 1


# --- finalize, utterance_end, per-session endpoint ----------------------------------


def session_with(**start: object) -> Session:
    return Session(Start(16000, "pcm_f32le", 1, "s1", None, True, **start), VadConfig(),
                   "test", partial_interval_ms=400)


def drive(session: Session, outputs: list, text=lambda r: "words") -> list[dict]:
    """Resolve outputs in order, as the runner does; `text(request)` is the recognizer."""
    events: list[dict] = []
    for out in outputs:
        if isinstance(out, Request):
            events += session.resolve(out, Hypothesis(text(out)))
        elif isinstance(out, Deferred):
            events += out.make()
        elif not isinstance(out, ClearContext):
            events.append(out)
    return events


def feed_f32(session: Session, audio: np.ndarray, chunk: int = 1600) -> list:
    outputs = []
    for i in range(0, len(audio), chunk):
        outputs += session.feed(audio[i : i + chunk].astype("<f4").tobytes())
    return outputs


def test_finalize_ends_the_segment_in_flight_then_says_finalized(shared_audio_dir) -> None:
    audio = utterance(shared_audio_dir)
    cut = 16000 + 24000  # 1.5 s into the first utterance: speech in flight
    session = session_with()
    outputs = feed_f32(session, audio[:cut])
    assert session.segmenter.active
    finalize = session.finalize()
    final = [o for o in finalize if isinstance(o, Request)]
    assert [r.kind for r in final] == ["final"] and isinstance(finalize[-1], Deferred)
    # The previous text is forgotten after that final, before the next segment.
    clear = [i for i, o in enumerate(finalize) if isinstance(o, ClearContext)]
    assert len(clear) == 1 and finalize.index(final[0]) < clear[0]
    assert final[0].segment.end <= cut / 16000  # nothing after the audio heard so far
    events = drive(session, outputs + finalize)
    assert [e["type"] for e in events if e["type"] != "partial"] == [
        "speech_start", "final", "finalized"]
    assert events[-1] == {"type": "finalized", "session": "s1", "segments": 1}
    # The stream goes on: the rest of the utterance is a new segment with its own final.
    later = drive(session, feed_f32(session, audio[cut:]) + session.stop())
    finals_ = [e for e in later if e["type"] == "final"]
    assert [f["segment"] for f in finals_] == [1, 2]
    assert finals_[0]["start"] >= events[-2]["end"] - 0.3  # at most the start padding back


def test_finalize_without_speech_only_says_finalized(shared_audio_dir) -> None:
    session = session_with()
    assert drive(session, feed_f32(session, np.zeros(8000, np.float32))) == []
    assert drive(session, session.finalize()) == [
        {"type": "finalized", "session": "s1", "segments": 0}]
    # A segment that recognition found empty (noise) has no final: finalized only.
    audio = utterance(shared_audio_dir)
    outputs = feed_f32(session, audio[8000 : 16000 + 24000]) + session.finalize()
    events = drive(session, outputs, text=lambda r: "")
    assert events == [{"type": "finalized", "session": "s1", "segments": 0}]
    session.stop()
    assert session.finalize() == []


def test_utterance_end_follows_the_final_after_the_silence(shared_audio_dir) -> None:
    audio = utterance(shared_audio_dir)  # 1 s of silence after each utterance
    session = session_with(utterance_end_ms=800)
    outputs = feed_f32(session, audio) + session.stop()
    events = drive(session, outputs)
    kinds = [e["type"] for e in events if e["type"] != "partial"]
    assert kinds == ["speech_start", "final", "utterance_end"] * 2
    ends = [e for e in events if e["type"] == "utterance_end"]
    finals_ = [e for e in events if e["type"] == "final"]
    for end, final in zip(ends, finals_, strict=True):
        assert end["segment"] == final["segment"]
        # Closed by the endpoint: the final ends the end padding after the speech.
        assert end["last_speech_end"] == pytest.approx(final["end"] - 0.3, abs=0.001)
    # Sent once the silence reached 800 ms: after the final's endpoint (510 ms), so
    # between the final request and the next speech.
    first_final = next(i for i, o in enumerate(outputs) if isinstance(o, Request)
                       and o.kind == "final")
    deferred = [i for i, o in enumerate(outputs) if isinstance(o, Deferred)]
    assert first_final < deferred[0]

    # Off unless asked for; none when the silence is shorter than asked; none after noise.
    for start, text in (({}, "words"), ({"utterance_end_ms": 5000}, "words"),
                        ({"utterance_end_ms": 800}, "")):
        session = session_with(**start)
        events = drive(session, feed_f32(session, audio) + session.stop(),
                       text=lambda r, t=text: t)
        assert not [e for e in events if e["type"] == "utterance_end"]


def test_speech_before_the_utterance_end_cancels_it(shared_audio_dir) -> None:
    audio = utterance(shared_audio_dir)
    session = session_with(utterance_end_ms=1500)  # longer than the 1 s gaps
    events = drive(session, feed_f32(session, audio[:-16000]) + session.stop())
    assert [e["type"] for e in events if e["type"] == "utterance_end"] == []
    session = session_with(utterance_end_ms=1500)  # then 2 s of silence: it comes
    tail = np.zeros(32000, np.float32)
    events = drive(session, feed_f32(session, np.concatenate([audio, tail])) + session.stop())
    assert [e["segment"] for e in events if e["type"] == "utterance_end"] == [1]


def test_endpoint_ms_per_session(shared_audio_dir) -> None:
    audio = utterance(shared_audio_dir)
    def segments(**start: object) -> list[Request]:
        session = session_with(**start)
        return finals(feed_f32(session, audio) + session.stop())

    assert len(segments()) == 2
    assert len(segments(endpoint_ms=2000)) == 1  # the 1 s gap no longer ends a segment
    short = segments(endpoint_ms=100)
    assert len(short) >= 2
    # The end padding shrinks to fit a short endpoint: segments never overlap.
    for a, b in zip(short, short[1:], strict=False):
        assert a.segment.end <= b.segment.start
