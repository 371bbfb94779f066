"""Which Pillow build decodes our images.

Pillow-SIMD installs the same ``PIL`` package under another distribution name,
so only the package metadata tells the two apart. Decode throughput differs a
lot between them, which is why workers log the flavour once at start-up.
"""
from __future__ import annotations

import importlib.metadata
import logging

import PIL

_DISTRIBUTIONS = (("Pillow-SIMD", "Pillow-SIMD"), ("pillow", "Pillow"))
_logged = False


def pillow_flavour() -> str:
    """``"Pillow-SIMD 9.5.0.post2"`` or ``"Pillow 13.0.0"``: the build behind ``import PIL``."""
    for distribution, label in _DISTRIBUTIONS:
        try:
            return f"{label} {importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    # PIL imported from a source tree or a vendored copy, without package metadata.
    return f"Pillow {PIL.__version__}"


def log_pillow_flavour(logger: logging.Logger) -> None:
    """Log the Pillow flavour at INFO, the first time it is called in this process."""
    global _logged
    if _logged:
        return
    _logged = True
    logger.info("image decoding with %s", pillow_flavour())


__all__ = ["pillow_flavour", "log_pillow_flavour"]
