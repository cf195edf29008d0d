"""streamd-stream: stream a sound file or the microphone to a streamd daemon.

    streamd-stream [--url ws://HOST:PORT/v1/stream] [--token T] [--speed X] [--json] FILE
    streamd-stream [...] --mic [DEVICE]

Audio handling (our choice, per the protocol): files (WAV, FLAC, anything libsndfile
reads) are mixed down to mono here and sent as `pcm_s16le` at their native sample rate
when it lies in 8-48 kHz, the range the daemon promises to resample; files at other
rates are resampled to 16 kHz here with soxr. The microphone is captured at 16 kHz when
the device allows it, else at its default rate (again resampled by the daemon).

Files are sent at real-time pace by default (`--speed 2` is twice as fast, `--speed 0`
does not pace at all). Finals are printed as `[m:ss.cc - m:ss.cc] text`; the current
partial is shown on one rewritten line when stdout is a terminal. `--json` prints the
daemon's events exactly as received, one per line. Ctrl+C sends `stop` and waits for
the remaining finals; a second Ctrl+C quits at once.

When the connection breaks (the daemon died, restarted or shut down), the client
reconnects to the same URL with back-off (for up to `--resume-s`, default 60 s) and
continues the session with `start.resume`: it keeps the audio sent since the `end` of
the last final it received and sends it again, so every utterance gets a final
(docs/protocol.md, *Resuming a session*).

Exit status: 0 done; 1 the daemon refused (HTTP 401/503) or sent an error event;
2 bad usage or unreadable input; 3 daemon unreachable or the connection dropped
before `done`; 130 interrupted twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from clients import LiveLine, format_span

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
CHUNK_S = 0.1  # 100 ms frames: small enough for low latency, few enough messages
MIN_RATE, MAX_RATE, FALLBACK_RATE = 8000, 48000, 16000
MIC_QUEUE_FRAMES = 100  # 10 s of mic audio may wait for the socket; then oldest drop

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class ClientError(Exception):
    """A failure with a message for the user and the exit status that goes with it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# --- audio sources ----------------------------------------------------------------


