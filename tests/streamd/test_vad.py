"""VAD segmenter on real speech: segments near the reference utterances, none in noise."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from streamd.config import VadConfig
from streamd.vad import SegmentEnded, SpeechPaused, SpeechStarted, VadSegmenter


def segment(audio: np.ndarray, config: VadConfig, chunk: int = 1600) -> list:
    vad = VadSegmenter(config)
    events = []
    for i in range(0, len(audio), chunk):
        events += vad.accept(audio[i : i + chunk])
    return events + vad.flush()


def spans(events: list) -> list[tuple[float, float]]:
    return [(e.start / 16000, e.end / 16000) for e in events if isinstance(e, SegmentEnded)]


def check_pairing(events: list) -> None:
    """Every SpeechStarted has exactly one SegmentEnded, in order, with matching start;
    SpeechPaused only inside a segment."""
    open_start = None
    index = 0
    for e in events:
        if isinstance(e, SpeechStarted):
            assert open_start is None and e.segment == index
            open_start = e.start
        elif isinstance(e, SpeechPaused):
            assert open_start is not None and e.segment == index and e.start == open_start
            assert len(e.audio) == e.end - e.start
        else:
            assert e.segment == index and e.start == open_start
            assert len(e.audio) == e.end - e.start
            open_start = None
            index += 1
    assert open_start is None


@pytest.fixture(scope="module")
def stream(shared_manifest):
    entry = next(e for e in shared_manifest if e["audio"] == "stream_shared_01.wav")
    audio, rate = sf.read(entry["path"], dtype="float32")
    assert rate == 16000
    refs = [(s["start_s"], s["end_s"]) for s in entry["segments"]]
    return audio, refs


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


@pytest.mark.parametrize("frame_ms,aggressiveness", [(30, 2), (20, 3), (10, 1), (30, 0)])
def test_stream_segments_match_reference(stream, frame_ms, aggressiveness) -> None:
    audio, refs = stream
    events = segment(audio, VadConfig(frame_ms=frame_ms, aggressiveness=aggressiveness))
    check_pairing(events)
    got = spans(events)
    assert len(refs) == 11
    # Each found segment lies in one utterance (padding may reach 0.35 s into a gap).
    for g in got:
        best = max(refs, key=lambda r: _overlap(g, r))
        assert _overlap(g, best) >= 0.9 * (g[1] - g[0]) - 0.7, (g, best)
        assert best[0] - 0.45 <= g[0] and g[1] <= best[1] + 0.45, (g, best)
    # Each utterance is covered by the segments found in it (internal pauses allowed).
    for r in refs:
        covered = sum(_overlap(g, r) for g in got)
        assert covered >= 0.9 * (r[1] - r[0]), r
    # Noise-floor gaps between utterances (minus padding) hold no segment at all.
    gaps = [(a[1] + 0.4, b[0] - 0.4) for a, b in zip(refs, refs[1:], strict=False)]
    for gap in gaps:
        if gap[1] > gap[0]:
            assert all(_overlap(g, gap) == 0 for g in got), gap
    # Utterances are mostly found whole: at most a couple split at a long pause.
    assert len(refs) <= len(got) <= len(refs) + 3


def test_pause_announces_the_final_audio(stream) -> None:
    """SpeechPaused comes once the end padding is silent; when the endpoint follows with no
    speech in between, the segment's audio is exactly the paused audio (what a pipeline
    may decode early). A pause that speech interrupts is followed by a later one."""
    audio, _ = stream
    config = VadConfig()
    events = segment(audio, config)
    check_pairing(events)
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    reused = 0
    for k, e in enumerate(events):
        if isinstance(e, SegmentEnded) and e.reason == "endpoint":
            before = events[k - 1]
            assert isinstance(before, SpeechPaused)  # every endpoint is announced
            if before.end == e.end:
                np.testing.assert_array_equal(before.audio, e.audio)
                reused += 1
    # Announced at end padding (300 ms) of silence, 210 ms before the 510 ms endpoint.
    assert reused == len(ended) >= 11


def test_noise_and_silence_give_nothing() -> None:
    rng = np.random.default_rng(1)
    silence = np.zeros(16000 * 5, np.float32)
    noise = (rng.standard_normal(16000 * 5) * 1e-4).astype(np.float32)  # about -80 dBFS
    hum = (0.001 * np.sin(2 * np.pi * 50 * np.arange(16000 * 5) / 16000)).astype(np.float32)
    for audio in (silence, noise, hum):
        assert segment(audio, VadConfig()) == []


def test_short_burst_below_min_speech_is_ignored(shared_audio_dir) -> None:
    speech, _ = sf.read(shared_audio_dir / "jfk_inaugural_1961.wav", dtype="float32")
    voiced = speech[16000 : 16000 + 2400]  # 150 ms of speech
    audio = np.concatenate([np.zeros(16000, np.float32), voiced, np.zeros(32000, np.float32)])
    assert segment(audio, VadConfig(min_speech_ms=250)) == []
    assert len(spans(segment(audio, VadConfig(min_speech_ms=60)))) == 1


def test_long_speech_split_at_quietest_point(shared_audio_dir) -> None:
    speech, _ = sf.read(shared_audio_dir / "jfk_inaugural_1961.wav", dtype="float32")
    config = VadConfig(max_segment_s=4.0, endpoint_silence_ms=3000)
    events = segment(speech, config)
    check_pairing(events)
    ended = [e for e in events if isinstance(e, SegmentEnded)]
    splits = [e for e in ended if e.reason == "max_length"]
    assert splits, "11 s of speech with a 4 s maximum must be split"
    for e in ended:
        assert e.end - e.start <= 4.0 * 16000
    for a, b in zip(ended, ended[1:], strict=False):
        if a.reason == "max_length":
            assert a.end == b.start  # contiguous: no audio lost at a split
    # The cut is at the quietest frame of the later half of the window it was chosen in.
    frame = 480
    for e in splits:
        window = speech[e.start : e.start + 4 * 16000]
        levels = [np.sqrt(np.mean(window[i : i + frame] ** 2) + 1e-20)
                  for i in range(0, len(window) - frame + 1, frame)]
        cut = (e.end - e.start) // frame
        later = levels[len(levels) // 2 :]
        assert levels[cut] <= min(later) * 1.0001


def test_flush_ends_speech_in_flight(shared_audio_dir) -> None:
    speech, _ = sf.read(shared_audio_dir / "jfk_inaugural_1961.wav", dtype="float32")
    vad = VadSegmenter(VadConfig(endpoint_silence_ms=3000))
    events = vad.accept(speech[: 16000 * 3])
    assert any(isinstance(e, SpeechStarted) for e in events) and vad.active
    assert len(vad.active_audio()) == vad.position - vad.segment_start
    flushed = vad.flush()
    assert len(flushed) == 1 and flushed[0].reason == "flush"
    assert flushed[0].end <= 16000 * 3
    assert not vad.active and vad.flush() == []


def test_chunking_does_not_change_segments(stream) -> None:
    audio, _ = stream
    part = audio[: 16000 * 30]
    a = spans(segment(part, VadConfig(), chunk=160))
    b = spans(segment(part, VadConfig(), chunk=48000))
    assert a == b and a


def test_end_segment_closes_speech_in_flight_and_the_stream_goes_on(shared_audio_dir) -> None:
    """A client's finalize: the active segment ends at the audio heard so far, its
    speech_end is where its last voiced frame ends, samples short of a frame stay
    pending, and later speech is a new segment on the same timeline."""
    audio, _ = sf.read(shared_audio_dir / "librispeech_61-70968-0002.wav", dtype="float32")
    signal = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(16000, np.float32)])
    vad = VadSegmenter(VadConfig())
    cut = 8000 + 24000 + 123  # mid-utterance, not on a frame boundary
    events = vad.accept(signal[:cut])
    assert vad.active
    ended = vad.end_segment()
    assert len(ended) == 1 and isinstance(ended[0], SegmentEnded)
    e = ended[0]
    assert e.reason == "finalize" and e.end <= vad.position <= cut
    assert e.end - e.speech_end <= vad.config.end_pad_ms * 16 and e.speech_end > e.start
    assert vad.end_segment() == []  # nothing open any more
    rest = vad.accept(signal[cut:]) + vad.flush()
    check_pairing(events + ended + rest)
    later = [x for x in rest if isinstance(x, SegmentEnded)]
    assert later and later[0].start >= e.end
    assert vad.position == len(signal) // vad.frame_len * vad.frame_len  # nothing lost
