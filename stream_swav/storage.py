"""Filesystems for shards and checkpoints: local paths, file:// and s3://.

S3 options come from StorageConfig first, then the standard environment, so the
same code talks to AWS, MinIO, Ceph or R2:

- endpoint: ``storage.endpoint_url``, else FSSPEC_S3_ENDPOINT_URL, else
  AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (else AWS itself);
- credentials: botocore's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_SESSION_TOKEN, AWS_PROFILE, instance roles), or ``storage.anon``;
- retries and timeouts: botocore's ``standard`` retry mode with
  ``storage.retries`` retries after the first attempt, plus s3fs's own retry of
  interrupted body reads.

Secrets never reach a log line: `describe_storage` is the only thing meant to be
printed, and it redacts them.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
import uuid
from typing import Any, NoReturn

import aiohttp
import fsspec
from botocore.exceptions import BotoCoreError, ClientError
from fsspec.implementations.local import LocalFileSystem
from s3fs.utils import FileExpired

from stream_swav import logs
from stream_swav.config import StorageConfig, UsageError

ENDPOINT_ENV = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# Part of the cache key: a changed identity must not reuse a client made for the old one.
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_REGION", "AWS_DEFAULT_REGION")
_SECRET_WORDS = ("secret", "token", "password", "key")

# Errors worth retrying when reading: network trouble, throttling, a server that went away.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncio.TimeoutError, BotoCoreError, ClientError, aiohttp.ClientError)
# What s3fs makes of S3's "slow down", "unavailable" and internal errors (after its own retries).
_UNAVAILABLE_ERRNOS = (errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO))  # s3fs's fallback where it lacks


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` says the store did not answer (a timeout, a lost connection, throttling, a
    server error), not that what was asked for is missing, forbidden or bad: another try may
    succeed, so nothing should be concluded about the object."""
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, ConnectionError, aiohttp.ClientError, BotoCoreError)):
        return True
    return isinstance(error, OSError) and error.errno in _UNAVAILABLE_ERRNOS


# OSError subclasses that another attempt will not fix.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# The object was replaced while it was being read (s3fs reads each range only If-Match the ETag it
# opened): positions counted in the old content mean nothing in the new.
CHANGED_ERRORS: tuple[type[BaseException], ...] = (FileExpired,)


def content_identity(f: Any) -> str | None:
    """What names an open file's content: an S3 object's ETag; a local file's size and modification
    time (ns); None where neither is known. Equal identities, same bytes (an object overwritten with
    another gets another ETag; a local file rewritten or replaced, another mtime). The same on every
    machine, so that a checkpoint's stream cursor can carry it to whoever reads on: not a local
    file's device and inode, which differ between the hosts of one shared filesystem."""
    details = getattr(f, "details", None)
    if isinstance(details, dict) and details.get("ETag"):
        return str(details["ETag"])
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"

