"""Microphone source: PortAudio capture (sounddevice) handed to the event loop.

Threading and overflow policy (style point 8): PortAudio calls `_callback` on its own
thread; the callback only copies the block and schedules it on the event loop with
`loop.call_soon_threadsafe`, so it never blocks. On the loop each block is mixed down to
mono float32, resampled when the device could not open at the asked rate, and put in a
bounded asyncio queue; when the consumer falls behind and the queue is full, the block
is dropped, counted in `dropped_blocks` and logged.

Consume with `async for samples, rate in mic`, `await mic.read()`, or give `on_frames`
(called on the loop with each block) as the daemon does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from streamd.errors import StreamdError

log = logging.getLogger("streamd.mic")


class MicError(StreamdError):
    """PortAudio or the capture device is missing or failed."""

    code = "unsupported"


def _sounddevice() -> Any:
    """The sounddevice module; MicError naming what is missing if it cannot load.

    Importing sounddevice loads the PortAudio library (OSError when it is not there) and
    initializes it (sounddevice.PortAudioError when that fails, e.g. no sound system).
    """
    try:
        import sounddevice
    except OSError as exc:  # sounddevice's "PortAudio library not found"
        raise MicError(f"PortAudio not found: install libportaudio2 ({exc})") from exc
    except ImportError as exc:
        raise MicError(f"the PortAudio bindings are not installed (pip install sounddevice): "
                       f"{exc}") from exc
    except Exception as exc:  # noqa: BLE001 - PortAudioError: its class did not load either
        raise MicError(f"cannot initialize PortAudio: {exc}") from exc
    return sounddevice


def list_input_devices() -> list[dict]:
    """Capture devices: `index`, `name`, `channels`, `default_samplerate`, `hostapi`,
    `default` (the system default input)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        apis = sd.query_hostapis()
        default_in = sd.default.device[0]
    except sd.PortAudioError as exc:
        raise MicError(f"cannot list audio devices: {exc}") from exc
    return [
        {
            "index": int(dev["index"]),
            "name": str(dev["name"]),
            "channels": int(dev["max_input_channels"]),
            "default_samplerate": float(dev["default_samplerate"]),
            "hostapi": str(apis[dev["hostapi"]]["name"]),
            "default": int(dev["index"]) == default_in,
        }
        for dev in devices
        if dev["max_input_channels"] > 0
    ]


def _describe_devices() -> str:
    try:
        names = [f"{d['index']}: {d['name']}" for d in list_input_devices()]
    except MicError as exc:
        return f"(cannot list devices: {exc})"
    return ", ".join(names) if names else "none"


