"""`POST /v1/audio/transcriptions` on the real tiny.en through the real `openai` client:
jfk.wav in every response format from one daemon, and the text is `streamd transcribe`'s
for the same file (the same offline transcriber, the same settings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest
import soundfile as sf
from helpers import free_port, terminate
from helpers.daemon import REPO, daemon_env, serve
from helpers.text import normalize

pytestmark = pytest.mark.e2e

JFK = REPO / "streamd" / "data" / "jfk.wav"
DURATION_S = sf.info(str(JFK)).duration
TIME = r"\d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def cli_run() -> Iterator[subprocess.Popen[str]]:
    """`streamd transcribe` of the same file, started first: it loads and compiles while
    the daemon warms up."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamd.cli", "transcribe", "--json", str(JFK)],
        cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    terminate(proc)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory,
        cli_run: subprocess.Popen[str]) -> Iterator[openai.OpenAI]:
    """One daemon for every format: the first request compiles the offline decoder."""
    http_port = free_port()
    # Files never go through the engine: its batch shapes above 1 need not compile.
    with serve(tmp_path_factory.mktemp("openai-e2e"), "--http-port", str(http_port),
               env={"STREAMD_RECOGNITION_BATCH_SIZES": "1"}, startup_timeout=400):
        yield openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{http_port}/v1",
                            max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def cli_text(cli_run: subprocess.Popen[str]) -> str:
    out, err = cli_run.communicate(timeout=400)
    assert cli_run.returncode == 0, err
    return json.loads(out.splitlines()[-1])["text"]


def transcribe(api: openai.OpenAI, **kwargs):
    kwargs.setdefault("model", "whisper-1")  # any name means the loaded model
    with open(JFK, "rb") as f:
        return api.audio.transcriptions.create(file=f, **kwargs)


def test_json_is_streamd_transcribe(api: openai.OpenAI, cli_text: str) -> None:
    result = transcribe(api)
    assert result.text == cli_text
    assert "ask not what your country can do for you" in normalize(result.text)


def test_text_srt_vtt(api: openai.OpenAI, cli_text: str) -> None:
    text = transcribe(api, response_format="text")
    assert text.strip() == cli_text
    srt = transcribe(api, response_format="srt", model="tiny.en")
    cues = srt.strip().split("\n\n")
    assert cues and cues[0].split("\n")[0] == "1"
    assert all(len(c.split("\n")) == 3 for c in cues)
    assert " ".join(c.split("\n")[2] for c in cues) == cli_text
    vtt = transcribe(api, response_format="vtt")
    header, *vtt_cues = vtt.strip().split("\n\n")
    assert header == "WEBVTT" and len(vtt_cues) == len(cues)
    assert all(re.fullmatch(rf"{TIME}\.\d{{3}} --> {TIME}\.\d{{3}}", c.split("\n")[0])
               for c in vtt_cues)
    assert all(re.fullmatch(rf"{TIME},\d{{3}} --> {TIME},\d{{3}}", c.split("\n")[1])
               for c in cues)


def test_verbose_json_segments(api: openai.OpenAI, cli_text: str) -> None:
    result = transcribe(api, response_format="verbose_json",
                        timestamp_granularities=["segment"], language="en", temperature=0.0)
    assert result.text == cli_text
    assert result.language == "english"
    assert result.duration == pytest.approx(DURATION_S, abs=0.01)
    segments = result.segments
    assert segments and [s.id for s in segments] == list(range(len(segments)))
    assert " ".join(s.text for s in segments) == cli_text
    ends = [0.0] + [s.end for s in segments[:-1]]
    for seg, previous_end in zip(segments, ends, strict=True):
        assert previous_end <= seg.start < seg.end <= DURATION_S + 0.01
    assert result.words is None


def test_verbose_json_words(api: openai.OpenAI, cli_text: str) -> None:
    result = transcribe(api, response_format="verbose_json",
                        timestamp_granularities=["word", "segment"])
    assert result.text == cli_text
    words = result.words
    assert words, "no word timings (WhisperTranscriber.transcribe_segments(word_timestamps))"
    assert normalize(" ".join(w.word for w in words)) == normalize(cli_text)
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= DURATION_S + 0.01 for w in words)
    # Each word lies inside its segment (a word may not span two segments).
    segments = result.segments
    assert all(any(s.start - 0.02 <= w.start and w.end <= s.end + 0.02 for s in segments)
               for w in words)
