"""One progress line on stderr, shared by the long jobs (convert, learning a prior).

On a terminal the line is redrawn in place (at most every REDRAW_SECONDS); otherwise (a log file, a pipe)
a plain line is printed every LOG_SECONDS, so logs get no carriage returns."""
from __future__ import annotations

import shutil
import sys
import time

REDRAW_SECONDS = 0.5
LOG_SECONDS = 10.0


class ProgressLine:
    """`show(text)` draws the line (rate-limited unless force=True), `write(line)` prints a message above it,
    `close()` ends it. `enabled=False` draws nothing but still prints messages."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_shown = float("-inf")
        self.shown = False
        self.text = ""

    def due(self) -> bool:
        """Whether a show() now would draw (callers skip building the text otherwise)."""
        interval = REDRAW_SECONDS if self.terminal else LOG_SECONDS
        return self.enabled and time.perf_counter() - self.last_shown >= interval

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled or not (force or self.due()):
            return
        self.last_shown = time.perf_counter()
        self.text = text
        if self.terminal:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\033[K" + text[:width])
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, line: str) -> None:
        if self.terminal and self.shown:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()
        if self.terminal and self.shown:
            self.show(self.text, force=True)

    def close(self) -> None:
        if self.enabled and self.terminal and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False


def duration(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
