"""Streaming benchmark: N concurrent real-time WebSocket streams against `streamd serve`.

    python bench/stream.py [--streams 1 2 4 8] [--peer] [--out bench/results/stream.json]
                           [--set vad.endpoint_silence_ms=450 --set recognition.beam_size=2]
                           [--audio-dir tests/data/audio tests/data/audio/dev]
                           [--context on off]

Each stream plays the stream recording of each `--audio-dir` (stream_shared_01.wav,
stream_dev_01.flac; utterance spans in the manifest) at real time in 100 ms frames,
streams offset by a fraction of a second. `--context on off` runs every (file, N) twice,
back to back, with the sessions' `start.context` true then false (the same daemon), and
adds per run the finals whose text ends with a phrase of 3+ words said twice (the
reference does not). Every run reports the pipeline's counters over it: context
fallbacks, finals decoded again with the stable prefix forced (`restabilized`: a second
decode before the final), finals decoded early at the speech pause. One unmeasured
20 s stream runs first (the first run after the start was slower, whatever it measured).
Measured per N:
- final latency: manifest end of an utterance sent -> the final covering it received;
  also from the endpoint (the moment the VAD could decide: segment end + endpoint
  silence - end pad), which is what the pipeline controls;
- first-partial latency: voiced onset sent (speech_start + start pad) -> first partial;
  and from a common reference for both systems (`onset_partial`): the utterance's speech
  onset in the audio (first frame within 35 dB of its loudest) sent -> its first text
  (partial, or final if none; the peer: its first committed word);
- daemon CPU seconds per audio second (utime + stime of the daemon process);
- WER of the finals (jiwer, Whisper English normalizer on both sides).
With `--peer` (after `make bench-deps`), bench/peer_localagreement.py (WhisperLiveKit's
LocalAgreement-2 over faster-whisper, same
tiny.en weights) runs the same N streams in its own process after ours.
`--set` writes the given keys into a TOML config for the daemon; the VAD values used in
the measurement (endpoint wait, start pad) are then the daemon's, not the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
RATE = 16000
FRAME = RATE // 10  # 100 ms per message
WARM_STREAM_S = 20  # the unmeasured stream before the measured runs


# The whisper pipeline's counters a run reports (deltas): finals decoded again without the
# prompt, finals decoded again with the stable prefix forced (a second decode that delays
# the final), finals spliced onto the stable prefix instead, finals decoded early at the
# speech pause, partials skipped (engine busy).
PIPELINE_COUNTERS = {"fallbacks": "streamd_context_fallbacks",
                     "restabilized": "streamd_finals_restabilized",
                     "spliced": "streamd_finals_spliced",
                     "finals_early": "streamd_finals_early",
                     "partials_skipped": "streamd_partials_skipped"}


def pipeline_counters(port: int) -> dict[str, float]:
    """The daemon's PIPELINE_COUNTERS now (0 for those its pipeline does not have)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for key, name in PIPELINE_COUNTERS.items():
        values[key] = sum(float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith((name + "_total ", name + " ")))
    return values


def shared_stream(audio_dir: Path) -> tuple[np.ndarray, dict]:
    entries = [json.loads(x) for x in (audio_dir / "manifest.jsonl").read_text().splitlines()
               if x.strip()]
    # The stream file (its manifest lists the utterances' spans); other entries with
    # segments (the dev set's joined sentences) are single recordings.
    entry = next(e for e in entries if e["audio"].startswith("stream_"))
    audio, rate = sf.read(audio_dir / entry["audio"], dtype="float32")
    assert rate == RATE
    return audio, entry


def speech_onsets(audio: np.ndarray, entry: dict) -> list[float]:
    """Per manifest utterance, where its speech begins (seconds): the first 10 ms frame of
    the utterance within 35 dB of its loudest frame (and above -50 dBFS). The manifest's
    spans start with the source clip, leading silence included; this common reference
    measures both systems from the same moment."""
    hop = RATE // 100
    onsets = []
    for seg in entry["segments"]:
        clip = audio[int(seg["start_s"] * RATE) : int(seg["end_s"] * RATE)]
        frames = clip[: len(clip) // hop * hop].reshape(-1, hop).astype(np.float64)
        db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
        first = int(np.argmax(db >= max(db.max() - 35, -50)))
        onsets.append(seg["start_s"] + first * hop / RATE)
    return onsets


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    return float(jiwer.wer(norm(" ".join(refs)), norm(" ".join(hyps))))


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Daemon:
    def __init__(self, workdir: Path, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
        env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax"))
        self.log_path = workdir / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamd.daemon", "--port", "0", "--node", "bench",
             "--log-format", "json", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text()[-3000:])
            ready = [r for r in self._records() if r.get("msg") == "ready"]
            if ready:
                self.port, self.warmup_s = int(ready[0]["port"]), ready[0].get("warmup_s")
                self.startup_s = time.monotonic() - t0
                return
            time.sleep(0.2)

    def _records(self) -> list[dict]:
        return [json.loads(x) for x in self.log_path.read_text().splitlines()
                if x.startswith("{")]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self._log.close()


async def one_stream(port: int, name: str, audio: np.ndarray, delay: float,
                     context: bool | None = None) -> dict[str, Any]:
    """Real-time stream; returns events (with receive times) and frame send times."""
    from websockets.asyncio.client import connect

    await asyncio.sleep(delay)
    events: list[dict] = []
    sent: list[float] = []  # monotonic time at which frame k (samples up to (k+1)*FRAME) went
    async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
        start = {"type": "start", "sample_rate": RATE, "encoding": "pcm_s16le",
                 "channels": 1, "session": name}
        if context is not None:
            start["context"] = context
        await ws.send(json.dumps(start))

        async def receive() -> None:
            async for message in ws:
                event = json.loads(message)
                event["_t"] = time.monotonic()
                events.append(event)
                if event["type"] == "done":
                    return

        reader = asyncio.create_task(receive())
        t0 = time.monotonic()
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
        for k, i in enumerate(range(0, len(pcm), FRAME)):
            await asyncio.sleep(max(0.0, t0 + k * FRAME / RATE - time.monotonic()))
            await ws.send(pcm[i : i + FRAME].tobytes())
            sent.append(time.monotonic())
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, 120)
    return {"events": events, "sent": sent}


