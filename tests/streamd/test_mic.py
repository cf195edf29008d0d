"""MicSource through real PortAudio: a user-space PulseAudio pipe source plays JFK."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.pulse import PulseAudio

from streamd.mic import MicError, MicSource, list_input_devices

pytest_plugins = ["helpers.pulse"]  # the `pulse` fixture
pytestmark = pytest.mark.timeout(60)

FRAME_S = 0.01  # envelope frames of 10 ms


@pytest.fixture(scope="module")
def jfk(shared_audio_dir: Path) -> tuple[Path, np.ndarray]:
    path = shared_audio_dir / "jfk_inaugural_1961.wav"
    samples, rate = sf.read(str(path), dtype="float32")
    assert rate == 16000
    return path, samples


def _envelope(x: np.ndarray, rate: int) -> np.ndarray:
    n = int(rate * FRAME_S)
    frames = x[: len(x) // n * n].reshape(-1, n)
    return np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))


def _align(captured: np.ndarray, rate: int, reference: np.ndarray) -> tuple[int, float]:
    """Best envelope lag (frames into `reference`) and its Pearson correlation."""
    cap, ref = _envelope(captured, rate), _envelope(reference, 16000)
    best = (0, -1.0)
    for lag in range(len(ref) - len(cap) + 1):
        r = float(np.corrcoef(cap, ref[lag:lag + len(cap)])[0, 1])
        best = max(best, (lag, r), key=lambda t: t[1])
    return best


async def _capture(mic: MicSource, seconds: float) -> np.ndarray:
    await mic.start()
    blocks, got = [], 0
    try:
        async for samples, rate in mic:
            assert samples.dtype == np.float32 and samples.ndim == 1
            assert rate == mic.sample_rate
            blocks.append(samples)
            got += len(samples)
            if got >= seconds * rate:
                break
    finally:
        await mic.stop()
    return np.concatenate(blocks)


def test_list_input_devices_shows_pulse(pulse: PulseAudio) -> None:
    devices = list_input_devices()
    names = [d["name"] for d in devices]
    assert "pulse" in names, names
    dev = devices[names.index("pulse")]
    assert dev["channels"] >= 1 and dev["default_samplerate"] > 0
    assert isinstance(dev["index"], int) and dev["hostapi"] == "ALSA"
    assert sum(d["default"] for d in devices) == 1

    async def one_block_from_default() -> tuple[np.ndarray, int]:
        pulse.play(np.zeros(16000 * 2, np.int16))
        mic = MicSource(None, 16000)  # the system default input (pulse's virtmic)
        await mic.start()
        try:
            block = await asyncio.wait_for(mic.read(), 5)
        finally:
            await mic.stop()
        assert block is not None
        _ = [b async for b in mic]  # what was queued, then the end of the stream
        assert await mic.read() is None
        return block

    samples, rate = asyncio.run(one_block_from_default())
    assert rate == 16000 and samples.shape == (320,)


def test_capture_is_the_played_speech(pulse: PulseAudio, jfk) -> None:
    path, reference = jfk
    feeder = pulse.play(path)
    mic = MicSource("pulse", 16000, block_ms=20)
    captured = asyncio.run(_capture(mic, 3.0))
    assert mic.dropped_blocks == 0 and mic.channels == 1 and mic.device_rate == 16000
    assert time.monotonic() - feeder.started_at < 6  # captured live, at real-time pace
    rms = float(np.sqrt(np.mean(captured**2)))
    assert rms > 0.05, f"captured RMS {rms}: silence, not speech"
    lag, r = _align(captured, 16000, reference)
    assert r > 0.9, f"envelope correlation {r:.3f} at {lag * FRAME_S:.2f} s"
    # Sample level: 16 kHz s16le in, 16 kHz float out, so the waveform itself matches.
    start = lag * int(16000 * FRAME_S)
    best = max(
        float(np.dot(captured, seg) / (np.linalg.norm(captured) * np.linalg.norm(seg)))
        for shift in range(-160, 161)
        if start + shift >= 0
        for seg in [reference[start + shift:start + shift + len(captured)]]
        if len(seg) == len(captured)
    )
    assert best > 0.99, f"waveform correlation {best:.4f}"


def test_other_rate_int16_and_on_frames_callback(pulse: PulseAudio, jfk) -> None:
    path, reference = jfk
    pulse.play(path)
    got: list[np.ndarray] = []

    async def main() -> None:
        mic = MicSource("pulse", 48000, got.append, block_ms=20, dtype="int16")
        await mic.start()
        while sum(map(len, got)) < 1.5 * 48000:
            await asyncio.sleep(0.05)
        await mic.stop()
        assert mic.sample_rate == 48000

    asyncio.run(main())
    assert {len(b) for b in got[1:-1]} == {960}  # 20 ms blocks at 48 kHz
    captured = np.concatenate(got)
    assert captured.dtype == np.float32  # int16 from PortAudio, scaled to [-1, 1)
    lag, r = _align(captured, 48000, reference)
    assert r > 0.9, f"envelope correlation {r:.3f}"
    start = lag * int(16000 * FRAME_S)
    ref_rms = np.sqrt(np.mean(reference[start:start + len(captured) // 3] ** 2))
    assert 0.8 < np.sqrt(np.mean(captured**2)) / ref_rms < 1.25  # same level


def test_resamples_when_the_device_refuses_the_rate(
        pulse: PulseAudio, jfk, monkeypatch: pytest.MonkeyPatch) -> None:
    import sounddevice as sd

    real_check = sd.check_input_settings

    def no_16k(**kw):  # a device whose hardware cannot do 16 kHz
        if kw.get("samplerate") == 16000:
            raise sd.PortAudioError("Invalid sample rate")
        return real_check(**kw)

    monkeypatch.setattr(sd, "check_input_settings", no_16k)
    path, reference = jfk
    pulse.play(path)
    mic = MicSource("pulse", 16000)
    captured = asyncio.run(_capture(mic, 1.5))
    assert mic.device_rate != 16000 and mic.sample_rate == 16000
    _, r = _align(captured, 16000, reference)
    assert r > 0.9, f"envelope correlation {r:.3f}"


def test_slow_consumer_drops_blocks_and_never_blocks_portaudio(pulse: PulseAudio) -> None:
    pulse.play(np.zeros(16000 * 5, np.int16))

    async def main() -> tuple[MicSource, int]:
        mic = MicSource("pulse", 16000, block_ms=20, queue_max=5)
        await mic.start()
        await asyncio.sleep(0.8)  # ~40 blocks arrive, nobody reads
        await mic.stop()
        blocks = [b async for b in mic]
        return mic, len(blocks)

    mic, kept = asyncio.run(main())
    assert kept == 5
    assert mic.dropped_blocks >= 20  # counted, while the callback kept running
    assert mic.overflows == 0  # PortAudio never waited on us


def test_lost_device_is_an_error_for_the_reader(pulse: PulseAudio) -> None:
    pulse.play(np.zeros(16000 * 5, np.int16))

    async def main() -> None:
        mic = MicSource("pulse", 16000)
        await mic.start()
        try:
            for _ in range(5):
                assert await asyncio.wait_for(mic.read(), 5) is not None
            assert pulse._proc is not None
            pulse._proc.kill()  # the sound server (our "device") dies mid-capture
            with pytest.raises(MicError, match="stopped delivering"):
                while await asyncio.wait_for(mic.read(), 5) is not None:
                    pass
        finally:
            await mic.stop()

    asyncio.run(main())


def test_unknown_device_names_the_available_ones(pulse: PulseAudio) -> None:
    async def main() -> None:
        await MicSource("no-such-mic", 16000).start()

    with pytest.raises(MicError) as info:
        asyncio.run(main())
    assert "no-such-mic" in str(info.value) and "pulse" in str(info.value)


def test_missing_portaudio_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import now fails
    with pytest.raises(MicError, match="PortAudio"):
        list_input_devices()


def test_pulse_helper_cleans_up(tmp_path: Path) -> None:
    before = os.environ.get("PULSE_SERVER")
    server = PulseAudio(tmp_path)
    with server:
        proc = server._proc
        assert proc is not None and os.environ["PULSE_SERVER"] == server.server
        feeder = server.play(np.zeros(1600, np.int16))
        assert feeder.finished.wait(5)
    assert proc.poll() is not None  # stopped and reaped
    assert os.environ.get("PULSE_SERVER") == before
    assert not server.runtime_dir.exists()
