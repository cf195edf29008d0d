"""`streamd transcribe` compiles only what its files need, from a cache that persists."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from models import disk_cache
from models.whisper import transcriber as whisper_asr
from streamd import cli
from streamd.audio import audio_length, read_audio

REPO = Path(__file__).resolve().parents[2]
RATE = 16000


def _bare_transcriber(monkeypatch, window: str = "bucketed") -> tuple[object, list[int]]:
    """A WhisperTranscriber without a model whose encode/decode only record the window."""
    t = whisper_asr.WhisperTranscriber.__new__(whisper_asr.WhisperTranscriber)
    t.encoder_window, t.buckets_s = window, whisper_asr.BUCKETS_S
    t.tail_margin = whisper_asr.TAIL_MARGIN
    t.context, t.initial = False, ()
    seen: list[int] = []
    monkeypatch.setattr(t, "encode", lambda audio, n=None: n or len(audio), raising=False)
    monkeypatch.setattr(t, "_decode", lambda _enc, n, previous=(): seen.append(n),
                        raising=False)
    return t, seen


@pytest.mark.parametrize("seconds,windows", [
    # A bucket keeps a quarter of itself silent; audio gets its own bucket (a smaller one
    # that seeking may need loads from the cache on first use).
    ([7.0], [10]),
    ([11.0], [30]),  # the bundled JFK sample
    ([5.0, 7.5, 3.0], [10]),
    ([5.0, 12.0, 25.0, 9.0], [10, 30]),
    ([0.01], []),  # under two mel hops: transcribe() skips it, nothing to compile
    ([], []),
    ([3.0, 45.0], [10, 30]),  # over 30 s: windows at quiet points can be any bucket
    (None, [10, 30]),  # no lengths: every shape
])
def test_warmup_compiles_only_the_windows_the_lengths_need(monkeypatch, seconds, windows):
    t, seen = _bare_transcriber(monkeypatch)
    t.warmup(None if seconds is None else [round(s * RATE) for s in seconds])
    assert sorted(seen) == [w * RATE for w in windows]


def test_padded_window_warms_the_30_s_shape_only(monkeypatch) -> None:
    t, seen = _bare_transcriber(monkeypatch, "padded")
    t.warmup([3 * RATE, 12 * RATE])
    assert seen == [30 * RATE]


@pytest.mark.parametrize("rate,channels,frames", [
    (16000, 1, 176_000), (44100, 2, 485_117), (32000, 1, 160_001), (8000, 1, 80_000),
    (48000, 2, 1),
])
def test_audio_length_from_the_header_matches_read_audio(tmp_path, rate, channels, frames):
    path = tmp_path / "a.wav"
    noise = np.random.default_rng(0).normal(0, 0.1, (frames, channels)).astype(np.float32)
    sf.write(path, noise, rate, subtype="FLOAT")
    assert audio_length(path) == len(read_audio(path))


def test_cli_warms_up_for_the_lengths_of_its_files(tmp_path, monkeypatch, capsys) -> None:
    """The CLI reads the lengths from the headers before warm-up; an unreadable file is
    left out there and still reported in its place."""
    from streamd import transcribe

    calls: list[object] = []

    class Fake:
        def warmup(self, lengths=None) -> None:
            calls.append(lengths)

        def transcribe(self, audio) -> str:
            return f"{len(audio)} samples"

    def load(args) -> Fake:
        calls.append("load")
        return Fake()

    monkeypatch.setattr(transcribe, "load_transcriber", load)
    # Recorded, not run: this process's JAX keeps the test suite's cache.
    monkeypatch.setattr(disk_cache, "enable_compilation_cache",
                        lambda directory=None: calls.append("cache on"))
    a, b, bad = tmp_path / "a.wav", tmp_path / "b.flac", tmp_path / "bad.wav"
    sf.write(a, np.zeros(22050 * 3, np.float32), 22050)
    sf.write(b, np.zeros(16000 * 12, np.float32), 16000)
    bad.write_bytes(b"RIFF nope")
    status = cli.main(["transcribe", "--json", str(a), str(bad), str(b)])
    out, err = capsys.readouterr()
    assert status == 1 and f"cannot read audio file {bad}" in err
    assert calls == ["cache on", "load", [len(read_audio(a)), len(read_audio(b))]]
    assert [json.loads(line)["text"] for line in out.splitlines()] == [
        f"{len(read_audio(a))} samples", f"{len(read_audio(b))} samples"]


@pytest.mark.e2e
def test_second_run_loads_compiled_code_from_the_cache(tmp_path) -> None:
    """Two `streamd transcribe` runs with an empty cache folder and no JAX setting: the
    first compiles and fills <cache>/jax, the second is faster with the same text."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STREAMD_", "JAX_COMPILATION", "JAX_PERSISTENT"))}
    env.update(STREAMD_CACHE_DIR=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "streamd.cli", "transcribe", "streamd/data/jfk.wav"]
    runs = []  # (CPU seconds: steadier than wall time on a shared machine, stdout)
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        runs.append((cpu, proc.stdout))
    entries = list((tmp_path / "cache" / "jax").iterdir())
    assert len(entries) >= 10  # encoder, mel, decoder steps: small executables too
    assert runs[0][1] == runs[1][1] and "ask not what your country" in runs[0][1]
    assert runs[1][0] < 0.75 * runs[0][0], runs  # 4.4 against 9.1 s in bench/startup.py
