"""MicSource through real PortAudio: a user-space PulseAudio pipe source plays JFK.

Also `streamd devices` as a subprocess, its error when PortAudio cannot load, and the
daemon's `--mic` session end to end (pulse source -> `streamd serve` -> MQTT broker).
"""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from signal import SIGTERM

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import REPO, daemon_env, serve
from helpers.mosquitto import Mosquitto, Subscriber
from helpers.pulse import PulseAudio
from helpers.text import normalize

from streamd import cli
from streamd.config import VadConfig
from streamd.mic import MicError, MicSource, list_input_devices

pytest_plugins = ["helpers.pulse", "helpers.mosquitto"]  # `pulse`, `mosquitto` fixtures
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
    with pytest.raises(MicError, match="PortAudio bindings are not installed"):
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


# --- `streamd devices` ------------------------------------------------------------------

DEVICE_LINE = re.compile(r"^\s*(\d+)  (.+)  \((\d+) ch, (\d+) Hz\)$")


def test_devices_command_lists_the_pulse_input(pulse: PulseAudio) -> None:
    out = subprocess.run([sys.executable, "-m", "streamd.cli", "devices"], cwd=REPO,
                         env=pulse.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [DEVICE_LINE.match(line) for line in out.stdout.splitlines()]
    assert rows and all(rows), out.stdout
    by_name = {m[2]: m for m in rows if m}
    assert "pulse" in by_name, out.stdout
    assert int(by_name["pulse"][3]) >= 1 and int(by_name["pulse"][4]) > 0


class _FailingImport(importlib.abc.MetaPathFinder):
    """Makes `import sounddevice` raise `exc`, as a broken installation would."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def find_spec(self, name, path, target=None):
        if name == "sounddevice":
            raise self.exc
        return


class PortAudioError(Exception):
    """Stands in for sounddevice.PortAudioError raised by Pa_Initialize at import."""


@pytest.mark.parametrize(("exc", "message"), [
    # What sounddevice raises without libportaudio2 (ctypes finds no library).
    (OSError("PortAudio library not found"),
     "PortAudio not found: install libportaudio2 (PortAudio library not found)"),
    (ModuleNotFoundError("No module named 'sounddevice'"),
     "the PortAudio bindings are not installed (pip install sounddevice)"),
    (PortAudioError("Error initializing PortAudio: Unanticipated host error"),
     "cannot initialize PortAudio: Error initializing PortAudio"),
], ids=["no-libportaudio", "no-sounddevice", "init-fails"])
def test_devices_command_without_portaudio_is_one_clear_line(
        exc: BaseException, message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(exc), *sys.meta_path])
    assert cli.main(["devices"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"streamd devices: {message}"), err


def test_devices_command_reports_a_failed_query(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sounddevice as sd

    def broken(*args, **kwargs):
        raise sd.PortAudioError("Unanticipated host error")

    monkeypatch.setattr(sd, "query_devices", broken)
    assert cli.main(["devices"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("streamd devices: cannot list audio devices: Unanticipated"), err


# --- the daemon's microphone session -------------------------------------------------


def _speech_span(samples: np.ndarray, rate: int, floor_dbfs: float = -40.0) -> tuple[float, float]:
    """First and last envelope frame louder than `floor_dbfs`, in seconds (end exclusive)."""
    loud = np.flatnonzero(_envelope(samples, rate) > 10 ** (floor_dbfs / 20))
    return loud[0] * FRAME_S, (loud[-1] + 1) * FRAME_S


@pytest.mark.timeout(600)  # the whisper case loads and warms tiny.en
@pytest.mark.parametrize("pipeline", ["echo", "whisper"])
def test_daemon_mic_session_final_reaches_mqtt(
        pulse: PulseAudio, mosquitto: Mosquitto, tmp_path: Path, shared_audio_dir: Path,
        pipeline: str) -> None:
    """`streamd serve --mic pulse` captures the pipe source through real PortAudio; the mic
    session's final reaches an MQTT subscriber with start/end where the speech is in what
    was played, after its speech_start; on SIGTERM the session's `done` follows. With
    `echo` the text is the segment's duration (the recognizer got exactly the segment's
    audio); with `whisper` (the real tiny.en) it is the words spoken, and `streamd-listen`
    on the same broker prints them: the mic and the MQTT listener client end to end."""
    speech, rate = sf.read(str(shared_audio_dir / "cmu_arctic_axb_a0005.wav"), dtype="int16")
    assert rate == 16000
    lead_s = 1.0
    signal = np.concatenate([np.zeros(int(lead_s * rate), np.int16), speech])
    onset, offset = _speech_span(speech.astype(np.float32) / 32768, rate)
    vad = VadConfig()
    want_start = lead_s + onset - vad.start_pad_ms / 1000
    want_end = lead_s + offset + vad.end_pad_ms / 1000
    env = {
        "STREAMD_RECOGNITION_PIPELINE": pipeline,
        "STREAMD_RECOGNITION_BATCH_SIZES": "1",  # one session: warm up batch 1 only
        "PULSE_SERVER": pulse.env["PULSE_SERVER"],
        "XDG_RUNTIME_DIR": pulse.env["XDG_RUNTIME_DIR"],
    }
    assert daemon_env(**env)["PULSE_SERVER"] == pulse.server

    listener_out = tmp_path / "listen.out"

    async def collect(daemon_pid: int) -> list[dict]:
        async with Subscriber(mosquitto, ["streamd/mic/#"]) as sub:
            with open(listener_out, "wb") as out:
                listener = subprocess.Popen(
                    [str(Path(sys.executable).parent / "streamd-listen"), "--host",
                     mosquitto.host, "--port", str(mosquitto.port), "--count", "1"],
                    stdout=out, stderr=subprocess.STDOUT)
            # The daemon opened the capture before /healthz said ok; a pipe source with no
            # writer delivers nothing, so the mic session's time 0 is the feeder's sample 0.
            feeder = pulse.play(signal)
            await sub.wait_for(lambda _: bool(sub.payloads("streamd/mic/final")), timeout=20)
            assert feeder.started_at is not None
            assert time.monotonic() - feeder.started_at < len(signal) / rate + 5  # live pace
            os.killpg(daemon_pid, SIGTERM)  # the mic session ends with the daemon
            await sub.wait_for(lambda _: bool(sub.payloads("streamd/mic/done")), timeout=20)
            assert await asyncio.to_thread(listener.wait, 20) == 0, listener_out.read_text()
            return [p for p in sub.payloads("streamd/mic/+") if p["type"] != "partial"]

    with serve(tmp_path, "--mic", "pulse", "--node", "mictest", "--mqtt-host", mosquitto.host,
               "--mqtt-port", str(mosquitto.port), env=env, log_format="json",
               startup_timeout=400) as daemon:
        published = asyncio.run(collect(daemon.proc.pid))
        daemon.proc.wait(30)
        log = daemon.log_text()
    started = [json.loads(line) for line in log.splitlines()
               if '"microphone session started"' in line]
    assert started and started[0]["device"] == "pulse", log[-2000:]
    assert [p["type"] for p in published] == ["speech_start", "final", "done"], published
    seqs = [p["seq"] for p in published]
    assert seqs == sorted(set(seqs))
    assert published[-1]["segments"] == 1
    final = published[1]
    assert final["session"] == "mic" and final["segment"] == 0, final
    assert final["start"] == pytest.approx(want_start, abs=0.3), (final, want_start)
    assert final["end"] == pytest.approx(want_end, abs=0.3), (final, want_end)
    printed = listener_out.read_text()
    assert final["text"].strip() in printed and "mic" in printed, printed
    if pipeline == "echo":
        # The recognizer got exactly the segment's audio, captured sample for sample.
        assert float(final["text"]) == pytest.approx(final["end"] - final["start"], abs=0.011)
    else:
        assert normalize(final["text"]) == "will we ever forget it", final
