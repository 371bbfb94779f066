"""One progress line for every long-running command (train, make-shards, demo).

On a terminal it redraws itself in place on stderr; elsewhere (logs, CI, Ray
job logs) it stays silent unless asked, and callers log `describe()` at their
own pace instead, so log files never fill with carriage returns.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


class ProgressLine:
    """Progress towards a count `total` and/or a time budget of `seconds` (whichever ends first)."""

    def __init__(self, total: int | None = None, seconds: float | None = None, unit: str = "items",
                 start: int = 0, enabled: bool = True, stream: TextIO | None = None,
                 min_interval_s: float = 0.2) -> None:
        self.total = total
        self.seconds = seconds
        self.unit = unit
        self.start_count = start
        self.stream = stream or sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self.min_interval_s = min_interval_s
        self._drawn = 0.0
        self._shown = False

    def restart(self, start: int) -> None:
        """Count time and rate from now, from `start` done (after a resume or a slow start-up)."""
        self.started = time.monotonic()
        self.start_count = start

    def fraction(self, done: int) -> float | None:
        """Share of the way done (the furthest of count and time), or None without any budget."""
        parts = []
        if self.total:
            parts.append(done / self.total)
        if self.seconds:
            parts.append((time.monotonic() - self.started) / self.seconds)
        return min(max(parts), 1.0) if parts else None

    def describe(self, done: int, extra: str = "") -> str:
        """``"41.5% | 8,296/20,000 images | 290 images/s | ETA 42s"`` (parts that are known)."""
        elapsed = time.monotonic() - self.started
        rate = (done - self.start_count) / elapsed if elapsed > 0 else 0.0
        fraction = self.fraction(done)
        parts = []
        if fraction is not None:
            parts.append(f"{100 * fraction:5.1f}%")
        parts.append(f"{done:,}/{self.total:,} {self.unit}" if self.total else f"{done:,} {self.unit}")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        if fraction:
            parts.append(f"ETA {_duration(elapsed / fraction - elapsed)}")
        if extra:
            parts.append(extra)
        return " | ".join(parts)

    def update(self, done: int, extra: str = "", final: bool = False) -> None:
        """Redraw the line on a terminal, at most every `min_interval_s`."""
        now = time.monotonic()
        if not self.interactive or (not final and now - self._drawn < self.min_interval_s):
            return
        self._drawn = now
        fraction = self.fraction(done)
        bar = "" if fraction is None else "[" + "#" * int(30 * fraction) + "." * (30 - int(30 * fraction)) + "] "
        self.stream.write(f"\r{bar}{self.describe(done, extra)}\x1b[K" + ("\n" if final else ""))
        self.stream.flush()
        self._shown = not final

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


__all__ = ["ProgressLine"]
