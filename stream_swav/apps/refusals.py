"""How the commands besides train refuse what their input caused, in one line with exit 2."""
from __future__ import annotations

import sys

from stream_swav import storage
from stream_swav.config import StorageConfig


def refused(command: str, error: Exception, option: str, url: str, storage_cfg: StorageConfig,
            plain: tuple[type[Exception], ...], not_storage: tuple[type[Exception], ...] = ()) -> int:
    """Exit status 2 for an error the input caused: a storage failure the user can fix (unless of
    the `not_storage` kinds, which name another input than `option`) raised as the UsageError
    naming `option`; an error of the `plain` kinds printed as `command: error`. Anything else is
    raised again, a bug keeping its traceback."""
    if not isinstance(error, not_storage):
        usage = storage.usage_error(error, option, url, storage_cfg)
        if usage is not None:
            raise usage from error
    if not isinstance(error, plain):
        raise error
    print(f"{command}: {error}", file=sys.stderr)
    return 2