def sent_at(sent: list[float], seconds: float) -> float:
    """When the frame holding stream time `seconds` was sent."""
    k = min(max(int(np.ceil(seconds * RATE / FRAME)) - 1, 0), len(sent) - 1)
    return sent[k]


LATENCIES = ("final", "endpoint", "first_partial", "onset_partial")  # measured per stream


def measure(run: dict, entry: dict, vad: dict, onsets: list[float]) -> dict[str, list[float]]:
    events, sent = run["events"], run["sent"]
    finals = [e for e in events if e["type"] == "final"]
    starts = {e["segment"]: e for e in events if e["type"] == "speech_start"}
    out: dict[str, list[float]] = {key: [] for key in LATENCIES}
    for seg, onset in zip(entry["segments"], onsets, strict=True):
        # The last final overlapping the utterance (the VAD may split one at a pause).
        covering = [f for f in finals if f["start"] < seg["end_s"] and seg["start_s"] < f["end"]]
        if covering:
            out["final"].append(covering[-1]["_t"] - sent_at(sent, seg["end_s"]))
            # First text of the utterance on screen: its first segment's first partial.
            first = [e for e in events if e["type"] == "partial"
                     and e["segment"] == covering[0]["segment"] and e["text"]]
            out["onset_partial"].append(
                (first[0] if first else covering[0])["_t"] - sent_at(sent, onset))
    wait = (vad["endpoint_silence_ms"] - vad["end_pad_ms"]) / 1000
    for f in finals:
        out["endpoint"].append(f["_t"] - sent_at(sent, f["end"] + wait))
        partials = [e for e in events if e["type"] == "partial" and e["segment"] == f["segment"]]
        if partials and f["segment"] in starts:
            onset = starts[f["segment"]]["start"] + vad["start_pad_ms"] / 1000
            out["first_partial"].append(partials[0]["_t"] - sent_at(sent, onset))
    return out


