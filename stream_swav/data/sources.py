"""Which shards exist: expand a shard spec into shard URLs, at the start and again in follow mode.

A spec is one of

- a brace pattern, ``s3://bucket/shards/{000000..009999}.tar`` (zero padding
  kept, several groups allowed); a single ``.tar`` path is a pattern of one;
- a text file ending in ``.txt`` (local or s3) with one shard URL per line;
  blank lines and lines starting with ``#`` are ignored, relative entries are taken
  relative to the list file's folder;
- anything else is a folder or key prefix: every ``*.tar`` (``.tar.gz``,
  ``.tgz``) below it, sorted.

S3 shards come back as ``s3://bucket/key`` URLs, local ones as absolute paths.
In follow mode `relist` lists them again during the run (the stream ledger
tells the new ones and those gone from it). Pattern entries count only once
they exist, so a pattern laid over a bucket that is still being filled picks
up each shard when it lands.
"""
from __future__ import annotations

import logging
import posixpath
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import braceexpand

from stream_swav.config import ConfigError, StorageConfig
from stream_swav.storage import TRANSIENT_ERRORS, filesystem_for, join_protocol, split_protocol

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIX = ".txt"
# Shards looked up at once by `gone` (each a HEAD on S3, waiting on the network, not the CPU).
LOOKUP_THREADS = 32


class ShardSpecError(ConfigError):
    """The shard spec cannot be understood or its list file cannot be read."""


def spec_kind(spec: str) -> str:
    """"pattern", "list" or "prefix"."""
    if "{" in spec or "}" in spec or spec.endswith(SHARD_SUFFIXES):
        return "pattern"
    if spec.endswith(LIST_SUFFIX):
        return "list"
    return "prefix"


