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
import signal
import sys
from collections.abc import AsyncIterator
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


async def stream(
    url: str,
    source: FileSource | MicSource,
    console: Console,
    *,
    token: str | None = None,
    start_fields: dict[str, Any] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run one session: send `start`, the audio and `stop`; print events until `done`.

    Setting `stop` (Ctrl+C) ends the audio early; the session still waits for finals.
    Returns the exit status; raises ClientError for refusals and lost connections.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, WebSocketException

    stop = stop or asyncio.Event()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        ws = await connect(url, additional_headers=headers, open_timeout=10)
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise _refusal(exc, url) from exc

    start = {
        "type": "start",
        "sample_rate": source.sample_rate,
        "encoding": "pcm_s16le",
        "channels": 1,
        **(start_fields or {}),
    }

    async def send_audio() -> None:
        # Audio goes out as soon as `start` is sent; websockets' flow control makes
        # `send` wait while the daemon is behind, so nothing piles up here.
        with contextlib.suppress(ConnectionClosed):
            async for chunk in source.chunks(stop):
                await ws.send(chunk)
            await ws.send(json.dumps({"type": "stop"}))

    errors = 0
    done = False
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
                console.event(event, raw)
                if event.get("type") == "error":
                    errors += 1
                elif event.get("type") == "done":
                    done = True
                    break
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    if errors:
        return EXIT_REFUSED
    if not done:
        code = ws.close_code
        reason = f" ({ws.close_reason})" if ws.close_reason else ""
        raise ClientError(
            f"connection closed before the daemon finished (close code {code}{reason})",
            EXIT_UNREACHABLE,
        )
    return EXIT_OK


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
                            start_fields=fields, stop=stop)
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
