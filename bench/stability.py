"""Stable prefixes against finals: how often a fresh final would contradict what partials
called `stable`, and what keeping the promise costs in WER.

    python bench/stability.py [--agree 2 3] [--audio-dir DIR] [--match stream_]
                              [--out bench/results/stability.json]

Every shared recording (`tests/data/audio/`, utterances and the stream file) goes through
the daemon's own sans-I/O `Session` and `WhisperRecognizer` in process (tiny.en), one
100 ms frame at a time, each recognizer request awaited before the next frame: every
partial the session asks for is decoded (as at one stream on an idle machine), so the
run is deterministic. Per LocalAgreement-n setting it reports the finals' WER (the final
keeps the last stable prefix, decoding again with it forced when the fresh decode
contradicts it), the WER of fresh decodes of the same segments (no promise kept), how
many finals contradicted their stable prefix, and the share of final words that were
stable before the final came. No timed numbers: decode counts and text only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RATE = 16000
FRAME = RATE // 10


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    return float(jiwer.wer(norm(" ".join(refs)), norm(" ".join(hyps))))


async def run_file(pipeline: Any, audio: np.ndarray, agree: int) -> dict[str, Any]:
    from streamd.config import load_config
    from streamd.pipelines.stabilize import LocalAgreement
    from streamd.protocol import Start
    from streamd.session import Request, Session

    cfg = load_config(environ={})
    session = Session(Start(RATE, "pcm_f32le", 1, "bench", None, True), cfg.vad, "whisper",
                      cfg.recognition.partial_interval_ms)
    rec = pipeline.new_recognizer("bench")
    rec.policy = LocalAgreement(agree)
    finals, fresh, stable_words, final_words = [], [], 0, 0
    last_stable: dict[int, str] = {}
    contradicted: list[dict[str, str]] = []

    async def handle(outputs: list) -> None:
        nonlocal stable_words, final_words
        for out in outputs:
            if not isinstance(out, Request):
                continue
            if out.kind == "partial":
                hyp = await rec.partial(out.audio, out.segment)
                if hyp is not None and hyp.stable:
                    last_stable[out.segment.index] = hyp.stable.strip()
                continue
            hyp = await rec.final(out.audio, out.segment)
            alone = await pipeline.recognize(out.audio, (), final=True)
            words = [] if alone.silent else pipeline.cut_loop(pipeline.words(alone.tokens), 0)
            fresh.append(pipeline.words_text(words).strip())
            finals.append(hyp.text.strip())
            stable = last_stable.pop(out.segment.index, "")
            if not fresh[-1].startswith(stable):
                contradicted.append({"stable": stable, "fresh": fresh[-1], "final": finals[-1]})
            stable_words += len(stable.split())
            final_words += len(hyp.text.split())

    for i in range(0, len(audio), FRAME):
        await handle(session.feed_samples(audio[i : i + FRAME]))
    await handle(session.stop())
    return dict(finals=finals, fresh=fresh, stable_words=stable_words,
                final_words=final_words, contradicted=contradicted)


async def run(files: list[tuple[str, np.ndarray, str]], agree: int) -> dict[str, Any]:
    from models.registry import load_whisper
    from streamd.engine import Engine
    from streamd.pipelines.whisper import WhisperPipeline

    engine = Engine(batch_sizes=(1,), workers=1)
    pipeline = WhisperPipeline(engine, load_whisper())
    engine.warmup()
    engine.start()
    try:
        refs, finals, fresh, stable, words, count, examples = [], [], [], 0, 0, 0, []
        redone = pipeline.finals_restabilized
        for name, audio, text in files:
            r = await run_file(pipeline, audio, agree)
            refs.append(text)
            finals.append(" ".join(r["finals"]))
            fresh.append(" ".join(r["fresh"]))
            stable += r["stable_words"]
            count += len(r["finals"])
            examples += r["contradicted"]
            words += r["final_words"]
            print(f"  {name}: {len(r['finals'])} finals", file=sys.stderr, flush=True)
        return {
            "agree": agree, "finals_wer": wer(refs, finals), "fresh_wer": wer(refs, fresh),
            "finals_restabilized": pipeline.finals_restabilized - redone,
            "finals": count,
            "stable_word_share": stable / max(1, words),
            "contradicted": examples,  # last stable text vs the fresh decode, per final
        }
    finally:
        await engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agree", type=int, nargs="+", default=[2])
    ap.add_argument("--audio-dir", type=Path, default=REPO / "tests" / "data" / "audio")
    ap.add_argument("--match", default="", help="only files whose name contains this")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stability.json")
    args = ap.parse_args()
    from models.disk_cache import enable_compilation_cache

    enable_compilation_cache()
    entries = [json.loads(x) for x in (args.audio_dir / "manifest.jsonl").read_text()
               .splitlines() if x.strip()]
    files = []
    for e in (e for e in entries if args.match in e["audio"]):
        audio, rate = sf.read(args.audio_dir / e["audio"], dtype="float32")
        assert rate == RATE, e["audio"]
        # Half a second of silence around each utterance, as a speaker pauses.
        pad = np.zeros(RATE // 2, np.float32)
        files.append((e["audio"], np.concatenate([pad, audio, pad]), e["text"]))
    rows = []
    for agree in args.agree:
        print(f"LocalAgreement-{agree}", file=sys.stderr, flush=True)
        rows.append(asyncio.run(run(files, agree)))
    print("| LocalAgreement | finals WER % | fresh-decode WER % | finals redone / finals | "
          "stable share of final words |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        share = 100 * r["stable_word_share"]
        print(f"| {r['agree']} | {100 * r['finals_wer']:.2f} | {100 * r['fresh_wer']:.2f} | "
              f"{r['finals_restabilized']} / {r['finals']} | {share:.0f} % |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"files": [f[0] for f in files], "rows": rows}, indent=2)
                        + "\n")


if __name__ == "__main__":
    main()