class ShardSource:
    def __init__(self, spec: str, storage_cfg: StorageConfig, key: str = "data.shards") -> None:
        # The configuration key the spec came from, which its errors name.
        self.key = key
        if not spec.strip():
            raise ShardSpecError(f"{key}: empty shard spec")
        self.spec = spec.strip()
        self.storage_cfg = storage_cfg
        self.kind = spec_kind(self.spec)
        self._protocol = split_protocol(self.spec)[0]
        # Lines of a .txt list found bad while relisting, each logged once.
        self._bad_lines: set[str] = set()
        self._pattern = self._expand_pattern() if self.kind == "pattern" else []

    def list_shards(self) -> list[str]:
        """Every shard that exists now, in spec order; listing caches are bypassed."""
        return self._list()

    def relist(self) -> list[str] | None:
        """`list_shards` during a run (follow mode): every shard that exists now (for a `.txt` list,
        every line; lines are not looked up), or None when the listing failed (a storage hiccup,
        logged; the next relist tries again). What is new, or gone, the stream ledger tells."""
        try:
            # A line of a .txt list edited in wrongly during the run is skipped (and logged once), not
            # allowed to hide every shard listed after it for the rest of the run.
            return self._list(skip_bad_lines=True)
        except (*TRANSIENT_ERRORS, ShardSpecError) as exc:
            log.warning("relisting %s failed, will retry: %s", self.spec, exc)
            return None

    def gone(self, urls: list[str]) -> list[str]:
        """Those of `urls` the store says are not there: only a not-found answer counts, never an
        error (no permission, a timeout), which says nothing of a shard. Looked up LOOKUP_THREADS at
        a time: after bucket retention removed thousands, one at a time would take minutes."""
        if not urls:
            return []
        with ThreadPoolExecutor(min(LOOKUP_THREADS, len(urls)), thread_name_prefix="shard-lookup") as pool:
            verdicts = list(pool.map(self._surely_gone, urls))
        return [url for url, verdict in zip(urls, verdicts) if verdict]

    def _surely_gone(self, url: str) -> bool:
        try:
            fs, path = filesystem_for(url, self.storage_cfg)
            fs.invalidate_cache(path)
            fs.info(path)
        except FileNotFoundError:
            return True
        except (*TRANSIENT_ERRORS, ValueError):  # TRANSIENT_ERRORS holds OSError: PermissionError too
            return False
        return False

    def _list(self, skip_bad_lines: bool = False) -> list[str]:
        if self.kind == "pattern":
            return self._existing_pattern_entries()
        if self.kind == "list":
            return self._read_list_file(skip_bad_lines)
        return self._list_prefix()

    def _expand_pattern(self) -> list[str]:
        try:
            urls = list(braceexpand.braceexpand(self.spec))
        except braceexpand.UnbalancedBracesError as exc:
            raise ShardSpecError(f"{self.key}: {exc}") from None
        leftover = [u for u in urls if "{" in u or "}" in u]
        if leftover:
            raise ShardSpecError(f"{self.key}: cannot expand the braces in {leftover[0]!r}; "
                                 "use {000..099} ranges or {a,b} lists")
        return list(dict.fromkeys(split_protocol(url)[1] for url in urls))

    def _existing_pattern_entries(self) -> list[str]:
        # One listing per folder instead of one existence check per shard:
        # a 10,000-shard pattern over S3 costs a handful of requests.
        fs, _ = filesystem_for(self.spec, self.storage_cfg)
        by_folder: dict[str, list[str]] = defaultdict(list)
        for path in self._pattern:
            by_folder[posixpath.dirname(path)].append(path)
        present: set[str] = set()
        for folder in by_folder:
            fs.invalidate_cache(folder)
            try:
                present.update(p.rstrip("/") for p in fs.ls(folder, detail=False))
            except FileNotFoundError:
                continue
        return [join_protocol(self._protocol, p) for p in self._pattern if p in present]

    def _list_prefix(self) -> list[str]:
        fs, path = filesystem_for(self.spec, self.storage_cfg)
        root = path.rstrip("/")
        fs.invalidate_cache(root)
        if fs.isdir(root):
            found = fs.find(root)
        else:
            # A key prefix such as s3://bucket/shards/train- rather than a folder.
            parent = posixpath.dirname(root)
            fs.invalidate_cache(parent)
            found = [p for p in fs.find(parent) if p.startswith(root)]
        return [join_protocol(self._protocol, p) for p in sorted(found) if p.endswith(SHARD_SUFFIXES)]

    def _read_list_file(self, skip_bad_lines: bool = False) -> list[str]:
        fs, path = filesystem_for(self.spec, self.storage_cfg)
        fs.invalidate_cache(path)
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            raise ShardSpecError(f"{self.key}: list file {self.spec} does not exist") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ShardSpecError(f"{self.key}: list file {self.spec} is not UTF-8 text: {exc}") from None
        folder = posixpath.dirname(path)
        urls = []
        for number, line in enumerate(text.splitlines(), start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if "://" not in entry and not posixpath.isabs(entry):
                entry = join_protocol(self._protocol, posixpath.join(folder, entry))
            try:
                protocol, entry_path = split_protocol(entry)
            except ValueError as exc:
                if not skip_bad_lines:
                    raise ShardSpecError(f"{self.key}: {self.spec} line {number}: {exc}") from None
                if entry not in self._bad_lines:
                    self._bad_lines.add(entry)
                    log.warning("%s: %s line %d skipped: %s", self.key, self.spec, number, exc)
                continue
            urls.append(join_protocol(protocol, entry_path))
        return list(dict.fromkeys(urls))


# A listing still running after this long is reported (once): follow mode takes in nothing new
# until it ends. A bucket of ten million shards lists in minutes on S3; this is a store that hangs.
LISTING_SLOW_S = 1800.0


@dataclass(frozen=True)
class Listed:
    """A finished listing: every shard it found, and when it began (the caller's clock). A shard
    the caller retired after `started` may still be in it, listed before it was deleted."""

    urls: list[str]
    started: float


class Relisting:
    """Follow mode's listings (`relist`, a `ShardSource.relist`), taken off the caller's loop: one
    at a time, on a thread of its own, the next one `interval_s` after the last one ended.

    The driver relists between chunks, while every learner waits for its next chunk: listing a
    bucket of millions of shards takes minutes on S3 (a thousand keys per request), which inline
    would idle every GPU for as long, each interval. The thread is a daemon, so a listing hung on a
    store that stopped answering does not hold up the process's exit; it is reported once it has
    run `LISTING_SLOW_S`."""

    def __init__(self, relist: Callable[[], list[str] | None], interval_s: float, what: str = "the shards",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.relist = relist
        self.interval_s = interval_s
        self.what = what
        self.clock = clock
        self._due = clock() + interval_s
        self._running: Future | None = None
        self._started = 0.0
        # False once the caller listed for itself (`restart`): what the one under way finds is dropped.
        self._wanted = False
        self._reported = False

    def restart(self) -> None:
        """The caller listed itself (a start or a resume): the next listing an interval from now, and
        one under way is dropped, since what it finds may predate the caller's listing. (It is left
        to end before the next one starts: never two at once.)"""
        self._wanted = False
        self._due = self.clock() + self.interval_s

    def poll(self) -> Listed | None:
        """The listing finished since the last poll, or None (none finished, it was dropped, or it
        failed: `ShardSource.relist` logs that and answers None); starts the next one when it is
        due. Never waits on the store."""
        running, now = self._running, self.clock()
        if running is not None:
            if not running.done():
                if now - self._started >= LISTING_SLOW_S and not self._reported:
                    self._reported = True
                    log.warning("listing %s has run for %.0f min without an answer (a store that stopped "
                                "answering?): no shard added since it began is taken in until it ends", self.what,
                                (now - self._started) / 60)
                return None
            self._running = None
            if self._reported:
                log.info("listing %s ended after %.0f min", self.what, (now - self._started) / 60)
            if self._wanted:
                self._due = now + self.interval_s
                urls = running.result()  # relist answers None for a failure it expects; others are bugs
                return None if urls is None else Listed(urls, self._started)
            if running.exception() is not None:  # dropped, but a bug is not to pass unseen
                log.error("listing %s (dropped at a resume) raised", self.what, exc_info=running.exception())
        if now >= self._due:
            self._running, self._started, self._wanted, self._reported = self._start(), now, True, False
        return None

    def _start(self) -> Future:
        future: Future = Future()

        def run() -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(self.relist())
            except BaseException as exc:  # handed to the caller's thread, which raises it
                future.set_exception(exc)

        threading.Thread(target=run, name="shard-relist", daemon=True).start()
        return future


__all__ = ["ShardSource", "ShardSpecError", "Listed", "Relisting", "LISTING_SLOW_S", "spec_kind", "SHARD_SUFFIXES"]
