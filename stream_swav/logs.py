"""The one log format of every stream-swav process: the command line, Ray actors, pipelines."""
from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def error_line(error: BaseException, *, with_type: bool = False) -> str:
    """An error in one line for a log or a refusal: its message's first line, or its type's name where
    the message is empty (a timeout's often is); `with_type` puts the type's name in front."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if with_type else lines[0]


def configure(level: int = logging.INFO) -> None:
    """Log to stderr in LOG_FORMAT at `level` (a no-op where logging is already configured)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