def to_s16le(samples: np.ndarray) -> bytes:
    """float samples [T] or [T, C] in [-1, 1] -> mono little-endian int16 bytes."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    return pcm.tobytes()


async def _stopped_within(stop: asyncio.Event, delay: float) -> bool:
    """Sleep up to `delay` seconds; True as soon as `stop` is set."""
    if delay <= 0:
        return stop.is_set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


@dataclass
class FileSource:
    """A sound file read in 100 ms chunks, paced at `speed` × real time (0: unpaced)."""

    path: Path
    speed: float = 1.0
    sample_rate: int = field(init=False)

    def __post_init__(self) -> None:
        import soundfile

        try:
            self._file = soundfile.SoundFile(str(self.path))
        except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
            raise ClientError(f"cannot read {self.path}: {exc}", EXIT_USAGE) from exc
        native = self._file.samplerate
        self._resampler = None
        if MIN_RATE <= native <= MAX_RATE:
            self.sample_rate = native
        else:  # outside what the daemon accepts: resample here
            import soxr

            self.sample_rate = FALLBACK_RATE
            self._resampler = soxr.ResampleStream(native, FALLBACK_RATE, 1, dtype="float32")

    async def chunks(self, stop: asyncio.Event) -> AsyncIterator[bytes]:
        native_block = max(1, round(self._file.samplerate * CHUNK_S))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent_s = 0.0
        with self._file:
            while not stop.is_set():
                block = self._file.read(native_block, dtype="float32", always_2d=True)
                last = len(block) < native_block
                mono = block.mean(axis=1)
                if self._resampler is not None:
                    mono = self._resampler.resample_chunk(mono, last=last)
                if len(mono):
                    yield to_s16le(mono)
                sent_s += len(block) / self._file.samplerate
                if last:
                    return
                if self.speed > 0:  # pace against the clock, so sleeps never drift
                    if await _stopped_within(stop, t0 + sent_s / self.speed - loop.time()):
                        return
                else:
                    await asyncio.sleep(0)  # let the receiver run


class MicSource:
    """Microphone capture through sounddevice (PortAudio), int16 mono.

    PortAudio calls back on its own thread; frames cross to the event loop with
    call_soon_threadsafe into a bounded queue. Overflow policy: drop the oldest frame
    (live audio is worth more than stale audio) and count the drops.
    """

    def __init__(self, device: int | str | None) -> None:
        import sounddevice

        self._sd = sounddevice
        self.device = device
        try:
            sounddevice.check_input_settings(
                device=device, samplerate=FALLBACK_RATE, channels=1, dtype="int16"
            )
            self.sample_rate = FALLBACK_RATE
        except Exception:  # PortAudio says no to 16 kHz: use the device's own rate
            try:
                info = sounddevice.query_devices(device, "input")
            except (ValueError, sounddevice.PortAudioError) as exc:
                raise ClientError(f"no usable microphone {device!r}: {exc}", EXIT_USAGE) from exc
            self.sample_rate = int(info["default_samplerate"])
        self.dropped = 0

    async def chunks(self, stop: asyncio.Event) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(MIC_QUEUE_FRAMES)

        def put(data: bytes) -> None:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
                if self.dropped in (1, 10) or self.dropped % 100 == 0:
                    print(f"streamd-stream: dropped {self.dropped} mic frames", file=sys.stderr)
            queue.put_nowait(data)

        def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
            loop.call_soon_threadsafe(put, bytes(indata))

        try:
            stream = self._sd.RawInputStream(
                device=self.device,
                samplerate=self.sample_rate,
                channels=1,
                dtype="int16",
                blocksize=round(self.sample_rate * CHUNK_S),
                callback=callback,
            )
        except Exception as exc:
            raise ClientError(f"cannot open microphone: {exc}", EXIT_USAGE) from exc
        with stream:
            stop_wait = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    get = asyncio.ensure_future(queue.get())
                    await asyncio.wait({get, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if not get.done():
                        get.cancel()
                        return
                    yield get.result()
            finally:
                stop_wait.cancel()


# --- output -----------------------------------------------------------------------


class Console:
    """Turns daemon events into terminal output (no I/O decisions beyond writing)."""

    def __init__(self, out: TextIO, err: TextIO, as_json: bool, live: bool) -> None:
        self.out, self.err, self.as_json = out, err, as_json
        self.line = LiveLine(out) if live and not as_json else None

    def event(self, event: dict[str, Any], raw: str) -> None:
        kind = event.get("type")
        if self.as_json:
            # Unchanged: the daemon's own text, unless it spans lines (JSON lines need one).
            self.out.write((raw if "\n" not in raw else json.dumps(event)) + "\n")
            self.out.flush()
        elif kind == "partial" and self.line is not None:
            self.line.show(f"{format_span(event)} {event.get('text', '')}")
        elif kind == "final":
            self._clear()
            self.out.write(f"{format_span(event)} {event.get('text', '').strip()}\n")
            self.out.flush()
        if kind == "error":
            self._clear()
            code, message = event.get("code", "?"), event.get("message", "")
            self.message(f"daemon error ({code}): {message}")

    def message(self, text: str) -> None:
        self._clear()
        print(f"streamd-stream: {text}", file=self.err, flush=True)

    def _clear(self) -> None:
        if self.line is not None:
            self.line.clear()


# --- session ----------------------------------------------------------------------


def _refusal(exc: Exception, url: str) -> ClientError:
    """Translate a failed connect into a message and exit status."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        body = (exc.response.body or b"").decode("utf-8", "replace").strip()[:200]
        why = {
            401: "missing or wrong token (use --token or STREAMD_TOKEN)",
            403: "forbidden",
            503: "the daemon is busy or shutting down; try again later",
        }.get(status, "unexpected HTTP status")
        detail = f": {body}" if body else ""
        return ClientError(f"daemon refused the stream, HTTP {status}, {why}{detail}", EXIT_REFUSED)
    if isinstance(exc, InvalidURI):
        return ClientError(f"bad --url {url!r}: {exc}", EXIT_USAGE)
    if isinstance(exc, InvalidHandshake):
        return ClientError(f"not a streamd endpoint at {url}: {exc}", EXIT_UNREACHABLE)
    return ClientError(f"cannot reach the daemon at {url}: {exc}", EXIT_UNREACHABLE)


