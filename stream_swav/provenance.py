"""Which code is running: the installed version, and the git commit of a source checkout.

A checkpoint records it (`save_checkpoint`), so that a downstream job, or a study's result row,
can say which code trained the weights it reads.
"""
from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any

# Git answers in milliseconds; a hung one (a stale lock on a network home) must not hold a save.
_GIT_TIMEOUT_S = 5.0


def package_version() -> str:
    try:
        return importlib.metadata.version("stream-swav")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def _git(source: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_provenance() -> dict[str, Any]:
    """{"version", "revision", "modified"}: the package version; the commit of the checkout the
    package is imported from and whether its tracked files differ from it, both None where it is
    not imported from one (an installed wheel, a Ray job's uploaded working directory)."""
    return provenance_of(Path(__file__).resolve().parent.parent)


def provenance_of(source: Path) -> dict[str, Any]:
    """`code_provenance` of the code in the folder `source` (a checkout's top, or not)."""
    source = source.resolve()
    top = _git(source, "rev-parse", "--show-toplevel")
    # Only the package's own checkout: a wheel unpacked inside some other repository is not it.
    if top is None or Path(top).resolve() != source:
        return {"version": package_version(), "revision": None, "modified": None}
    revision = _git(source, "rev-parse", "HEAD")
    changes = _git(source, "status", "--porcelain", "--untracked-files=no")
    return {"version": package_version(), "revision": revision,
            "modified": None if revision is None or changes is None else bool(changes)}
