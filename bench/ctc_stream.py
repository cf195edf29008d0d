"""Streaming CTC speed: per-chunk latency and real-time factor of base-size models.

    python bench/ctc_stream.py [--chunks 12] [--batches 1,4,16] [--out FILE.json]

Models (random weights, built with transformers and converted; speed does not depend on
the values): wav2vec2-base (the 95M-parameter layout of wav2vec2-base-960h) and a
base-size wav2vec2-conformer (768 wide, 12 blocks, relative positions, depthwise kernel
31; feed-forwards 1536 wide so its size is close to the base model's). Each runs
`encode_chunk` (params from `prepare_stream`) on 320 ms chunks with the default
`StreamConfig` (256 frames of left context, 16 frames = 320 ms of look-ahead) for each
batch size, after one warm-up call that compiles. Latency is the wall time of one call
(all streams of the batch); the real-time factor is latency / 320 ms (below 1: the batch
keeps up with live audio), and per-stream cost is latency / batch. The machine's load
average before and after each row is recorded: on a shared machine, other work slows it.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _build(kind: str):
    """(config, params, parameter count) for a random base-size model of `kind`."""
    import torch
    import transformers

    from models import wav2vec2
    from models.wav2vec2 import Wav2Vec2ConformerConfig

    torch.manual_seed(0)
    if kind == "wav2vec2-base":
        hf = transformers.Wav2Vec2Config(vocab_size=32)
        model = transformers.Wav2Vec2ForCTC(hf)
        config = wav2vec2.Wav2Vec2Config.from_hf_config(hf.to_dict())
    else:
        hf = transformers.Wav2Vec2ConformerConfig(
            vocab_size=32, intermediate_size=1536, position_embeddings_type="relative",
            hidden_act="swish")
        model = transformers.Wav2Vec2ConformerForCTC(hf)
        config = Wav2Vec2ConformerConfig.from_hf_config(hf.to_dict())
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = wav2vec2.params_from_state_dict(config, tensors)
    import jax

    count = sum(x.size for x in jax.tree.leaves(params))
    return config, jax.tree.map(jax.numpy.asarray, params), count


def _measure(config, params, batch: int, chunks: int, stream) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import wav2vec2

    n = stream.chunk_frames * config.total_stride
    rng = np.random.default_rng(0)
    params = wav2vec2.prepare_stream(params, config, stream)
    state = wav2vec2.init_state(config, batch, stream)
    valid = jnp.full((batch,), n, jnp.int32)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    out, state = wav2vec2.encode_chunk(params, state, jnp.zeros((batch, n)), valid)
    jax.block_until_ready(out.logits)
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(chunks):
        chunk = jnp.asarray(rng.standard_normal((batch, n)).astype(np.float32))
        started = time.perf_counter()
        out, state = wav2vec2.encode_chunk(params, state, chunk, valid)
        jax.block_until_ready(out.logits)
        times.append(time.perf_counter() - started)
    times_ms = np.asarray(times) * 1e3
    chunk_ms = 1e3 * n / 16_000
    return {
        "batch": batch, "chunks": chunks, "chunk_ms": chunk_ms,
        "first_call_s": round(compile_s, 2),
        "latency_ms_mean": round(float(times_ms.mean()), 1),
        "latency_ms_p50": round(float(np.percentile(times_ms, 50)), 1),
        "latency_ms_p90": round(float(np.percentile(times_ms, 90)), 1),
        "rtf": round(float(times_ms.mean() / chunk_ms), 3),
        "per_stream_rtf": round(float(times_ms.mean() / chunk_ms / batch), 3),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main(argv: list[str] | None = None) -> int:
    from models.wav2vec2 import StreamConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wav2vec2-base,conformer-base")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--chunks", type=int, default=12, help="timed chunks per batch size")
    parser.add_argument("--right-frames", default=str(StreamConfig().right_frames),
                        help="comma-separated look-ahead sizes in frames (63+: exact pos conv)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ctc_stream.json")
    args = parser.parse_args(argv)
    from models.disk_cache import enable_compilation_cache

    enable_compilation_cache()  # before JAX: first_call_s is then a cache load on reruns
    import jax

    base = StreamConfig()
    rows = []
    for kind in args.models.split(","):
        config, params, count = _build(kind)
        for right in (int(r) for r in args.right_frames.split(",")):
            stream = StreamConfig(base.chunk_frames, base.left_frames, right)
            # emitted frame g waits for audio up to frame g + right + 1, plus the chunk
            latency_ms = 20 * (stream.chunk_frames + right + config.fe_delay_frames)
            for batch in (int(b) for b in args.batches.split(",")):
                row = {"model": kind, "params_m": round(count / 1e6, 1),
                       "left_frames": stream.left_frames, "right_frames": right,
                       "algorithmic_latency_ms": latency_ms,
                       **_measure(config, params, batch, args.chunks, stream)}
                rows.append(row)
                print(f"{kind:15s} {row['params_m']:6.1f}M  right {right:3d}  batch {batch:3d}  "
                      f"latency mean {row['latency_ms_mean']:8.1f} ms  p90 "
                      f"{row['latency_ms_p90']:8.1f} ms  RTF {row['rtf']:6.3f}  per stream "
                      f"{row['per_stream_rtf']:6.3f}  (first call {row['first_call_s']} s, load "
                      f"{row['load_avg_1min']})",
                      flush=True)
    result = {
        "chunk_ms": 20 * base.chunk_frames,
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "jax": jax.__version__, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
