"""Rolling checkpoints that downstream consumers can follow while training runs.

Layout under the checkpoint folder (a local path or an s3:// URL)::

    step-000001000/state.pt      everything needed to resume (torch.save of a dict)
    step-000001000/backbone.pt   the backbone's state_dict, keyed as torchvision's model without its classifier
    step-000001000/meta.json     the record below; written last in the folder
    latest.json                  the record of the newest complete checkpoint

backbone.pt (`SwAVModel.backbone_state_dict`) has no classifier entries, as SwAV trains none, and
records its BackboneSpec in the state dict's ``_metadata``. Where the spec names a torchvision
model (`BackboneSpec.torchvision_constructor`: torchvision's stem and width, any ViT), e.g.
``m = torchvision.models.<arch>(); m.fc = torch.nn.Identity(); m.load_state_dict(sd)`` (``m.heads``
for a ViT) loads it strictly; any backbone loads with ``stream_swav.load_backbone(path)``. Files written before the spec
was recorded carry zero ``fc`` placeholders instead; consumers (`load_resolved_backbone`) drop
them and take the spec from meta.json / latest.json, which record it too.

Each file is written atomically (temporary name + rename locally; a single PUT
on S3), in that order, and latest.json only after all of them succeeded. A
reader that follows latest.json therefore never sees a partial checkpoint, and
a step folder is complete exactly when its meta.json exists.

Retention keeps the newest `keep_last` complete checkpoints plus milestones:
with an interval of N steps, the first complete checkpoint whose step lies in
[n*N, (n+1)*N) for each n >= 1. That rule depends only on step numbers, so a
restarted run keeps the same milestones. Older step folders are deleted only
after latest.json has moved past them; folders newer than latest.json (left by
a run that died mid-save) are left alone until a later save reaches their step.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import re
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from stream_swav import logs, storage
from stream_swav.backbone_spec import BackboneSpec, recorded_spec
from stream_swav.config import AugmentConfig, StorageConfig, UsageError
from stream_swav.provenance import code_provenance
from stream_swav.storage import join_url

# The keys of a learner's state that differ between the ranks of a data-parallel group: each
# rank's own feature queue, random streams and balance estimate (curation.balance: usage, bank). A
# checkpoint holds rank 0's state whole and these of every other rank; the rest (weights,
# optimiser, codes, counters) is the same on every rank.
RANK_LOCAL_STATE_KEYS = ("queue", "cpu_rng", "augment_rng", "cuda_rng", "balance", "balance_density", "balance_label",
                         "balance_reference")

log = logging.getLogger(__name__)

LATEST = "latest.json"
META = "meta.json"
STATE = "state.pt"
BACKBONE = "backbone.pt"
FORMAT_VERSION = 1
MAX_STEP = 999_999_999
_STEP_DIR = re.compile(r"^step-([0-9]{9})\Z")
_RESERVED_KEYS = frozenset({"format", "step", "images_seen", "wall_time", "time", "state", "backbone",
                            "state_url", "backbone_url", "state_bytes", "backbone_bytes", "code"})


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    images_seen: int
    step_url: str
    state_url: str
    backbone_url: str
    latest_url: str
    bytes_written: int
    duration_s: float
    # Unix time recorded in latest.json.
    wall_time: float
    # Step folders removed by the retention pass that followed.
    deleted: tuple[str, ...]


def step_dir_name(step: int) -> str:
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"checkpoint step must be in [0, {MAX_STEP}], got {step}")
    return f"step-{step:09d}"


def absolute_url(url: str) -> str:
    """s3://... unchanged; local paths made absolute so they stay valid from any working directory."""
    return storage.join_protocol(*storage.split_protocol(url))


def _serialise(obj: dict[str, Any], what: str) -> bytes:
    """torch.save into memory, refusing anything a weights_only load would reject:
    finding out at resume time would be too late."""
    if not isinstance(obj, dict):
        raise TypeError(f"{what} must be a dict, got {type(obj).__name__}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{what} would not load with torch.load(weights_only=True): {error}") from error
    return data


