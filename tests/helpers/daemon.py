"""A real `streamd serve` subprocess, one WebSocket session against it, and the tiny
random CTC checkpoint that served-pipeline tests load.

    with serve(tmp_path, "--pipeline", "ctc", "--model", str(folder),
               env={"JAX_LOG_COMPILES": "1"}) as daemon:    # /healthz said ok
        events = stream_session(daemon.port, audio, message_s=0.2, speed=10)
        ... daemon.log_path ... daemon.proc ...
    # SIGTERM to the process group, SIGKILL if it hangs

`daemon_env()` is the environment the daemon gets (also right for `streamd transcribe`
subprocesses): this process's, less any `STREAMD_*` setting, on the CPU unless
`JAX_PLATFORMS` says otherwise.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from websockets.sync.client import connect

from . import free_port

REPO = Path(__file__).resolve().parents[2]
RATE = 16000
# Characters of the tiny CTC vocabulary: enough letters that a random head spells words.
CTC_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'"]
STOP_TIMEOUT_S = 30  # the daemon's graceful shutdown, before SIGKILL


def test_pipeline_env() -> dict[str, str]:
    """Environment for `serve(..., env=)` that runs the daemon on the `echo` pipeline
    (streamd/pipelines/echo.py: text = the segment's duration), not a model."""
    return {"STREAMD_RECOGNITION_PIPELINE": "echo"}


test_pipeline_env.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def speech_audio(shared_audio_dir: Path, names: tuple[str, ...] = (
        "librispeech_61-70968-0002.wav", "cmu_arctic_axb_a0004.wav",
        "cmu_arctic_axb_a0005.wav")) -> np.ndarray:
    """16 kHz float32: each recording after 1 s of silence, then 1 s more (one segment per
    recording with the default VAD)."""
    import soundfile as sf

    parts = []
    for name in names:
        audio, rate = sf.read(shared_audio_dir / name, dtype="float32")
        assert rate == RATE
        parts += [np.zeros(RATE, np.float32), audio]
    return np.concatenate([*parts, np.zeros(RATE, np.float32)])


def daemon_env(**extra: str) -> dict[str, str]:
    """This process's environment without `STREAMD_*` settings, on the CPU by default,
    plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    return env


@dataclass(frozen=True)
class Daemon:
    """A running `streamd serve`; stdout and stderr both go to `log_path`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class _PortTaken(RuntimeError):
    """The daemon could not bind its port: someone else holds it."""


def _start(workdir: Path, port: int, args: tuple[str, ...], env: Mapping[str, str] | None,
           log_format: str) -> Daemon:
    log_path = workdir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "streamd.cli", "serve", "--port", str(port),
           "--log-format", log_format, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO,
                                env=daemon_env(**(env or {})), start_new_session=True)
    return Daemon(proc, port, log_path)


def _wait_until_ready(daemon: Daemon, startup_timeout: float) -> None:
    """Until /healthz says ok; raises if the daemon exits (_PortTaken when its port was
    in use) or is not up in time. Answers that are not streamd's (another program on the
    port) count as not ready."""
    deadline = time.monotonic() + startup_timeout
    while True:
        if daemon.proc.poll() is not None:
            log = daemon.log_text()
            kind = _PortTaken if "address already in use" in log.lower() else RuntimeError
            raise kind(f"streamd serve exited ({daemon.proc.returncode}):\n{log[-3000:]}")
        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
            with urllib.request.urlopen(f"{daemon.http}/healthz", timeout=1) as r:
                if json.load(r).get("status") == "ok":
                    return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(5)
            raise TimeoutError(f"streamd serve not ready in {startup_timeout} s:\n"
                               f"{daemon.log_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def serve(
    workdir: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 60.0,
    log_format: str = "text",
    port: int | None = None,
) -> Iterator[Daemon]:
    """`python -m streamd.cli serve ARGS` on `port` (default: a free one; its own process
    group, log in `workdir`), yielded once /healthz says ok; always ended after. `env` is
    added to `daemon_env()`. Raises if the daemon exits or is not up within
    `startup_timeout`."""
    for attempt in range(3):
        daemon = _start(workdir, port or free_port(), args, env, log_format)
        try:
            _wait_until_ready(daemon, startup_timeout)
            break
        except _PortTaken:
            # free_port() hands out a port that was free a moment ago; another test's
            # process (another pytest worker's broker or daemon) may bind it first.
            if port is not None or attempt == 2:
                raise
    proc = daemon.proc
    try:
        yield daemon
    finally:
        if proc.poll() is None:
            # The group: anything the daemon started goes too.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def stream_session(port: int, audio: np.ndarray, *, message_s: float = 0.1,
                   speed: float = 4.0, recv_timeout: float = 120.0) -> list[dict]:
    """One WebSocket session: 16 kHz float32 `audio` in messages of `message_s` seconds,
    one every `message_s / speed` seconds (`speed` x real time), then `stop`; returns the
    events up to `done`."""
    step = round(RATE * message_s)
    events: list[dict] = []
    with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": RATE, "channels": 1,
                            "encoding": "pcm_f32le"}))
        for i in range(0, len(audio), step):
            ws.send(audio[i : i + step].astype("<f4").tobytes())
            time.sleep(message_s / speed)
        ws.send(json.dumps({"type": "stop"}))
        while not events or events[-1]["type"] != "done":
            events.append(json.loads(ws.recv(timeout=recv_timeout)))
    return events


def save_tiny_ctc(folder: Path, family: str = "wav2vec2", with_head: bool = True) -> Path:
    """A tiny random transformers CTC checkpoint (`family`: "wav2vec2" or "conformer")
    as `save_pretrained` writes it, with its tokenizer and feature-extractor files;
    seeded, so every call writes the same weights. `with_head=False`: the bare encoder
    (not a CTC model)."""
    # Imported here: torch and transformers take seconds to import, and most users of
    # this module only run the daemon.
    import torch
    import transformers

    common = dict(
        vocab_size=len(CTC_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    if family == "conformer":
        config = transformers.Wav2Vec2ConformerConfig(
            **common, conv_depthwise_kernel_size=7, position_embeddings_type="rotary")
        classes = (transformers.Wav2Vec2ConformerForCTC, transformers.Wav2Vec2ConformerModel)
    elif family == "wav2vec2":
        config = transformers.Wav2Vec2Config(**common)
        classes = (transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Model)
    else:
        raise ValueError(f"unknown CTC family {family!r}")
    model = classes[0](config) if with_head else classes[1](config)
    if with_head:
        with torch.no_grad():  # a wider head, so the argmax path spells varied text
            model.lm_head.weight.mul_(30.0)
    model.eval().save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CTC_VOCAB)}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<pad>", "unk_token": "<unk>", "word_delimiter_token": "|"}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    return folder
