"""The `two-pass` pipeline: CTC partials from a tiny random wav2vec2 (saved with
`save_pretrained`), Whisper finals from the embedded tiny.en.

One `streamd serve --pipeline two-pass` subprocess serves the module's serve test; real
WebSocket clients stream shared recordings faster than real time. References: partials
against `streamd transcribe --stream --json` (CTCTranscriber.stream, tested against
transformers in tests/models/test_ctc_asr.py) on the same segment audio, finals against
`streamd transcribe --json` (tiny.en offline) on the same segment audio.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from helpers import free_port
from websockets.sync.client import connect

from streamd.config import load_config
from streamd.engine import Engine
from streamd.errors import ConfigError
from streamd.pipelines import two_pass

REPO = Path(__file__).resolve().parents[2]
RATE = 16000
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'"]
# Two short utterances, so the stream has two segments (the CTC state must not leak).
UTTERANCES = ("librispeech_61-70968-0002.wav", "cmu_arctic_axb_a0006.wav")
SPEED = 4.0  # x real time
# Finals may be this much worse (WER) than offline tiny.en on the same segment audio.
WER_MARGIN = 0.05


def _save_ctc(folder: Path, with_head: bool = True) -> Path:
    """A tiny random wav2vec2 CTC folder as transformers writes it (no head: not CTC)."""
    config = transformers.Wav2Vec2Config(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, pad_token_id=0)
    torch.manual_seed(0)
    if with_head:
        model = transformers.Wav2Vec2ForCTC(config)
        with torch.no_grad():  # a wider head, so the argmax path spells varied text
            model.lm_head.weight.mul_(30.0)
    else:
        model = transformers.Wav2Vec2Model(config)
    model.eval().save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<pad>", "unk_token": "<unk>", "word_delimiter_token": "|"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def wer(refs: list[str], hyps: list[str]) -> float:
    jiwer = pytest.importorskip("jiwer")
    english = pytest.importorskip("whisper_normalizer.english")
    norm = english.EnglishTextNormalizer()
    return float(jiwer.wer(norm(" ".join(refs)), norm(" ".join(hyps))))


@pytest.fixture(scope="module")
def ctc_folder(tmp_path_factory) -> Path:
    return _save_ctc(tmp_path_factory.mktemp("ctc"))


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


@contextlib.contextmanager
def serve(workdir: Path, *args: str) -> Iterator[tuple[int, Path]]:
    """`streamd serve` on a free port until /healthz says ok, every XLA compile logged;
    yields (port, log file); always ended after."""
    port = free_port()
    env = _env()
    env["JAX_LOG_COMPILES"] = "1"  # none may follow READY
    env["STREAMD_RECOGNITION_BATCH_SIZES"] = "1,2"  # fewer shapes to warm up
    log_path = workdir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "streamd.cli", "serve", "--port", str(port),
           "--log-format", "text", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # tiny.en loads and compiles its final buckets
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if json.load(r).get("status") == "ok":
                        break
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield port, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def stream_session(port: int, audio: np.ndarray) -> list[dict]:
    """One WebSocket session: float32 audio in 100 ms messages at SPEED x real time,
    `stop`, events up to `done`."""
    events: list[dict] = []
    step = RATE // 10
    with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "channels": 1,
                            "encoding": "pcm_f32le"}))
        for i in range(0, len(audio), step):
            ws.send(audio[i : i + step].astype("<f4").tobytes())
            time.sleep(0.1 / SPEED)
        ws.send(json.dumps({"type": "stop"}))
        while not events or events[-1]["type"] != "done":
            events.append(json.loads(ws.recv(timeout=120)))
    return events


def transcribe(workdir: Path, audios: list[np.ndarray], *args: str) -> list[list[dict]]:
    """`streamd transcribe --json ARGS` on these audios (float WAVs: exact samples);
    per audio its JSON records in order (partials, then the final)."""
    paths = []
    for audio in audios:
        paths.append(workdir / f"audio-{len(list(workdir.glob('audio-*')))}.wav")
        sf.write(paths[-1], audio, RATE, subtype="FLOAT")
    out = subprocess.run([sys.executable, "-m", "streamd.cli", "transcribe", "--json", *args,
                          *map(str, paths)], env=_env(), capture_output=True, text=True,
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
    with serve(tmp_path, "--pipeline", "two-pass", "--model", str(ctc_folder)) as (port, log):
        with ThreadPoolExecutor(2) as pool:
            sessions = list(pool.map(lambda _: stream_session(port, audio), range(2)))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        serving = log.read_text().split("streamd.daemon: ready", 1)
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
            assert p["text"].startswith(p.get("stable", ""))
        stables = [p.get("stable", "") for p in mine]
        assert all(b.startswith(a) for a, b in zip(stables, stables[1:], strict=False))

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


# --- configuration errors -----------------------------------------------------------


def test_bad_models_are_config_errors_naming_the_key(ctc_folder, tmp_path) -> None:
    """A missing or non-CTC `recognition.model`, or a missing or non-Whisper
    `recognition.final_model`, fails before any engine kind exists."""
    no_head = _save_ctc(tmp_path / "no-head", with_head=False)
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
        env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "recognition.final_model" in out.stderr