def _json_safe(value: Any, key: str) -> Any:
    """Plain JSON types only; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"info{key}: {type(value).__name__} is not JSON-serialisable")


def _check_info(info: dict[str, Any]) -> dict[str, Any]:
    reserved = _RESERVED_KEYS & info.keys()
    if reserved:
        raise ValueError(f"info must not set {sorted(reserved)}: save_checkpoint fills them in")
    try:
        BackboneSpec.from_record(info)
    except ValueError as error:
        raise ValueError(f"info must describe the backbone for consumers to rebuild it: {error}") from error
    return {str(k): _json_safe(v, f".{k}") for k, v in info.items()}


def save_checkpoint(dir_url: str, step: int, images_seen: int, state: dict[str, Any], backbone: dict[str, Any],
                    info: dict[str, Any], storage_cfg: StorageConfig, *, keep_last: int = 3,
                    milestone_steps: int = 0, before_commit: Callable[[], None] | None = None) -> CheckpointInfo:
    """Write one checkpoint, move latest.json to it, then apply retention.

    `info` holds extra JSON fields for latest.json; it must include the
    `BackboneSpec.to_record()` fields, and usually `metrics` (a dict of key figures). Raises before
    writing anything when an input is invalid, and leaves latest.json untouched
    when a write fails. `before_commit` is called before the step folder is touched, before
    latest.json moves, before older folders are deleted to make room, and before retention (the
    run's lease confirmed each time): what it raises ends the save, its step folder removed if it
    was being written.
    """
    started = time.monotonic()
    step_name = step_dir_name(step)
    if images_seen < 0:
        raise ValueError(f"images_seen must be >= 0, got {images_seen}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    extra = _check_info(info)
    state_bytes = _serialise(state, "state")
    backbone_bytes = _serialise(backbone, "backbone")

    step_url = join_url(dir_url, step_name)
    latest_url = join_url(dir_url, LATEST)
    if before_commit is not None:
        before_commit()
    try:
        previous = read_latest(dir_url, storage_cfg)
    except ValueError:
        # A damaged latest.json must not stop training from saving; this save replaces it.
        log.warning("ignoring unreadable %s", latest_url, exc_info=True)
        previous = None
    if storage.exists(step_url, storage_cfg):
        if previous is not None and previous["step"] == step:
            raise ValueError(f"{step_url} is the checkpoint latest.json points at; not overwriting it")
        # Left by a save that died, or by a run resumed from an older checkpoint:
        # clear it so old and new files can never mix in one folder.
        storage.rm(step_url, storage_cfg)

    wall_time = time.time()
    record = {
        "format": FORMAT_VERSION,
        "step": step,
        "images_seen": images_seen,
        "wall_time": wall_time,
        "time": datetime.fromtimestamp(wall_time, timezone.utc).isoformat(),
        "state": f"{step_name}/{STATE}",
        "backbone": f"{step_name}/{BACKBONE}",
        "state_url": absolute_url(join_url(step_url, STATE)),
        "backbone_url": absolute_url(join_url(step_url, BACKBONE)),
        "state_bytes": len(state_bytes),
        "backbone_bytes": len(backbone_bytes),
        # Which code wrote it: the package version, and the commit where it runs from a checkout.
        "code": code_provenance(),
        **extra,
    }
    record_bytes = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode()

    def write() -> None:
        try:
            storage.write_bytes_atomic(join_url(step_url, STATE), state_bytes, storage_cfg)
            storage.write_bytes_atomic(join_url(step_url, BACKBONE), backbone_bytes, storage_cfg)
            storage.write_bytes_atomic(join_url(step_url, META), record_bytes, storage_cfg)
            if before_commit is not None:
                before_commit()
            storage.write_bytes_atomic(latest_url, record_bytes, storage_cfg)
        except BaseException:
            # A failed save leaves nothing of itself behind (latest.json still names the previous one).
            _remove_quietly(step_url, storage_cfg)
            raise

    try:
        write()
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        if before_commit is not None:
            before_commit()  # the folders deleted next may be another run's by now
        # The disk is full: older checkpoints make room, oldest first, as long as one is left that
        # latest.json does not name; the last good checkpoint is never deleted.
        for victim in _room_for(dir_url, previous, step, storage_cfg):
            log.warning("no space left for checkpoint %s: deleting the older %s to make room", step_name, victim)
            _remove_quietly(victim, storage_cfg)
            try:
                write()
                break
            except OSError as again:
                if again.errno != errno.ENOSPC:
                    raise
        else:
            raise

    if before_commit is not None:
        before_commit()
    deleted = prune_checkpoints(dir_url, storage_cfg, keep_last=keep_last, milestone_steps=milestone_steps)
    return CheckpointInfo(
        step=step, images_seen=images_seen, step_url=absolute_url(step_url),
        state_url=record["state_url"], backbone_url=record["backbone_url"], latest_url=latest_url,
        bytes_written=len(state_bytes) + len(backbone_bytes) + 2 * len(record_bytes),
        duration_s=time.monotonic() - started, wall_time=wall_time, deleted=tuple(deleted))


def _remove_quietly(url: str, storage_cfg: StorageConfig) -> None:
    try:
        storage.rm(url, storage_cfg)
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - a leftover costs space only; retention retries it later
        log.warning("could not remove %s", url, exc_info=True)


def _room_for(dir_url: str, latest: dict[str, Any] | None, saving: int, storage_cfg: StorageConfig) -> list[str]:
    """Step folders that may go to make room for a save, oldest first: every one but the latest
    checkpoint's and the one being written."""
    keep = {saving, latest["step"] if latest is not None else -1}
    return [url for step, url in sorted(list_step_dirs(dir_url, storage_cfg).items()) if step not in keep]


def list_step_dirs(dir_url: str, storage_cfg: StorageConfig) -> dict[int, str]:
    """step -> folder URL for every step-NNNNNNNNN entry (complete or not)."""
    if not storage.exists(dir_url, storage_cfg):
        return {}
    found = {}
    for entry in storage.listdir(dir_url, storage_cfg):
        match = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found[int(match.group(1))] = join_url(dir_url, match.group(0))
    return found


def complete_steps(dir_url: str, folders: dict[int, str], storage_cfg: StorageConfig) -> list[int]:
    """Those of `folders` (step -> folder URL under `dir_url`) that hold meta.json, the last file a
    save writes. On an object store from one recursive listing: a lookup per folder cost a request
    per milestone ever kept (they are kept for good) on every save, while the learners waited. On a
    filesystem a stat per folder costs less than walking them all, and follows a linked folder."""
    if storage.split_protocol(dir_url)[0] == "file":
        return [step for step, url in folders.items() if storage.exists(join_url(url, META), storage_cfg)]
    files = set(storage.find(dir_url, storage_cfg))
    return [step for step, url in folders.items() if f"{url.rstrip('/').rsplit('/', 1)[-1]}/{META}" in files]


def retained_steps(complete: list[int], latest_step: int, keep_last: int, milestone_steps: int) -> set[int]:
    """Steps to keep among complete checkpoints at or before the latest one."""
    candidates = sorted(s for s in complete if s <= latest_step)
    keep = set(candidates[-keep_last:]) | {latest_step}
    if milestone_steps > 0:
        first_in_interval: dict[int, int] = {}
        for s in candidates:
            first_in_interval.setdefault(s // milestone_steps, s)
        keep |= {s for interval, s in first_in_interval.items() if interval >= 1}
    return keep


# A latest.json write killed between write and rename leaves its temporary file behind.
STALE_TEMPORARY_S = 600.0
# A state.pt upload to S3 killed before it completed leaves its parts behind; a live one of several
# GB finishes well within this, even over a slow link.
STALE_UPLOAD_S = 6 * 3600.0


def prune_checkpoints(dir_url: str, storage_cfg: StorageConfig, *, keep_last: int,
                      milestone_steps: int) -> list[str]:
    """Delete step folders older than latest.json's that retention does not keep,
    partial ones included. Failures are logged, never raised: a leftover folder
    costs only space and the next pass retries it."""
    try:
        latest = read_latest(dir_url, storage_cfg)
        if latest is None:
            return []
        latest_step = latest["step"]
        folders = list_step_dirs(dir_url, storage_cfg)
        older = {s: url for s, url in folders.items() if s < latest_step}
        complete = complete_steps(dir_url, older, storage_cfg)
        keep = retained_steps(complete + [latest_step], latest_step, keep_last, milestone_steps)
    except Exception:
        log.warning("checkpoint retention skipped: could not inspect %s", dir_url, exc_info=True)
        return []
    deleted = []
    for step in sorted(older):
        if step in keep:
            continue
        try:
            storage.rm(older[step], storage_cfg)
            deleted.append(older[step])
        except Exception:
            log.warning("could not delete old checkpoint %s", older[step], exc_info=True)
    try:
        leftovers = storage.remove_stale_temporaries(dir_url, storage_cfg, STALE_TEMPORARY_S, STALE_UPLOAD_S)
        for leftover in leftovers:
            log.info("removed what a killed write left: %s", leftover)
        deleted += leftovers
    except Exception as error:  # noqa: BLE001 - as above: a leftover costs space only
        # One line: a bucket policy without s3:ListBucketMultipartUploads says so at every save.
        log.warning("could not remove stale temporary files or unfinished uploads in %s: %s: %s", dir_url,
                    type(error).__name__, error)
    return deleted


def mark_final(dir_url: str, step: int, storage_cfg: StorageConfig,
               before_commit: Callable[[], None] | None = None) -> bool:
    """Record that the checkpoint at `step`, already the latest, is the run's final one (a stop
    that lands right after a periodic save has nothing new to write). False when latest.json
    names another step. `before_commit` is called before anything is written (as by
    `save_checkpoint`): whatever it raises leaves the folder as it was."""
    latest = read_latest(dir_url, storage_cfg)
    if latest is None or latest["step"] != step:
        return False
    if latest.get("final") is not True:
        if before_commit is not None:
            before_commit()
        record_bytes = (json.dumps({**latest, "final": True}, indent=2, allow_nan=False) + "\n").encode()
        storage.write_bytes_atomic(join_url(dir_url, step_dir_name(step), META), record_bytes, storage_cfg)
        storage.write_bytes_atomic(join_url(dir_url, LATEST), record_bytes, storage_cfg)
    return True


def read_latest(dir_url: str, storage_cfg: StorageConfig) -> dict[str, Any] | None:
    """latest.json of a checkpoint folder, or None when nothing was saved there yet."""
    url = join_url(dir_url, LATEST)
    record = storage.read_json(url, storage_cfg)
    if record is None:
        return None
    _check_record(record, url)
    return record


def _check_record(record: Any, url: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{url}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"{url}: step must be an integer in [0, {MAX_STEP}], got {step!r}")
    for key, filename in (("state", STATE), ("backbone", BACKBONE)):
        # Only our own layout is followed, so an edited file cannot point a loader elsewhere.
        expected = f"{step_dir_name(step)}/{filename}"
        if record.get(key) != expected:
            raise ValueError(f"{url}: {key} must be {expected!r}, got {record.get(key)!r}")
    _check_record_fields(record, url)


def _check_record_fields(record: dict[str, Any], url: str) -> None:
    """The record's other fields that readers use, where present: of the types save_checkpoint writes."""
    for key in ("images_seen", "state_bytes", "backbone_bytes"):
        value = record.get(key)
        if key in record and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{url}: {key} must be an integer >= 0, got {value!r}")
    wall_time = record.get("wall_time")
    if "wall_time" in record and (not isinstance(wall_time, (int, float)) or isinstance(wall_time, bool)
                                  or not math.isfinite(wall_time)):
        raise ValueError(f"{url}: wall_time must be a number, got {wall_time!r}")
    for key in ("metrics", "config", "code"):
        if key in record and not isinstance(record[key], dict):
            raise ValueError(f"{url}: {key} must be a JSON object, got {type(record[key]).__name__}")
    sections = record.get("config", {})
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ValueError(f"{url}: config.{name} must be a JSON object, got {type(section).__name__}")


def check_contained(root_url: str, step_url: str, storage_cfg: StorageConfig) -> None:
    """A step folder, or a file in one, reached from a checkpoint folder must lie inside it,
    symbolic links resolved, as latest.json may only name our own layout: an edited folder cannot
    lead a loader elsewhere (state.pt linked to another run's). (Object stores have no links.)"""
    protocol, root = storage.split_protocol(root_url)
    if protocol != "file":
        return
    real_root = os.path.realpath(root)
    real_step = os.path.realpath(storage.split_protocol(step_url)[1])
    if os.path.commonpath([real_root, real_step]) != real_root:
        raise ValueError(f"{step_url} leads outside the checkpoint folder {root_url} (to {real_step}); "
                         f"refusing to load it")


def resolve_file(url: str, filename: str, storage_cfg: StorageConfig) -> str:
    """URL of `filename` (state.pt or backbone.pt) for a checkpoint root (via
    latest.json), a step folder, or the file itself."""
    if url.endswith(".pt"):
        return url
    latest = read_latest(url, storage_cfg)
    if latest is not None:
        found = join_url(url, latest["state" if filename == STATE else "backbone"])
        check_contained(url, found, storage_cfg)
        return found
    candidate = join_url(url, filename)
    if storage.exists(candidate, storage_cfg):
        return candidate
    raise FileNotFoundError(f"{url}: neither a checkpoint folder with {LATEST} nor a step folder with {filename}")


def check_stored_entries(data: bytes, url: str) -> None:
    """torch.save writes its zip entries stored, never compressed, while torch.load inflates any:
    a compressed entry (half a megabyte that loads as a 500 MB tensor) is refused."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return  # torch's legacy format (nothing compressed), or damaged: torch.load says which
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{url}: its entry {info.filename} is compressed, which torch.save never does; "
                             f"refusing it (it may inflate to any size)")


def _load_failure(error: BaseException) -> str:
    """torch.load's reason in one line. Its weights-only refusal runs to paragraphs that advise
    loading with weights_only=False, which a file from elsewhere must never be: only the
    unpickler's own reason is kept."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return "it holds what a weights-only load refuses (" + " ".join(reason.split()) + ")"
    return logs.error_line(error)


def _load(url: str, storage_cfg: StorageConfig, map_location: Any) -> dict[str, Any]:
    data = storage.read_bytes(url, storage_cfg)
    check_stored_entries(data, url)
    try:
        loaded = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{url}: not a loadable checkpoint file: {_load_failure(error)}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{url}: expected a dict, got {type(loaded).__name__}")
    return loaded


def load_checkpoint(url: str, storage_cfg: StorageConfig, map_location: Any = "cpu") -> dict[str, Any]:
    """The resume state of a checkpoint root (its latest), a step folder, or a .pt URL."""
    return _load(resolve_file(url, STATE, storage_cfg), storage_cfg, map_location)


def load_backbone_state(url: str, storage_cfg: StorageConfig, map_location: Any = "cpu") -> dict[str, Any]:
    """The backbone state_dict of a checkpoint root (its latest), a step folder, or a .pt URL."""
    return _load(resolve_file(url, BACKBONE, storage_cfg), storage_cfg, map_location)


# ---- consumers: which backbone a checkpoint holds -------------------------------------------------------


@dataclass
class ResolvedCheckpoint:
    """A checkpoint's backbone file and what is needed to rebuild and feed it."""

    url: str
    backbone_url: str
    spec: BackboneSpec
    step: int | None
    images_seen: int | None
    # The training configuration (Config.to_dict()), or {} when it was not saved.
    config: dict[str, Any]
    # The latest.json / meta.json record, {} for a bare backbone file.
    record: dict[str, Any]

    def global_crop_size(self) -> int | None:
        return self.config.get("crops", {}).get("global_size")

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        augment = self.config.get("augment", {})
        default = AugmentConfig()
        return tuple(augment.get("mean", default.mean)), tuple(augment.get("std", default.std))


def resolve_checkpoint(url: str, storage_cfg: StorageConfig | None = None,
                       record: dict[str, Any] | None = None) -> ResolvedCheckpoint:
    """Accepts a checkpoint folder (follows latest.json), a step folder, a backbone.pt URL inside a
    step folder, or any backbone file (an export). The backbone spec comes from the latest.json/meta.json
    record, else from the configuration stored in state.pt, else from the spec the backbone file
    records. `record` skips re-reading latest.json."""
    storage_cfg = storage_cfg or StorageConfig()
    url = url.rstrip("/")
    if url.endswith(".pt"):
        folder = url.rsplit("/", 1)[0] if "/" in url else "."
        backbone_url = url
    else:
        record = record if record is not None else read_latest(url, storage_cfg)
        # With a latest.json this is a checkpoint folder; without, a step folder.
        folder = join_url(url, step_dir_name(record["step"])) if record is not None else url
        backbone_url = join_url(folder, BACKBONE)
        # Inside the folder given, links resolved (a checkpoint folder, or a step folder).
        check_contained(url, backbone_url, storage_cfg)
    if not storage.exists(backbone_url, storage_cfg):
        raise FileNotFoundError(f"{url}: no backbone at {backbone_url} (expected a checkpoint folder with "
                                f"{LATEST}, a step folder, or a backbone.pt)")
    if record is None:
        meta_url = join_url(folder, META)
        record = storage.read_json(meta_url, storage_cfg) or {}
        if not isinstance(record, dict):
            raise ValueError(f"{meta_url}: expected a JSON object")
        _check_record_fields(record, meta_url)
    config = record.get("config") if isinstance(record.get("config"), dict) else None
    state_url = join_url(folder, STATE)
    if config is None and storage.exists(state_url, storage_cfg):
        state = load_checkpoint(state_url, storage_cfg)
        config = state.get("config") if isinstance(state.get("config"), dict) else None
    config = config or {}
    try:
        if "arch" in record:
            spec = BackboneSpec.from_record(record)
        elif isinstance(config.get("model"), dict):
            spec = BackboneSpec.from_record(config["model"])
        else:
            # A bare backbone file (an export, a copy): the spec it records.
            spec = recorded_spec(load_backbone_state(backbone_url, storage_cfg))
            if spec is None:
                raise ValueError(f"{backbone_url} records no backbone spec")
    except ValueError as error:
        raise ValueError(f"{url}: cannot tell the architecture from {META}, latest.json, the configuration "
                         f"in {STATE} or the backbone file: {error}") from error
    return ResolvedCheckpoint(url=url, backbone_url=backbone_url, spec=spec,
                              step=record.get("step"), images_seen=record.get("images_seen"), config=config,
                              record=record)


def load_resolved_backbone(resolved: ResolvedCheckpoint, storage_cfg: StorageConfig | None = None) -> torch.nn.Module:
    """The checkpoint's feature extractor in eval mode (see `stream_swav.model.load_backbone`); backbone
    files of every format load."""
    from stream_swav.model import load_backbone  # builds the network: torchvision, only when asked

    state = load_backbone_state(resolved.backbone_url, storage_cfg or StorageConfig())
    return load_backbone(state, resolved.spec)


# ---- resuming: the newest checkpoint that loads ----------------------------------------------------------


class NoLoadableCheckpoint(UsageError):
    """Checkpoints exist but none of them loads; the message names each and why."""


@dataclass
class ResumePoint:
    step: int
    url: str
    state: dict[str, Any]
    # latest.json's (or the step folder's meta.json) record.
    record: dict[str, Any]
    # Checkpoints newer than this one that did not load: (step folder, why).
    skipped: list[tuple[str, str]]


def repoint_latest(dir_url: str, point: ResumePoint, storage_cfg: StorageConfig) -> None:
    """latest.json names `point`, restored after newer checkpoints were skipped: readers that follow
    latest.json stop following one that does not load, and the run's next save of that step
    replaces it (a save never replaces the step latest.json names)."""
    record_bytes = (json.dumps(point.record, indent=2, allow_nan=False) + "\n").encode()
    storage.write_bytes_atomic(join_url(dir_url, LATEST), record_bytes, storage_cfg)


def load_for_resume(dir_url: str, storage_cfg: StorageConfig, check: Callable[[dict[str, Any]], None] | None = None,
                    rejected: dict[str, str] | None = None) -> ResumePoint | None:
    """The resume state of the newest checkpoint that loads: the one latest.json names, else each
    older complete step folder in turn (a damaged newest one must not block every restart while
    retention kept good ones beside it). None when the folder holds no checkpoint at all.

    `check(state)` raises ValueError for a state that loads but cannot be resumed (the caller's
    own parts of it); `rejected` (absolute step-folder URL -> why) names checkpoints found unusable
    since (by the learners): both are skipped as damaged ones are, and named if none is left."""
    rejected = rejected or {}
    skipped: list[tuple[str, str]] = []
    try:
        latest = read_latest(dir_url, storage_cfg)
    except ValueError as error:
        skipped.append((join_url(dir_url, LATEST), logs.error_line(error)))
        latest = None
    folders = list_step_dirs(dir_url, storage_cfg)
    newest = latest["step"] if latest is not None else max(folders, default=-1)
    candidates = sorted((s for s in folders if s <= newest), reverse=True)
    for step in candidates:
        step_url = folders[step]
        if absolute_url(step_url) in rejected:
            skipped.append((step_url, rejected[absolute_url(step_url)]))
            continue
        try:
            check_contained(dir_url, step_url, storage_cfg)
            if latest is not None and step == latest["step"]:
                record = latest
            else:
                record = storage.read_json(join_url(step_url, META), storage_cfg)
                if record is None:
                    continue  # a save that died before finishing this folder: never a checkpoint
                _check_record(record, join_url(step_url, META))
            check_contained(dir_url, join_url(step_url, STATE), storage_cfg)
            state = load_checkpoint(join_url(step_url, STATE), storage_cfg)
            if check is not None:
                check(state)
        except (ValueError, OSError) as error:
            if storage.is_unavailable(error):
                # The store did not answer: that says nothing of this checkpoint, and falling back to
                # an older one (and pointing latest.json at it) would throw training away.
                raise
            skipped.append((step_url, logs.error_line(error)))
            continue
        return ResumePoint(step=step, url=absolute_url(step_url), state=state, record=record, skipped=skipped)
    if skipped:
        raise NoLoadableCheckpoint(
            f"checkpoint.dir: no checkpoint in {dir_url} loads ({'; '.join(f'{u}: {why}' for u, why in skipped)}); "
            f"resume with the configuration they were saved with (meta.json records it), move the folder away "
            f"to start afresh, or point checkpoint.dir elsewhere")
    return None
