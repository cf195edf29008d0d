"""Previous-text context of the whisper pipeline's finals, swept in process: WER with and
without it, per stream file, per reset silence and prompt length.

    python bench/context.py [--audio-dir tests/data/audio tests/data/audio/dev]
                            [--reset-s 1.5 3 10] [--tokens 64 223]
                            [--out bench/results/context.json]

Each stream file (stream_shared_01.wav, stream_dev_01.flac) goes through the daemon's
own sans-I/O `Session` (its VAD segmentation) and `WhisperRecognizer` in process
(tiny.en), 100 ms at a time, each recognizer request awaited before the next frame and
partials off (the finals are fresh decodes at the pause, as at one stream on an idle
machine): deterministic, text only, no timing. Rows: context off, then on for every
(tokens, reset) pair; per file the finals' WER, the finals decoded again without the
prompt (fallbacks) and the finals that end in a phrase of 3+ words said twice.
`bench/stream.py --context on off` measures the same at real time with partials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
RATE = 16000
FRAME = RATE // 10


async def finals_of(pipeline: Any, audio: np.ndarray, context: bool,
                    partials: bool) -> list[dict]:
    from streamd.config import load_config
    from streamd.protocol import Start
    from streamd.recognizer import RecognizerOptions
    from streamd.session import Request, Session

    cfg = load_config(environ={})
    session = Session(Start(RATE, "pcm_f32le", 1, "bench", None, partials), cfg.vad, "whisper",
                      cfg.recognition.partial_interval_ms)
    rec = pipeline.new_recognizer("bench", RecognizerOptions(context=context))
    finals: list[dict] = []

    async def handle(outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Request):
                if out.kind == "partial":
                    await rec.partial(out.audio, out.segment)
                else:
                    hyp = await rec.final(out.audio, out.segment)
                    if hyp.text.strip():
                        finals.append({"start": out.segment.start, "end": out.segment.end,
                                       "text": hyp.text.strip()})

    for i in range(0, len(audio), FRAME):
        await handle(session.feed_samples(audio[i : i + FRAME]))
    await handle(session.stop())
    rec.close()
    return finals


async def sweep(streams: list[tuple[np.ndarray, dict]], settings: list[tuple[int, float]],
                partials: str) -> list[dict]:
    from stream import repeated_tail, wer

    from models.registry import load_whisper
    from streamd.engine import Engine
    from streamd.pipelines.whisper import WhisperPipeline

    model = load_whisper()
    rows = []
    for tokens, reset in settings:
        engine = Engine(batch_sizes=(1,), workers=1)
        pipeline = WhisperPipeline(engine, model, context_tokens=tokens or 64,
                                   context_reset_s=reset or 10.0,
                                   context_partials=partials == "context")
        engine.warmup()
        engine.start()
        try:
            for audio, entry in streams:
                before = pipeline.context_fallbacks
                redone = pipeline.finals_restabilized
                spliced = getattr(pipeline, "finals_spliced", 0)
                finals = await finals_of(pipeline, audio, bool(tokens), partials != "off")
                tails = sum(repeated_tail(f["text"], " ".join(
                    s["text"] for s in entry["segments"]
                    if s["start_s"] < f["end"] and f["start"] < s["end_s"])) for f in finals)
                rows.append({
                    "file": entry["audio"], "context": "on" if tokens else "off",
                    "partials": partials,
                    "tokens": tokens, "reset_s": reset,
                    "wer": wer([s["text"] for s in entry["segments"]],
                               [f["text"] for f in finals]),
                    "finals": len(finals), "fallbacks": pipeline.context_fallbacks - before,
                    # finals decoded again with the stable words forced / spliced onto them
                    "restabilized": pipeline.finals_restabilized - redone,
                    "spliced": getattr(pipeline, "finals_spliced", 0) - spliced,
                    "repeated_tails": tails, "texts": [f["text"] for f in finals],
                    # silence between consecutive finals (what context_reset_s compares)
                    "gaps_s": [round(b["start"] - a["end"], 3)
                               for a, b in zip(finals, finals[1:], strict=False)]})
                r = rows[-1]
                print(f"| {r['file']} | {partials} | {r['context']} | {tokens or '-'} | "
                      f"{reset or '-'} | "
                      f"{100 * r['wer']:.2f} | {r['finals']} | {r['fallbacks']} | "
                      f"{r['repeated_tails']} | {r['restabilized']} | {r['spliced']} |",
                      flush=True)
        finally:
            await engine.stop()
    return rows


def main() -> None:
    from stream import shared_stream

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio-dir", type=Path, nargs="+",
                    default=[REPO / "tests" / "data" / "audio",
                             REPO / "tests" / "data" / "audio" / "dev"])
    from streamd.pipelines.whisper import CONTEXT_RESET_S

    ap.add_argument("--reset-s", type=float, nargs="+", default=[CONTEXT_RESET_S],
                    help="silences after which the context is cleared (default: the daemon's)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64])
    ap.add_argument("--partials", choices=("off", "context", "plain"), nargs="+",
                    default=["off"],
                    help="off: finals only; context / plain: every partial decoded, with / "
                         "without the previous text (finals have it either way)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "context.json")
    args = ap.parse_args()
    streams = [shared_stream(folder) for folder in args.audio_dir]
    settings = [(0, 0.0)] + [(t, r) for t in args.tokens for r in args.reset_s]
    print("| file | partials | context | tokens | reset s | finals WER % | finals | fallbacks | "
          "repeated tails | restabilized | spliced |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for partials in args.partials:
        rows += asyncio.run(sweep(streams, settings, partials))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
