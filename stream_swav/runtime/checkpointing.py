"""When the runtime saves: the checkpoint schedule. The format itself is `stream_swav.checkpoint`."""
from __future__ import annotations


class CheckpointPolicy:
    """When to save: at every multiple of `every_steps` and when `every_seconds`
    have passed since the last save (0 disables either trigger).

    Pure: the caller supplies the time. The time trigger counts from the first
    call to `due` or `mark`, so construction needs no clock.
    """

    def __init__(self, every_steps: int, every_seconds: float, last_step: int = 0) -> None:
        if every_steps < 0 or every_seconds < 0:
            raise ValueError(f"every_steps and every_seconds must be >= 0, got {every_steps}, {every_seconds}")
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.last_step = last_step
        self.last_time: float | None = None

    def due(self, step: int, now: float) -> bool:
        if self.last_time is None:
            self.last_time = now
        if step <= self.last_step:
            return False
        if self.every_steps > 0 and step // self.every_steps > self.last_step // self.every_steps:
            return True
        return self.every_seconds > 0 and now - self.last_time >= self.every_seconds

    def mark(self, step: int, now: float) -> None:
        self.last_step = step
        self.last_time = now