class MicSource:
    """One capture stream: mono float32 blocks of `block_ms` at `sample_rate`.

    `device`: index, name (or unique part of it, as sounddevice matches), a string of
    digits for an index, or None for the default input. `sample_rate`: the rate handed
    out; None takes the device's default. `queue_max`: blocks buffered for a slow
    consumer (50 x 20 ms = 1 s) before blocks are dropped. One capture per object.
    """

    def __init__(
        self,
        device: str | int | None = None,
        sample_rate: int | None = None,
        on_frames: Callable[[np.ndarray], None] | None = None,
        *,
        block_ms: int = 20,
        queue_max: int = 50,
        dtype: str = "float32",
    ) -> None:
        if dtype not in ("float32", "int16"):
            raise ValueError("dtype must be 'float32' or 'int16'")
        if isinstance(device, str):
            device = int(device) if device.strip().isdigit() else (device or None)
        self.device = device
        self.sample_rate = sample_rate
        self.on_frames = on_frames
        self.block_ms = block_ms
        self.queue_max = queue_max
        self.dtype = dtype
        self.dropped_blocks = 0  # consumer too slow (queue full)
        self.overflows = 0  # PortAudio reported lost input (callback came too late)
        self.device_info: dict[str, Any] = {}
        self.device_rate = 0
        self.channels = 0
        self._stream: Any = None
        self._resampler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # One spare slot so the end-of-stream marker always fits.
        self._queue: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue(
            queue_max + 1)
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Open and start the stream (a few ms; PortAudio opens devices synchronously)."""
        if self._stream is not None:
            raise RuntimeError("MicSource already started")
        self._loop = asyncio.get_running_loop()
        sd = _sounddevice()
        try:
            info = sd.query_devices(self.device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            raise MicError(f"no input device {self.device!r} ({exc}); available input "
                           f"devices: {_describe_devices()}") from exc
        self.device_info = dict(info)
        index = int(info["index"])
        want = self.sample_rate or int(info["default_samplerate"])
        rate, channels = self._choose_settings(sd, index, want, int(info["max_input_channels"]))
        if rate != want:
            import soxr

            log.info("mic %r cannot run at %d Hz; capturing at %d Hz and resampling",
                     info["name"], want, rate)
            self._resampler = soxr.ResampleStream(rate, want, 1, dtype="float32")
        self.sample_rate, self.device_rate, self.channels = want, rate, channels
        try:
            self._stream = sd.InputStream(
                device=index, samplerate=rate, channels=channels, dtype=self.dtype,
                blocksize=max(1, rate * self.block_ms // 1000),
                callback=self._callback, finished_callback=self._finished)
            self._stream.start()
        except sd.PortAudioError as exc:
            self._stream = None
            raise MicError(f"cannot open input device {info['name']!r} at {rate} Hz, "
                           f"{channels} ch: {exc}; available input devices: "
                           f"{_describe_devices()}") from exc
        log.info("mic %r started: %d Hz, %d ch, %d ms blocks", info["name"], rate, channels,
                 self.block_ms)
        if self.on_frames is not None:
            self._pump = asyncio.create_task(self._run_pump(), name="mic-pump")

    @staticmethod
    def _choose_settings(sd: Any, index: int, rate: int, max_channels: int) -> tuple[int, int]:
        """Mono at the asked rate if the device allows, else its channels / default rate."""
        default_rate = int(sd.query_devices(index)["default_samplerate"])
        for try_rate in dict.fromkeys([rate, default_rate]):
            for channels in dict.fromkeys([1, max_channels]):
                try:
                    sd.check_input_settings(device=index, channels=channels,
                                            samplerate=try_rate)
                    return try_rate, channels
                except (ValueError, sd.PortAudioError):
                    continue
        return rate, 1  # let InputStream report the real error

    async def stop(self) -> None:
        """Stop capture; readers get the blocks still queued, then the end of stream."""
        if self._stopping:
            return
        self._stopping = True
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                # Pa_StopStream waits for the callback thread; keep the loop free.
                await asyncio.to_thread(stream.stop)
                await asyncio.to_thread(stream.close)
            except Exception as exc:  # noqa: BLE001 - stopping must not fail the shutdown
                log.warning("mic stream did not close cleanly: %r", exc)
        # Blocks scheduled by the callback before it stopped are already on the loop's
        # queue of callbacks; let them land before the end marker.
        await asyncio.sleep(0)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros((0, 1), np.float32), last=True)
            if len(tail):
                self._put(tail[:, 0].astype(np.float32))
        self._put_marker(None)
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    # --- PortAudio thread --------------------------------------------------------------
    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status and status.input_overflow:
            self.overflows += 1
        loop = self._loop
        if loop is None:
            return
        # `indata` is PortAudio's buffer, reused after we return: copy it.
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._on_block, indata.copy())

    def _finished(self) -> None:
        loop = self._loop
        if loop is not None and not self._stopping:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_lost)

    # --- event loop --------------------------------------------------------------------
    def _on_lost(self) -> None:
        if not self._stopping:
            log.error("mic stream ended unexpectedly (device gone?)")
            self._put_marker(MicError("the input device stopped delivering audio"))

    def _put_marker(self, item: BaseException | None) -> None:
        """End or error markers always get in: the oldest block makes room if needed."""
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped_blocks += 1
        self._queue.put_nowait(item)

    def _on_block(self, block: np.ndarray) -> None:
        if block.dtype == np.int16:
            mono = block.mean(axis=1, dtype=np.float32) / 32768.0
        else:
            mono = block.mean(axis=1, dtype=np.float32)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono[:, None])[:, 0]
        self._put(mono.astype(np.float32, copy=False))

    def _put(self, samples: np.ndarray) -> None:
        if self._queue.qsize() >= self.queue_max:
            self.dropped_blocks += 1
            level = logging.WARNING if self.dropped_blocks == 1 else logging.DEBUG
            log.log(level, "mic queue full: dropped a %d-sample block (%d dropped so far)",
                    len(samples), self.dropped_blocks)
            return
        self._queue.put_nowait(samples)

    async def read(self) -> tuple[np.ndarray, int] | None:
        """The next `(samples [n] float32 mono, sample_rate)`, or None at the end.

        Raises MicError if the device stopped delivering audio.
        """
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # later reads see the end too
            return None
        if isinstance(item, BaseException):
            raise item
        assert self.sample_rate is not None
        return item, self.sample_rate

    async def __aiter__(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        while (block := await self.read()) is not None:
            yield block

    async def _run_pump(self) -> None:
        assert self.on_frames is not None
        try:
            async for samples, _ in self:
                self.on_frames(samples)
        except MicError as exc:
            log.error("microphone stopped: %s", exc)
        except Exception:  # noqa: BLE001 - a consumer bug must be seen, not lost in a task
            log.exception("mic consumer failed; capture continues without it")
