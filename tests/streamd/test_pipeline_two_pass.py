"""The `two-pass` pipeline: CTC partials from a tiny random wav2vec2 (saved with
`save_pretrained`), Whisper finals from the embedded tiny.en.

One `streamd serve --pipeline two-pass` subprocess serves the module's serve test; real
WebSocket clients stream shared recordings faster than real time. References: partials
against `streamd transcribe --stream --json` (CTCTranscriber.stream, tested against
transformers in tests/models/ctc/test_ctc_transcriber.py) on the same segment audio, finals against
`streamd transcribe --json` (tiny.en offline) on the same segment audio.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import free_port
from helpers.daemon import RATE, REPO, daemon_env, save_tiny_ctc, serve, stream_session
from helpers.layouts import save_layout
from helpers.text import wer

from streamd.config import load_config
from streamd.engine import Engine
from streamd.errors import ConfigError
from streamd.pipelines import two_pass
from streamd.recognizer import SegmentInfo

# Two short utterances, so the stream has two segments (the CTC state must not leak).
UTTERANCES = ("librispeech_61-70968-0002.wav", "cmu_arctic_axb_a0006.wav")
SPEED = 4.0  # x real time
# Finals may be this much worse (WER) than offline tiny.en on the same segment audio.
WER_MARGIN = 0.05
# Every XLA compile logged (none may follow READY); fewer batch shapes to warm up.
SERVE_ENV = {"JAX_LOG_COMPILES": "1", "STREAMD_RECOGNITION_BATCH_SIZES": "1,2"}


@pytest.fixture(scope="module")
def ctc_folder(tmp_path_factory) -> Path:
    return save_tiny_ctc(tmp_path_factory.mktemp("ctc"))


@pytest.fixture(scope="module")
def stream_audio(shared_manifest) -> tuple[np.ndarray, list[str]]:
    """Silence, utterance, silence, utterance, silence; and the utterances' texts."""
    entries = {e["audio"]: e for e in shared_manifest}
    pieces, texts = [np.zeros(RATE // 2, np.float32)], []
    for name in UTTERANCES:
        audio, rate = sf.read(entries[name]["path"], dtype="float32")
        assert rate == RATE
        pieces += [audio, np.zeros(RATE, np.float32)]
        texts.append(entries[name]["text"])
    return np.concatenate(pieces).astype(np.float32), texts


def transcribe(workdir: Path, audios: list[np.ndarray], *args: str) -> list[list[dict]]:
    """`streamd transcribe --json ARGS` on these audios (float WAVs: exact samples);
    per audio its JSON records in order (partials, then the final)."""
    paths = []
    for audio in audios:
        paths.append(workdir / f"audio-{len(list(workdir.glob('audio-*')))}.wav")
        sf.write(paths[-1], audio, RATE, subtype="FLOAT")
    out = subprocess.run([sys.executable, "-m", "streamd.cli", "transcribe", "--json", *args,
                          *map(str, paths)], env=daemon_env(), capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    return [[r for r in records if r["file"] == str(p)] for p in paths]


def engine_rows(metrics: str) -> dict[str, float]:
    """Real (not padded) requests run per engine kind, from /metrics."""
    return {m[1]: float(m[2]) for m in re.finditer(
        r'streamd_engine_batch_fill_sum\{kind="([^"]+)"\} ([0-9.e+]+)', metrics)}


# --- `streamd serve --pipeline two-pass` over a real WebSocket ----------------------


@pytest.mark.e2e
def test_serve_ctc_partials_and_whisper_finals(ctc_folder, stream_audio, tmp_path) -> None:
    """Two concurrent sessions of two utterances each: every partial is the CTC model's
    greedy text of the segment so far, every final is tiny.en's text of the segment, one
    Whisper decode per final and none while segments grow, nothing compiles after READY."""
    audio, texts = stream_audio
    with serve(tmp_path, "--pipeline", "two-pass", "--model", str(ctc_folder),
               env=SERVE_ENV, startup_timeout=300) as daemon:  # tiny.en compiles its finals
        with ThreadPoolExecutor(2) as pool:
            sessions = list(pool.map(lambda _: stream_session(daemon.port, audio, speed=SPEED),
                                     range(2)))
        with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        serving = daemon.log_text().split("streamd.daemon: ready", 1)
    assert len(serving) == 2 and "Compiling" in serving[0], "compiles are logged at warm-up"
    assert "Compiling" not in serving[1], "something compiled while serving"

    all_finals, segment_partials = [], []
    for events in sessions:
        assert events[0]["type"] == "ready" and events[0]["pipeline"] == "two-pass"
        finals = [e for e in events if e["type"] == "final"]
        partials = [e for e in events if e["type"] == "partial"]
        assert len(finals) == len(UTTERANCES), [e["type"] for e in events]
        assert [f["segment"] for f in finals] == list(range(len(finals)))
        assert {p["segment"] for p in partials} == set(range(len(finals)))
        assert events[-1]["segments"] == len(finals)
        assert all("words" not in f for f in finals)  # Whisper's text, no CTC word times
        all_finals.append(finals)
        segment_partials += [(f, [p for p in partials if p["segment"] == f["segment"]])
                             for f in finals]

    # Partials: the CTC greedy text after each whole chunk of the segment so far, in
    # order (a fresh stream per segment). They feed all the audio they have, which may run
    # past the final's end.
    fed = []
    for f, mine in segment_partials:
        end = max([f["end"], *(p["end"] for p in mine)])
        fed.append(audio[round(f["start"] * RATE) : round(end * RATE)])
    streamed = transcribe(tmp_path, fed, "--stream", "--model", str(ctc_folder))
    for (_, mine), records in zip(segment_partials, streamed, strict=True):
        reference = [r["partial"] for r in records if "partial" in r]
        assert max(map(len, reference)) >= 10, "the random model should spell some text"
        position = 0
        for p in mine:  # a subsequence of the reference partials
            assert p["text"] in reference[position:], (p, reference)
            position = reference.index(p["text"], position)
            # Whisper writes the final: the CTC partials promise no stable prefix.
            assert "stable" not in p, p

    # Finals: tiny.en's text of each segment, as good as offline tiny.en on that audio.
    segments = [audio[round(f["start"] * RATE) : round(f["end"] * RATE)]
                for f in all_finals[0]]
    offline = [records[-1]["text"] for records in transcribe(tmp_path, segments)]
    for finals in all_finals:
        served_wer, offline_wer = wer(texts, [f["text"] for f in finals]), wer(texts, offline)
        print(f"\nWER two-pass finals {served_wer:.4f}, streamd transcribe {offline_wer:.4f}; "
              f"{[f['text'] for f in finals]} vs {offline}")
        assert served_wer <= offline_wer + WER_MARGIN

    # Device work: the CTC kind ran the partials; Whisper ran once per final (at the pause
    # or at the endpoint), plus at most one early decode per final that speech made moot:
    # never per partial; only in final windows (>= 10 s).
    rows = engine_rows(metrics)
    assert rows.get("ctc/320ms", 0) > 0, rows
    whisper = {k: v for k, v in rows.items() if k.startswith("whisper/")}
    n_finals = sum(map(len, all_finals))
    assert n_finals <= sum(whisper.values()) <= 2 * n_finals, rows
    assert sum(whisper.values()) < rows["ctc/320ms"] / 4, rows
    assert all(float(k.split("/")[1][:-1]) >= two_pass.FINAL_MIN_S for k in whisper), rows


# --- a non-base CTC layout (issue 11) -----------------------------------------------


def test_conformer_partials_of_a_non_base_layout(stream_audio, tmp_path) -> None:
    """The first pass streams a conformer with strides 4, 4, 4 (4 ms frames) in its own
    chunks: in-process partials on a growing segment are `streamd transcribe --stream`'s
    partials of the same audio, in order (the Whisper final is not run here: the served
    test above covers it, and no step of it depends on the CTC layout)."""
    folder = save_layout(tmp_path / "conformer_s444", "conformer_s444")
    config = load_config(environ={}, overrides={"recognition": {
        "pipeline": "two-pass", "model": str(folder)}})
    engine = Engine((1,))
    pipe = two_pass.create(config, engine)
    assert pipe.partials.kind == "conformer/320ms"
    audio, _ = stream_audio
    segment = audio[RATE // 2 : RATE // 2 + 3 * RATE]  # the first utterance, 3 s of it
    step = RATE * 400 // 1000

    async def partials() -> list[str]:
        engine.start()
        try:
            rec, texts = pipe.new_recognizer("a"), []
            for end in range(step, len(segment) + 1, step):
                hyp = await rec.partial(segment[:end], SegmentInfo("a", 0, 0.5, end / RATE))
                if hyp is not None:
                    assert hyp.stable == ""
                    texts.append(hyp.text)
            rec.close()
            return texts
        finally:
            await engine.stop()

    got = asyncio.run(partials())
    reference = [r["partial"] for r in transcribe(tmp_path, [segment], "--stream", "--model",
                                                  str(folder))[0] if "partial" in r]
    assert len(got) >= 2 and max(map(len, got)) >= 10, got
    position = 0
    for text in got:  # a subsequence of the reference partials
        assert text in reference[position:], (text, reference)
        position = reference.index(text, position)


# --- configuration errors -----------------------------------------------------------


def test_bad_models_are_config_errors_naming_the_key(ctc_folder, tmp_path) -> None:
    """A missing or non-CTC `recognition.model`, or a missing or non-Whisper
    `recognition.final_model`, fails before any engine kind exists."""
    no_head = save_tiny_ctc(tmp_path / "no-head", with_head=False)
    cases = [
        ({"model": ""}, "recognition.model"),
        ({"model": str(tmp_path / "nowhere")}, "recognition.model"),
        ({"model": str(no_head)}, "recognition.model"),
        ({"model": str(ctc_folder), "final_model": str(tmp_path / "nowhere")},
         "recognition.final_model"),
        ({"model": str(ctc_folder), "final_model": str(ctc_folder)},
         "recognition.final_model"),
    ]
    for recognition, key in cases:
        config = load_config(environ={}, overrides={"recognition": {
            "pipeline": "two-pass", **recognition}})
        engine = Engine((1,))
        with pytest.raises(ConfigError) as err:
            two_pass.create(config, engine)
        assert err.value.key == key, (recognition, err.value)
        assert engine.kinds == ()


def test_serve_with_a_bad_final_model_exits_naming_the_key(ctc_folder, tmp_path) -> None:
    """`--final-model` reaches the pipeline; the daemon refuses to start."""
    out = subprocess.run(
        [sys.executable, "-m", "streamd.cli", "serve", "--port", str(free_port()),
         "--pipeline", "two-pass", "--model", str(ctc_folder),
         "--final-model", str(tmp_path / "nowhere")],
        env=daemon_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "recognition.final_model" in out.stderr
