"""The one log format of every stream-swav process: the command line, Ray actors, pipelines."""
from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure(level: int = logging.INFO) -> None:
    """Log to stderr in LOG_FORMAT at `level` (a no-op where logging is already configured)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