def _retryable(exc: Exception) -> bool:
    """A failed reconnect worth another try: nothing listening, a timeout, a proxy or
    daemon that says 'busy / try later' (502, 503, 504). Not a 401 or a bad URL."""
    from websockets.exceptions import InvalidStatus, InvalidURI

    if isinstance(exc, InvalidStatus):
        return exc.response.status_code in (502, 503, 504)
    return not isinstance(exc, InvalidURI)


# Close codes after which the session is resumed on a new connection: the daemon went
# away (1001 shutdown, 1012 restart, 1013 try again later, 1014 bad gateway) or the
# connection broke without a close frame (1006, None). Not after 1008/1009/1011: the
# daemon refused what we sent, and would again.
RESUMABLE_CLOSE = frozenset({None, 1001, 1006, 1012, 1013, 1014})


@dataclass
class Resume:
    """What a client keeps to continue its session on a new connection (no I/O).

    `add` every chunk of audio as it is produced; `event` every event received. The
    audio since the `end` of the last `final` received is kept (at most `limit_s`
    seconds; older audio is dropped and counted in `dropped_s`): after a broken
    connection, `start_resume()` says where the session goes on and `audio_from(i)`
    re-sends that audio. Positions are sample frames of the source (mono s16le).
    """

    rate: int
    limit_s: float = 600.0
    session: str | None = None
    next_segment: int = 0  # the segment number after the last final received
    kept_start: int = 0  # sample index of kept[0] in the stream
    total: int = 0  # samples produced so far
    dropped_s: float = 0.0
    kept: bytearray = field(default_factory=bytearray)

    def add(self, chunk: bytes) -> None:
        self.kept += chunk
        self.total += len(chunk) // 2
        over = len(self.kept) // 2 - round(self.limit_s * self.rate)
        if over > 0:  # a segment longer than the limit: give up re-sending its start
            self._trim(self.kept_start + over)
            self.dropped_s += over / self.rate

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "ready" and isinstance(event.get("session"), str):
            self.session = event["session"]
        elif kind == "final" and isinstance(event.get("segment"), int):
            self.next_segment = max(self.next_segment, event["segment"] + 1)
            with contextlib.suppress(TypeError, ValueError):
                self._trim(round(float(event["end"]) * self.rate))
        elif kind == "done" and isinstance(event.get("segments"), int):
            self.next_segment = max(self.next_segment, event["segments"])

    def _trim(self, sample: int) -> None:
        sample = min(sample, self.total)
        if sample > self.kept_start:
            del self.kept[: 2 * (sample - self.kept_start)]
            self.kept_start = sample

    def start_resume(self) -> dict[str, Any] | None:
        """The `resume` field of the next `start`; None before the first `ready` (then
        the session starts afresh, with all the kept audio)."""
        if self.session is None:
            return None
        return {"session": self.session, "offset": round(self.kept_start / self.rate, 6),
                "segment": self.next_segment}

    def audio_from(self, sample: int, max_samples: int) -> bytes:
        """Kept audio from stream sample `sample` (at least `kept_start`), at most
        `max_samples` of it."""
        i = 2 * (max(sample, self.kept_start) - self.kept_start)
        return bytes(self.kept[i : i + 2 * max_samples])


class _Outcome:
    """How one connection ended."""

    FINISHED = "finished"  # `done` after our `stop`, or the daemon refused (error event)
    BROKEN = "broken"  # resumable: see RESUMABLE_CLOSE
    CLOSED = "closed"  # closed without `done` in a way that resuming would not mend

    def __init__(self, kind: str, errors: int, why: str) -> None:
        self.kind, self.errors, self.why = kind, errors, why