_cache: dict[tuple[Any, ...], fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


def split_protocol(url: str) -> tuple[str, str]:
    """``s3://b/k`` -> ("s3", "b/k"); ``file:///x`` and plain paths -> ("file", "/x" made absolute)."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        protocol = protocol.lower()
    else:
        protocol, rest = "file", url
    if protocol in ("s3", "s3a"):
        rest = rest.lstrip("/")
        if not rest or rest.startswith("/"):
            raise ValueError(f"{url!r}: an s3:// URL needs a bucket name")
        return "s3", rest
    if protocol == "file":
        return "file", LocalFileSystem._strip_protocol(os.path.abspath(os.path.expanduser(rest)))
    raise ValueError(f"{url!r}: unsupported scheme {protocol!r}; use a local path, file:// or s3://")


def join_protocol(protocol: str, path: str) -> str:
    """Inverse of `split_protocol`: s3 paths get their scheme back, local ones stay plain paths."""
    return f"s3://{path}" if protocol == "s3" else path


def resolve_endpoint(cfg: StorageConfig) -> str:
    if cfg.endpoint_url:
        return cfg.endpoint_url
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return ""


def s3_options(cfg: StorageConfig) -> dict[str, Any]:
    """Keyword arguments for s3fs.S3FileSystem built from the config and the environment."""
    client_kwargs: dict[str, Any] = {}
    if cfg.region:
        client_kwargs["region_name"] = cfg.region
    options: dict[str, Any] = {
        # Every listing here must be fresh, and s3fs's cache of listings keeps, after a recursive
        # listing (`find`), an entry per folder ever seen, never refreshed: in follow mode over
        # dated prefixes that grows for as long as the run.
        "use_listings_cache": False,
        "anon": cfg.anon,
        "client_kwargs": client_kwargs,
        "config_kwargs": {
            "retries": {"total_max_attempts": cfg.retries + 1, "mode": "standard"},
            "connect_timeout": cfg.connect_timeout_s,
            "read_timeout": cfg.read_timeout_s,
        },
    }
    endpoint = resolve_endpoint(cfg)
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def filesystem_for(url: str, cfg: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) filesystem serving `url`, and the path inside it."""
    protocol, path = split_protocol(url)
    if protocol == "file":
        options: dict[str, Any] = {}
        env: tuple[Any, ...] = ()
    else:
        options = s3_options(cfg)
        env = tuple(os.environ.get(name) for name in _CREDENTIAL_ENV)
    key = (protocol, os.getpid(), _freeze(options), env)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _make_filesystem(protocol, options, cfg)
            _cache[key] = fs
    return fs, path


def _make_filesystem(protocol: str, options: dict[str, Any], cfg: StorageConfig) -> fsspec.AbstractFileSystem:
    if protocol == "file":
        return LocalFileSystem()
    from s3fs import S3FileSystem

    fs = S3FileSystem(skip_instance_cache=True, **options)
    # s3fs retries interrupted body reads on its own; its count includes the first attempt.
    fs.retries = cfg.retries + 1
    return fs


def usage_error(error: BaseException, key: str, url: str, cfg: StorageConfig) -> UsageError | None:
    """A storage failure the user can fix, as one line naming the config key and what to do; None
    for anything else (a bug, a transient fault), which keeps its traceback."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, \
        PartialCredentialsError

    detail = logs.error_line(error)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return UsageError(f"{key}: no S3 credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          f"(or AWS_PROFILE, or give the machine an instance role), or storage.anon: true for a public "
                          f"bucket")
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError, aiohttp.ClientConnectionError)):
        endpoint = resolve_endpoint(cfg) or "AWS S3"
        return UsageError(f"{key}: cannot reach the S3 endpoint {endpoint} for {url}: check storage.endpoint_url "
                          f"(or AWS_ENDPOINT_URL) and that the endpoint is up and reachable from here")
    if isinstance(error, PermissionError):
        return UsageError(f"{key}: access to {url} is denied ({detail}); check the credentials and the "
                          f"permissions of the bucket or folder")
    if isinstance(error, FileNotFoundError):
        return UsageError(f"{key}: {url} does not exist ({detail})")
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        return UsageError(f"{key}: a part of the path {url} is a file, not a folder ({detail}); give a folder")
    if isinstance(error, (BotoCoreError, ClientError)):
        return UsageError(f"{key}: the object store refused or failed a request for {url} ({detail}); check the "
                          f"endpoint, the bucket and the credentials")
    return None


def raise_as_usage(error: BaseException, key: str, url: str, cfg: StorageConfig) -> NoReturn:
    """Raise `error` again: as `usage_error`'s one line where it is a storage failure the user can
    fix, else as it is (a bug keeps its traceback)."""
    usage = usage_error(error, key, url, cfg)
    if usage is None:
        raise error
    raise usage from error


def describe_storage(cfg: StorageConfig) -> dict[str, Any]:
    """What the S3 client will use, safe to log: secrets are redacted, their presence shown."""
    described: dict[str, Any] = {
        "endpoint_url": resolve_endpoint(cfg) or "(AWS default)",
        "region": cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "(default)",
        "anon": cfg.anon,
        "retries": cfg.retries,
        "connect_timeout_s": cfg.connect_timeout_s,
        "read_timeout_s": cfg.read_timeout_s,
    }
    for name in _CREDENTIAL_ENV:
        value = os.environ.get(name)
        if value is None or name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            continue
        secret = any(word in name.lower() for word in _SECRET_WORDS)
        described[name] = "***" if secret else value
    return described


def join_url(base: str, *parts: str) -> str:
    """`parts` under a folder or an s3:// prefix: ``join_url("s3://b/ckpt/", "latest.json")``."""
    return "/".join([str(base).rstrip("/"), *parts])


def is_special_file(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a local `path` is there but no regular file (a FIFO, a device): opening one blocks,
    or reads forever (/dev/zero), where a file was expected. Object stores have none."""
    return isinstance(fs, LocalFileSystem) and os.path.exists(path) and not os.path.isfile(path)


def read_bytes(url: str, cfg: StorageConfig) -> bytes:
    fs, path = filesystem_for(url, cfg)
    if is_special_file(fs, path):
        raise OSError(f"{url} is not a regular file")
    return fs.cat_file(path)


def read_json(url: str, cfg: StorageConfig) -> Any:
    """The JSON document at `url`, or None when there is none; ValueError naming the URL when it
    is not valid JSON (a damaged file must not pass for a missing one)."""
    if not exists(url, cfg):
        return None
    return parse_json(read_bytes(url, cfg), url)


def parse_json(data: bytes, url: str) -> Any:
    """The JSON document in `data` (read from `url`); ValueError naming the URL when it is not one."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{url}: not valid JSON: {error}") from error
    except RecursionError:  # nested deeper than the parser goes: no document of ours
        raise ValueError(f"{url}: not valid JSON: nested too deeply") from None


def write_bytes_atomic(url: str, data: bytes, cfg: StorageConfig) -> None:
    """Readers see the old object or the whole new one, never a part.

    Locally: write a temporary file in the same folder, fsync, rename over the
    target, fsync the folder (so that the rename survives a power loss). On S3 a
    PUT is already atomic, and so is a multipart upload (s3fs's above 100 MiB): the
    object appears at its completion. A writer killed mid-upload leaves its parts,
    which `remove_stale_temporaries` aborts later (and a bucket lifecycle rule too,
    deploy/README.md).
    """
    fs, path = filesystem_for(url, cfg)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TEMPORARY_MARKER}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # The rename itself lives in the folder: until the folder is synced, a power loss can undo it
    # (latest.json back at a step that retention has since deleted).
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


