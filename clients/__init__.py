"""Command-line clients of the streamd wire contract (docs: design/protocol.md).

They speak only the public protocol (WebSocket `/v1/stream`, MQTT topics) and import
nothing from the daemon, so they work against any streamd of protocol version 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


def format_time(seconds: float) -> str:
    """`m:ss.cc`, rounded once to centiseconds so 59.999 s reads 1:00.00, not 0:60.00."""
    centis = round(max(0.0, float(seconds)) * 100)
    minutes, centis = divmod(centis, 6000)
    return f"{minutes}:{centis / 100:05.2f}"


def format_span(event: dict[str, Any]) -> str:
    """`[m:ss.cc - m:ss.cc]` from an event's `start` and `end` (stream seconds)."""
    return f"[{format_time(event.get('start', 0.0))} - {format_time(event.get('end', 0.0))}]"


class LiveLine:
    """One terminal line that is rewritten in place (the current partial).

    Only used when the stream is a TTY: a pipe would fill with carriage returns.
    """

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.shown = False

    def show(self, text: str) -> None:
        width = _terminal_width(self.out)
        # Keep the tail: the newest words are the interesting ones.
        if len(text) > width - 1:
            text = "…" + text[-(width - 2) :]
        self.out.write("\r\x1b[2K" + text)
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write("\r\x1b[2K")
            self.out.flush()
            self.shown = False


def _terminal_width(out: TextIO) -> int:
    try:
        return max(20, os.get_terminal_size(out.fileno()).columns)
    except (OSError, ValueError, AttributeError):
        return 80
