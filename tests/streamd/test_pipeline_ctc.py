"""The `ctc` and `conformer` pipelines: tiny random transformers checkpoints (saved with
`save_pretrained`), driven in-process through a real Engine and as `streamd serve`
subprocesses over a real WebSocket. Finals are checked against `streamd transcribe
--stream` (CTCTranscriber.stream, itself tested against transformers' greedy decode in
tests/models/ctc/test_ctc_transcriber.py) on the same segment audio, fed in the same 320 ms
chunks."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.daemon import RATE, save_tiny_ctc, serve, stream_session
from helpers.layouts import save_layout

from streamd import cli
from streamd.config import load_config
from streamd.engine import Engine
from streamd.errors import ConfigError
from streamd.pipelines import conformer as conformer_pipeline
from streamd.pipelines import ctc as ctc_pipeline
from streamd.recognizer import SegmentInfo

PIPELINE = {"wav2vec2": "ctc", "conformer": "conformer"}


@pytest.fixture(scope="module", params=["wav2vec2", "conformer"])
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, save_tiny_ctc(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def utterances(shared_manifest) -> list[np.ndarray]:
    """The two shortest shared recordings."""
    out = []
    for entry in sorted(shared_manifest, key=lambda e: e["duration_s"])[:2]:
        audio, rate = sf.read(entry["path"], dtype="float32")
        assert rate == RATE
        out.append(audio)
    return out


def transcribe_stream(folder: Path, audios: list[np.ndarray], workdir: Path, capsys) -> list[str]:
    """Final texts of `streamd transcribe --stream --json --model FOLDER` on these audios
    (written as float WAVs, so the samples are exact)."""
    paths = []
    for i, audio in enumerate(audios):
        paths.append(workdir / f"segment-{i}.wav")
        sf.write(paths[-1], audio, RATE, subtype="FLOAT")
    capsys.readouterr()
    assert cli.main(["transcribe", "--stream", "--json", "--model", str(folder),
                     *map(str, paths)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finals = {r["file"]: r["text"] for r in records if "text" in r}
    return [finals[str(p)] for p in paths]


# --- in-process: pipeline + engine --------------------------------------------------


def test_recognizer_final_equals_streamed_transcribe_and_nothing_recompiles(
    checkpoint, utterances, tmp_path, capsys
) -> None:
    kind, folder = checkpoint
    config = load_config(environ={}, overrides={"recognition": {
        "pipeline": PIPELINE[kind], "model": str(folder), "batch_sizes": [1, 2]}})
    engine = Engine((1, 2))
    module = ctc_pipeline if kind == "wav2vec2" else conformer_pipeline
    pipe = module.create(config, engine)
    before = pipe.compiled_shapes()
    engine.warmup()
    # At most one compile per batch size, at warm-up (the jit cache is process-wide: an
    # earlier test may already have compiled a shape of this same tiny config).
    assert pipe.compiled_shapes() - before <= 2
    compiled = pipe.compiled_shapes()
    step = RATE * 400 // 1000  # the session's partial interval

    async def session(name: str, audio: np.ndarray, cut: int | None = None):
        rec = pipe.new_recognizer(name)
        partials = []
        for end in range(step, len(audio) + 1, step):
            hyp = await rec.partial(audio[:end], SegmentInfo(name, 0, 1.5, end / RATE))
            if hyp is not None:
                partials.append(hyp)
        final_audio = audio if cut is None else audio[:cut]
        final = await rec.final(final_audio, SegmentInfo(name, 0, 1.5, 1.5 + cut_s(final_audio)))
        rec.close()
        return partials, final

    def cut_s(audio: np.ndarray) -> float:
        return len(audio) / RATE

    async def main():
        engine.start()
        try:
            # Two sessions at once (batched by the engine), then one whose final is cut
            # before the audio its partials fed (a VAD max_length split).
            both = await asyncio.gather(session("a", utterances[0]), session("b", utterances[1]))
            cut = await session("c", utterances[1], cut=len(utterances[1]) // 2)
            return [*both, cut]
        finally:
            await engine.stop()

    results = asyncio.run(main())
    assert pipe.compiled_shapes() == compiled, "encode_chunk recompiled while serving"
    assert pipe.reencoded == 1, [len(u) for u in utterances]
    audios = [utterances[0], utterances[1], utterances[1][: len(utterances[1]) // 2]]
    references = transcribe_stream(folder, audios, tmp_path, capsys)
    for (partials, final), audio, expected in zip(results, audios, references, strict=True):
        assert len(expected.split()) >= (1 if audio is audios[2] else 2), \
            "the random model should spell several words"
        assert final.text == expected
        assert [w.word for w in final.words] == expected.split()
        assert all(1.5 <= w.start < w.end <= 1.5 + len(audio) / RATE + 0.05 for w in final.words)
        assert partials, "a partial with text before the final"
        for hyp in partials:
            assert hyp.text.startswith(hyp.stable)
        if audio is not audios[2]:  # partials only append, and the final continues them
            for a, b in zip(partials, partials[1:], strict=False):
                assert b.text.startswith(a.stable)
            assert final.text.startswith(partials[-1].text)
            assert final.text.startswith(partials[-1].stable)


@pytest.mark.parametrize("layout, pipeline, chunk_ms", [
    ("w2v_s544", "ctc", 320),  # 5 ms frames: 64 per chunk
    ("conformer_s444", "conformer", 320),  # 4 ms frames: 80 per chunk
    ("w2v_adapter", "ctc", 315),  # 45 ms output frames: 320 ms rounds to 7 of them
])
def test_non_base_layouts_stream_in_the_pipeline(layout, pipeline, chunk_ms, utterances,
                                                 tmp_path, capsys) -> None:
    """Issue 11: a checkpoint whose conv stack is not wav2vec2-base's serves in its own
    chunk size; two sessions at once (batched), finals equal `streamd transcribe --stream`
    on the same audio, word times in the model's frame duration fall inside the segment,
    and nothing compiles after warm-up."""
    folder = save_layout(tmp_path / layout, layout)
    config = load_config(environ={}, overrides={"recognition": {
        "pipeline": pipeline, "model": str(folder), "batch_sizes": [1, 2]}})
    engine = Engine((1, 2))
    module = ctc_pipeline if pipeline == "ctc" else conformer_pipeline
    pipe = module.create(config, engine)
    assert pipe.kind == f"{pipeline}/{chunk_ms}ms"
    assert pipe.chunk_samples % pipe.model.config.output_stride == 0
    engine.warmup()
    compiled = pipe.compiled_shapes()
    step = RATE * 400 // 1000
    start = 2.0

    async def session(name: str, audio: np.ndarray):
        rec = pipe.new_recognizer(name)
        partials = []
        for end in range(step, len(audio) + 1, step):
            hyp = await rec.partial(audio[:end], SegmentInfo(name, 0, start, start + end / RATE))
            if hyp is not None:
                partials.append(hyp)
        final = await rec.final(audio, SegmentInfo(name, 0, start, start + len(audio) / RATE))
        rec.close()
        return partials, final

    async def main():
        engine.start()
        try:
            return await asyncio.gather(*(session(str(i), u) for i, u in enumerate(utterances)))
        finally:
            await engine.stop()

    results = asyncio.run(main())
    assert pipe.compiled_shapes() == compiled, "encode_chunk recompiled while serving"
    frame_s = pipe.model.config.frame_s
    for (partials, final), audio, expected in zip(
            results, utterances, transcribe_stream(folder, utterances, tmp_path, capsys),
            strict=True):
        assert len(expected) >= 10, "the random model should spell some text"
        assert final.text == expected
        assert partials and final.text.startswith(partials[-1].stable)
        assert [w.word for w in final.words] == expected.split()
        end = start + len(audio) / RATE
        assert all(start <= w.start < w.end <= end + frame_s for w in final.words)
        # times are whole output frames of this model after the segment start
        for w in final.words:
            for t in (w.start, w.end):
                assert abs((t - start) / frame_s - round((t - start) / frame_s)) < 1e-6


def test_batched_steps_equal_single_steps(checkpoint, utterances) -> None:
    """Stacking sessions (and the engine's empty slots) into one call changes nothing."""
    kind, folder = checkpoint
    pipe = ctc_pipeline.CTCPipeline(Engine((1, 2, 4)), ctc_pipeline.load_model(folder))
    n = pipe.chunk_samples
    audio = [u[: 4 * n] for u in utterances]
    valid = [n, n, n, n // 3]  # the last chunk is short: it ends the segment

    def feed(batched: bool) -> list[list[np.ndarray]]:
        states = [pipe.new_state(), pipe.new_state()]
        logits: list[list[np.ndarray]] = [[], []]
        for c in range(4):
            jobs = [ctc_pipeline.Job(states[i], audio[i][c * n : (c + 1) * n], valid[c])
                    for i in range(2)]
            if batched:  # one call of 4 rows: the two sessions and two empty slots
                steps = pipe.run_batch([jobs[0], ctc_pipeline.PAD, jobs[1], ctc_pipeline.PAD])
                steps = [steps[0], steps[2]]
            else:
                steps = [pipe.run_batch([job])[0] for job in jobs]
            for i, step in enumerate(steps):
                logits[i].append(step.logits)
                states[i] = step.state
        return logits

    single, batched = feed(False), feed(True)
    assert sum(len(x) for x in single[0]) > 0
    for a, b in zip(single, batched, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_missing_or_wrong_model_is_a_config_error(checkpoint, tmp_path) -> None:
    kind, folder = checkpoint
    other = conformer_pipeline if kind == "wav2vec2" else ctc_pipeline
    cases = [(ctc_pipeline, ""), (ctc_pipeline, str(tmp_path / "nowhere")), (other, str(folder))]
    for module, model in cases:
        config = load_config(environ={}, overrides={"recognition": {"model": model}})
        with pytest.raises(ConfigError) as err:
            module.create(config, Engine((1,)))
        assert err.value.key == "recognition.model"


# --- `streamd serve` subprocess over a real WebSocket --------------------------------


def test_serve_streams_partials_and_finals_equal_to_transcribe_stream(
    checkpoint, utterances, tmp_path, capsys
) -> None:
    """Two concurrent sessions (the engine may batch their chunks) of two utterances."""
    kind, folder = checkpoint
    silence = np.zeros(RATE, np.float32)
    stream = np.concatenate([silence[: RATE // 2], utterances[0], silence, utterances[1],
                             silence]).astype(np.float32)
    # Every XLA compile is logged: none may follow READY.
    with serve(tmp_path, "--pipeline", PIPELINE[kind], "--model", str(folder),
               env={"JAX_LOG_COMPILES": "1"}) as daemon:
        with ThreadPoolExecutor(2) as pool:  # 200 ms messages at 10 x real time
            sessions = list(pool.map(lambda _: stream_session(
                daemon.port, stream, message_s=0.2, speed=10, recv_timeout=30), range(2)))
        with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        serving = daemon.log_text().split("streamd.daemon: ready", 1)
    # Every chunk ran on the engine under this pipeline's kind (batched or not).
    fill = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
            if line.startswith("streamd_engine_batch_fill_")}
    label = f'{{kind="{PIPELINE[kind]}/320ms"}}'
    assert fill[f"streamd_engine_batch_fill_count{label}"] > 0
    assert len(serving) == 2 and "Compiling" in serving[0], "compiles are logged at warm-up"
    assert "Compiling" not in serving[1], "something compiled while serving"
    for events in sessions:
        assert events[0]["type"] == "ready"
        finals = [e for e in events if e["type"] == "final"]
        starts = [e for e in events if e["type"] == "speech_start"]
        partials = [e for e in events if e["type"] == "partial"]
        assert len(finals) >= 2, [e["type"] for e in events]
        assert [f["segment"] for f in finals] == list(range(len(finals)))  # one final each
        assert [s["segment"] for s in starts] == list(range(len(finals)))
        assert {p["segment"] for p in partials} == set(range(len(finals)))
        assert events[-1]["segments"] == len(finals)
        # The segment audio the daemon used: the final's span of the 16 kHz stream.
        segments = [stream[round(f["start"] * RATE) : round(f["end"] * RATE)] for f in finals]
        for f, expected in zip(finals, transcribe_stream(folder, segments, tmp_path, capsys),
                               strict=True):
            assert len(expected) >= 10, "the random model should spell some text"
            assert f["text"] == expected, f
            assert [w["word"] for w in f.get("words", [])] == expected.split()
            # Partials fed only audio the endpoint keeps: the final continues each of them.
            for p in partials:
                if p["segment"] == f["segment"]:
                    assert f["text"].startswith(p["text"]), (p, f)
                    assert p["text"].startswith(p.get("stable", "")), p