def summarize(latencies: dict[str, list[float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, values in latencies.items():
        out[f"{key}_median_s"] = statistics.median(values) if values else None
        out[f"{key}_p90_s"] = pct(values, 90)
    return out


def config_toml(settings: list[str]) -> tuple[str, dict[str, Any]]:
    """`section.key=value` settings -> (TOML text, the daemon's VAD values as a dict)."""
    from streamd.config import VadConfig

    sections: dict[str, list[str]] = {}
    vad: dict[str, Any] = {}
    for item in settings:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        sections.setdefault(section, []).append(f"{name} = {value}")
        if section == "vad":
            vad[name] = json.loads(value)
    text = "".join(f"[{sec}]\n" + "\n".join(lines) + "\n" for sec, lines in sections.items())
    return text, VadConfig(**vad).__dict__


async def run_streamd(daemon: Daemon, n: int, audio: np.ndarray, entry: dict,
                      vad: dict[str, Any], context: bool | None = None, tag: str = "") -> dict:
    cpu0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
    counters0 = pipeline_counters(daemon.port)
    runs = await asyncio.gather(*(one_stream(daemon.port, f"b{n}{tag}-{i}", audio, 0.37 * i,
                                             context) for i in range(n)))
    cpu = cpu_seconds(daemon.proc.pid) - cpu0
    lat: dict[str, list[float]] = {key: [] for key in LATENCIES}
    wers, tails = [], 0
    onsets = speech_onsets(audio, entry)
    for run in runs:
        for key, values in measure(run, entry, vad, onsets).items():
            lat[key] += values
        finals = [e for e in run["events"] if e["type"] == "final"]
        wers.append(wer([s["text"] for s in entry["segments"]], [e["text"] for e in finals]))
        for f in finals:  # the reference text of the utterances the final overlaps
            ref = " ".join(s["text"] for s in entry["segments"]
                           if s["start_s"] < f["end"] and f["start"] < s["end_s"])
            tails += repeated_tail(f["text"], ref)
    audio_s = n * len(audio) / RATE
    counters = {key: value - counters0[key]
                for key, value in pipeline_counters(daemon.port).items()}
    return {"system": "streamd", "file": entry["audio"], "streams": n,
            "context": {None: "default", True: "on", False: "off"}[context], **summarize(lat),
            "cpu_s_per_audio_s": cpu / audio_s, "wall_s": time.monotonic() - t0,
            "wer": statistics.mean(wers), "finals": len(lat["endpoint"]),
            **counters, "repeated_tails": tails,
            "utterances_covered": len(lat["final"]),
            "finals_text": [e["text"] for e in runs[0]["events"] if e["type"] == "final"]}


def repeated_tail(text: str, reference: str) -> bool:
    """The text ends with a phrase of 3+ words said twice in a row that the reference does
    not say twice (tests/helpers/text.py's rule, normalized words)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.text import normalize, reference_repeats
    from helpers.text import repeated_tail as tail

    phrase = tail(normalize(text).split())
    return bool(phrase) and not reference_repeats(normalize(reference).split(), phrase)


def offline(audio_dir: Path, entry: dict) -> dict:
    """`streamd transcribe` of the same file (WER against the same references)."""
    proc = subprocess.run(
        [sys.executable, "-m", "streamd.cli", "transcribe", "--json",
         str(audio_dir / entry["audio"])],
        cwd=REPO, capture_output=True, text=True, check=True)
    text = json.loads(proc.stdout.strip().splitlines()[-1])["text"]
    return {"system": "streamd transcribe (offline)", "file": entry["audio"],
            "wer": wer([s["text"] for s in entry["segments"]], [text])}


def run_peer(n: int, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "peer_localagreement.py"), "--streams", str(n),
           "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = ["system", "file", "streams", "context", "final_median_s", "final_p90_s",
            "endpoint_median_s", "endpoint_p90_s", "first_partial_median_s", "first_partial_p90_s",
            "onset_partial_median_s", "onset_partial_p90_s", "cpu_s_per_audio_s", "wer",
            "fallbacks", "restabilized", "spliced", "finals_early", "repeated_tails"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(f(r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--audio-dir", type=Path, nargs="+",
                    default=[REPO / "tests" / "data" / "audio"],
                    help="folders whose manifest lists a stream file (stream_*); each is run")
    ap.add_argument("--context", nargs="+", choices=("on", "off", "default"),
                    default=["default"],
                    help="per run, the sessions' start.context: on, off, or not sent")
    ap.add_argument("--peer", action="store_true",
                    help="also run the WhisperLiveKit LocalAgreement peer")
    ap.add_argument("--offline", action="store_true",
                    help="also run `streamd transcribe` on the file (offline WER)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stream.json")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="daemon config value (TOML syntax), e.g. vad.endpoint_silence_ms=450")
    ap.add_argument("daemon_args", nargs="*", help="extra `streamd serve` flags (after --)")
    args = ap.parse_args()
    streams = [shared_stream(folder) for folder in args.audio_dir]
    contexts = [{"on": True, "off": False, "default": None}[c] for c in args.context]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    toml, vad = config_toml(args.set)
    # Measures latency past the capacity too: the default max_sessions would refuse them.
    daemon_args = ["--max-sessions", str(max(16, *args.streams)), *args.daemon_args]
    if toml:
        config = args.out.with_suffix(".toml")
        config.write_text(toml)
        daemon_args += ["--config", str(config)]
    daemon = Daemon(args.out.parent, daemon_args)
    rows = []
    try:
        print(f"daemon ready in {daemon.startup_s:.1f} s (warm-up {daemon.warmup_s} s)",
              flush=True)
        # One unmeasured stream first: the first run after the daemon's start was slower
        # whichever context setting it had (the on/off rows depended on their order).
        audio, _ = streams[0]
        asyncio.run(one_stream(daemon.port, "warm", audio[: WARM_STREAM_S * RATE], 0.0))
        for n in args.streams:
            for audio, entry in streams:
                for context in contexts:
                    tag = {None: "", True: "c", False: "n"}[context]
                    rows.append(asyncio.run(run_streamd(daemon, n, audio, entry, vad, context,
                                                        tag)))
                    print(table(rows[-1:]), flush=True)
    finally:
        daemon.stop()
    if args.offline:
        for folder, (_, entry) in zip(args.audio_dir, streams, strict=True):
            rows.append(offline(folder, entry))
            print(table(rows[-1:]), flush=True)
    if args.peer:
        for n in args.streams:
            rows.append(run_peer(n, args.out.parent / f"peer-{n}.json"))
            print(table(rows[-1:]), flush=True)
    result = {"audio": [e["audio"] for _, e in streams],
              "audio_s": [len(a) / RATE for a, _ in streams], "cpu_count": os.cpu_count(),
              "load_avg_at_end": os.getloadavg(), "daemon_startup_s": daemon.startup_s,
              "daemon_warmup_s": daemon.warmup_s, "settings": args.set, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