async def stream(
    url: str,
    source: FileSource | MicSource,
    console: Console,
    *,
    token: str | None = None,
    start_fields: dict[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    resume_s: float = 60.0,
) -> int:
    """Run one session: send `start`, the audio and `stop`; print events until `done`.

    When the connection breaks (the daemon died or shut down; see `RESUMABLE_CLOSE`),
    reconnect to `url` with back-off for up to `resume_s` seconds, continue the session
    with `start.resume` and re-send the audio since the last final (0: never resume).
    Setting `stop` (Ctrl+C) ends the audio early; the session still waits for finals.
    Returns the exit status; raises ClientError for refusals and lost connections.
    """
    stop = stop or asyncio.Event()
    state = Resume(source.sample_rate)
    produced = asyncio.Event()  # set whenever `state` has new audio or the source ended
    ended = False

    async def produce() -> None:
        nonlocal ended
        try:
            async for chunk in source.chunks(stop):
                state.add(chunk)
                produced.set()
        finally:
            ended = True
            produced.set()

    def source_ended() -> bool:
        return ended

    producer = asyncio.create_task(produce())
    errors = 0
    try:
        outcome = await _connection(url, state, console, token, start_fields or {},
                                    produced, source_ended, resume=None)
        while True:
            errors += outcome.errors
            if outcome.kind == _Outcome.FINISHED:
                break
            if resume_s <= 0 or outcome.kind != _Outcome.BROKEN:
                raise ClientError(outcome.why, EXIT_UNREACHABLE)
            outcome = await _reconnect(url, state, console, token, start_fields or {},
                                       produced, source_ended, outcome.why, resume_s)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
    if state.dropped_s:
        console.message(f"{state.dropped_s:.1f} s of audio could not be kept for resuming")
    return EXIT_REFUSED if errors else EXIT_OK


async def _reconnect(url: str, state: Resume, console: Console, token: str | None,
                     start_fields: dict[str, Any], produced: asyncio.Event,
                     source_ended: Callable[[], bool], why: str, resume_s: float) -> _Outcome:
    """Back-off (0.1 s doubling to 2 s, jittered) until a connection takes the session
    again, for up to `resume_s` seconds; the outcome of that connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + resume_s
    delay = 0.1
    resume = state.start_resume()
    where = (f"resuming session {resume['session']} at {resume['offset']:.2f} s"
             if resume else "starting again")
    console.message(f"{why}; {where}")
    while True:
        try:
            return await _connection(url, state, console, token, start_fields, produced,
                                     source_ended, resume=state.start_resume())
        except ClientError as exc:
            cause = exc.__cause__
            if cause is not None and not _retryable(cause) and not isinstance(
                    exc, _RefusedResume):
                raise
            left = deadline - loop.time()
            if left <= 0:
                raise ClientError(f"could not resume within {resume_s:g} s: {exc}",
                                  EXIT_UNREACHABLE) from exc
        # The last wait ends at the deadline, so the window is tried to its end.
        await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), left))
        delay = min(2.0, delay * 2)


class _RefusedResume(ClientError):
    """The daemon answered a resuming `start` with an error (e.g. the session is still
    open on a node that has not noticed the broken connection yet): try again."""


async def _connection(url: str, state: Resume, console: Console, token: str | None,
                      start_fields: dict[str, Any], produced: asyncio.Event,
                      source_ended: Callable[[], bool], *,
                      resume: dict[str, Any] | None) -> _Outcome:
    """One WebSocket connection of the session: `start` (with `resume` when given), the
    audio from where the session goes on, `stop` once the source ended; events until
    `done` or a broken connection."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, WebSocketException

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        ws = await connect(url, additional_headers=headers, open_timeout=10)
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise _refusal(exc, url) from exc

    start = {"type": "start", "sample_rate": state.rate, "encoding": "pcm_s16le",
             "channels": 1, **start_fields}
    if resume is not None:
        start["resume"] = resume
        start["session"] = resume["session"]
    stop_sent = False

    async def send_audio() -> None:
        # Audio goes out as soon as `start` is sent; websockets' flow control makes
        # `send` wait while the daemon is behind, so nothing piles up here. Kept audio
        # (after a resume) goes out in CHUNK_S messages as fast as the daemon takes it.
        nonlocal stop_sent
        cursor = state.kept_start
        step = max(1, round(state.rate * CHUNK_S))
        with contextlib.suppress(ConnectionClosed):
            while True:
                produced.clear()
                chunk = state.audio_from(cursor, step)
                if chunk:
                    cursor = max(cursor, state.kept_start) + len(chunk) // 2
                    await ws.send(chunk)
                elif source_ended():
                    break
                else:
                    await produced.wait()
            stop_sent = True
            await ws.send(json.dumps({"type": "stop"}))

    errors = 0
    done = False
    ready = False
    async with ws:
        await ws.send(json.dumps(start))
        sender = asyncio.create_task(send_audio())
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue  # the protocol sends no binary; ignore rather than fail
                try:
                    event = json.loads(raw)
                except ValueError:
                    console.message(f"ignoring a message that is not JSON: {raw[:80]!r}")
                    continue
                if not isinstance(event, dict):
                    continue
                kind = event.get("type")
                if resume is not None and not ready and kind == "error":
                    raise _RefusedResume(f"resume refused ({event.get('code')}): "
                                         f"{event.get('message', '')}", EXIT_UNREACHABLE)
                ready = ready or kind == "ready"
                state.event(event)
                console.event(event, raw)
                if kind == "error":
                    errors += 1
                elif kind == "done":
                    done = True
                    break
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    if done and (stop_sent or errors):
        return _Outcome(_Outcome.FINISHED, errors, "done")
    code = ws.close_code
    reason = f" ({ws.close_reason})" if ws.close_reason else ""
    if done:  # the daemon ended the session before our `stop`: it is shutting down
        return _Outcome(_Outcome.BROKEN, errors,
                        f"the daemon ended the session early (close code {code}{reason})")
    why = f"connection closed before the daemon finished (close code {code}{reason})"
    if errors or code not in RESUMABLE_CLOSE:
        return _Outcome(_Outcome.FINISHED if errors else _Outcome.CLOSED, errors, why)
    return _Outcome(_Outcome.BROKEN, errors, why)


# --- command line -----------------------------------------------------------------


def _parse_device(value: str | None) -> int | str | None:
    if value is None or value == "":
        return None
    return int(value) if value.isdigit() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamd-stream",
        description="Stream a sound file or the microphone to streamd and print transcripts.",
        epilog="Audio: files are mixed down to mono and sent as 16-bit PCM at their own "
        "rate when it is 8-48 kHz (the daemon resamples); other rates are resampled to "
        "16 kHz here (soxr). Finals print as '[m:ss.cc - m:ss.cc] text'; Ctrl+C stops and "
        "waits for the last finals. Exit status: 0 done, 1 refused or daemon error, "
        "2 usage or input error, 3 daemon unreachable or connection lost, "
        "130 interrupted twice.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", type=Path, help="sound file (WAV, FLAC, ...)")
    what.add_argument(
        "--mic", nargs="?", const="", metavar="DEVICE",
        help="stream the microphone (PortAudio device index or name; default device)",
    )
    what.add_argument("--list-devices", action="store_true", help="list microphones and exit")
    parser.add_argument("--url", default=os.environ.get("STREAMD_URL", DEFAULT_URL),
                        help=f"daemon endpoint (default: $STREAMD_URL or {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("STREAMD_TOKEN"),
                        help="bearer token (default: $STREAMD_TOKEN)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="file pace, times real time; 0 sends as fast as possible")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's events as JSON lines, unchanged")
    parser.add_argument("--resume-s", type=float, default=60.0, metavar="SECONDS",
                        help="when the connection breaks, reconnect and resume the session "
                        "for up to this long (default 60; 0: exit at once)")
    parser.add_argument("--session", help="session id to ask for")
    parser.add_argument("--pipeline", help="pipeline name to ask for (e.g. whisper)")
    parser.add_argument("--no-partials", action="store_true", help="ask for finals only")
    return parser


async def _main_async(args: argparse.Namespace, console: Console) -> int:
    if args.file is not None:
        source: FileSource | MicSource = FileSource(args.file, args.speed)
    else:
        source = MicSource(_parse_device(args.mic))
    fields: dict[str, Any] = {}
    if args.session:
        fields["session"] = args.session
    if args.pipeline:
        fields["pipeline"] = args.pipeline
    if args.no_partials:
        fields["partials"] = False

    stop = asyncio.Event()
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        if not stop.is_set():
            console.message("stopping; waiting for the last finals (Ctrl+C again to quit)")
            stop.set()
        elif main_task is not None:
            main_task.cancel()

    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await stream(args.url, source, console, token=args.token,
                            start_fields=fields, stop=stop, resume_s=args.resume_s)
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_devices:
        import sounddevice

        print(sounddevice.query_devices())
        return EXIT_OK
    if args.speed < 0:
        build_parser().error("--speed must be >= 0")
    console = Console(sys.stdout, sys.stderr, args.json, live=sys.stdout.isatty())
    try:
        return asyncio.run(_main_async(args, console))
    except ClientError as exc:
        console.message(str(exc))
        return exc.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