TEMPORARY_MARKER = ".tmp-"


def remove_stale_temporaries(url: str, cfg: StorageConfig, older_than_s: float, uploads_older_than_s: float) -> list[str]:
    """Remove what a writer killed mid-write left under a folder, once old enough that no live
    writer can still be finishing it; returns what was removed.

    Locally: the temporary files `write_bytes_atomic` left directly under the folder (killed between
    write and rename), `older_than_s` old (a live writer renames within seconds). On S3: the
    multipart uploads (s3fs's above 100 MiB) begun anywhere under the prefix and never completed,
    `uploads_older_than_s` old: S3 keeps and bills their parts, unlisted, until they are aborted."""
    fs, path = filesystem_for(url, cfg)
    if hasattr(fs, "call_s3"):
        return _abort_stale_uploads(fs, path, uploads_older_than_s)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return []
    removed = []
    cutoff = time.time() - older_than_s
    for entry in os.scandir(path):
        if entry.name.startswith(".") and TEMPORARY_MARKER in entry.name and entry.is_file():
            try:
                if entry.stat().st_mtime < cutoff:
                    os.remove(entry.path)
                    removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


def _abort_stale_uploads(fs: Any, path: str, older_than_s: float) -> list[str]:
    bucket, key, _ = fs.split_path(path)
    prefix = key.rstrip("/") + "/" if key else ""
    cutoff = time.time() - older_than_s
    aborted: list[str] = []
    markers: dict[str, str] = {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
        for upload in page.get("Uploads", []):
            if upload["Initiated"].timestamp() < cutoff:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(f"s3://{bucket}/{upload['Key']} (unfinished upload {upload['UploadId']})")
        if not page.get("IsTruncated"):
            return aborted
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def listdir(url: str, cfg: StorageConfig) -> list[str]:
    """Names (not paths) of the entries directly under `url`, sorted; fresh, not from a listing cache."""
    fs, path = filesystem_for(url, cfg)
    fs.invalidate_cache(path)
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def find(url: str, cfg: StorageConfig) -> list[str]:
    """Every file below `url`, as paths relative to it, sorted: one recursive listing (on S3 a
    request per thousand keys, where a lookup per folder costs a request each)."""
    fs, path = filesystem_for(url, cfg)
    root = path.rstrip("/")
    fs.invalidate_cache(root)
    return sorted(found[len(root) + 1:] for found in fs.find(root) if found.startswith(root + "/"))


def exists(url: str, cfg: StorageConfig) -> bool:
    fs, path = filesystem_for(url, cfg)
    fs.invalidate_cache(path)
    return fs.exists(path)


def rm(url: str, cfg: StorageConfig) -> None:
    """Remove a file or a whole folder/prefix."""
    fs, path = filesystem_for(url, cfg)
    fs.rm(path, recursive=True)
    fs.invalidate_cache(path)
