"""`stream-swav follow`: evaluate each new checkpoint of a running (or finished) training.

Polls the checkpoint folder's latest.json (with ``--all``, every retained step
folder too); when it names a checkpoint not evaluated yet, that checkpoint's
backbone gets a weighted kNN (and optionally linear probe) evaluation on
labelled shards. A checkpoint is its step and the time it was saved: a step
saved again by a run resumed from an older checkpoint is evaluated again. Each
result is appended to ``results.jsonl`` (the record of what was done: on
restart, checkpoints found there are not evaluated again), ``results.csv`` is
rewritten from it, a PNG plot of
accuracy and loss against images seen is redrawn, and Prometheus gauges
(``stream_swav_eval_knn_top1_ratio``, ``stream_swav_eval_checkpoint_step``...)
are served on 127.0.0.1:9401 unless ``--once``.

The evaluation images are decoded once per process and kept in memory.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stream_swav.apps.evaluate import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    EvalData,
    evaluate_backbone,
    load_eval_data,
    pick_device,
    reference_rows,
)
from stream_swav import logs, plotting, storage
from stream_swav.config import StorageConfig, UsageError
from stream_swav.data.sources import ShardSource
from stream_swav import checkpoint as ckpt
from stream_swav.checkpoint import ResolvedCheckpoint, load_resolved_backbone, resolve_checkpoint
from stream_swav.runtime.metrics import EvalMetrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
PLOT_PNG = "accuracy.png"
CSV_COLUMNS = ("step", "images_seen", "knn_top1", "probe_top1", "loss", "random_knn_top1", "random_bn_knn_top1",
               "pixels_knn_top1", "random_probe_top1", "random_bn_probe_top1", "pixels_probe_top1", "time",
               "eval_seconds", "checkpoint")
# Result-row key prefix of each `reference_rows` feature set.
REFERENCE_PREFIXES = {"random-init": "random", "random-init-data-bn": "random_bn", "raw-pixels": "pixels"}


# ---- results ------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The object rows of a JSON-lines file; a damaged line (say, cut off by a crash mid-write)
    is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d: not JSON, ignored", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s line %d: not a JSON object, ignored", path, number)
    return rows


def append_jsonl(path: str | Path, row: dict[str, Any], allow_nan: bool = True) -> None:
    """Append one row and fsync, so a crash loses at most the row being written."""
    line = json.dumps(row, allow_nan=allow_nan, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl; a damaged line is skipped with a warning, so its checkpoint is
    evaluated again."""
    rows = []
    for row in read_jsonl(path):
        if isinstance(row.get("step"), int):
            rows.append(row)
        else:
            log.warning("%s: a row without an integer step, ignored", path)
    return rows


def _csv_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in sorted(rows, key=lambda r: r["step"]):
        writer.writerow([_csv_value(row.get(column)) for column in CSV_COLUMNS])
    storage.write_bytes_atomic(str(path), buffer.getvalue().encode(), StorageConfig())


class ResultLog:
    """results.jsonl (appended, the source of truth) and results.csv (rewritten from it)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / RESULTS_JSONL
        self.csv = self.out_dir / RESULTS_CSV
        self.rows = read_results(self.jsonl)

    @property
    def steps(self) -> set[int]:
        return {row["step"] for row in self.rows}

    def evaluated(self, step: int, saved_at: str | None) -> bool:
        """Whether the checkpoint of `step` saved at `saved_at` (its record's `time`) has a row. A
        step saved again (a run resumed from an older checkpoint after skipping this one) is
        another checkpoint; rows written before times were recorded count for any."""
        return any(row["step"] == step and (saved_at is None or row.get("checkpoint_time") in (None, saved_at))
                   for row in self.rows)

    def append(self, row: dict[str, Any]) -> None:
        append_jsonl(self.jsonl, row, allow_nan=False)
        self.rows.append(row)
        write_csv(self.rows, self.csv)


# ---- plot ---------------------------------------------------------------------------------------------

BLUE, GREEN, ORANGE, GREY, PURPLE, TEAL, PINK = ("#1f5eb4", "#289646", "#dc6e14", "#828282", "#963ca0", "#008c8c",
                                                "#c8508c")
PLOT_SIZE_PX = (960, 580)


def draw_plot(rows: list[dict[str, Any]], title: str = "Streaming SwAV: evaluation against images seen"
              ) -> Figure | None:
    """Accuracy (left axis, %) and training loss (right axis) against images seen, with the
    reference accuracies (random-init backbone, raw pixels) as dashed levels when present.
    None when matplotlib is not installed."""
    figure = plotting.new_figure(*PLOT_SIZE_PX, PLOT_PNG)
    if figure is None:
        return None
    from matplotlib.ticker import EngFormatter

    figure.suptitle(title)
    accuracy_axis = figure.add_subplot()
    accuracy_axis.set_xlabel("images seen")
    accuracy_axis.set_ylabel("accuracy (%)", color=BLUE)
    if not rows:
        accuracy_axis.set(xticks=[], yticks=[])
        accuracy_axis.text(0.5, 0.5, "no evaluations yet", ha="center", va="center",
                           transform=accuracy_axis.transAxes)
        return figure
    accuracy_axis.xaxis.set_major_formatter(EngFormatter(sep=""))
    accuracy_axis.grid(color="#ebebeb")

    rows = sorted(rows, key=lambda r: r.get("images_seen") or 0)

    def series(key: str, scale: float) -> tuple[list[float], list[float]]:
        points = [(float(r.get("images_seen") or 0), scale * r[key]) for r in rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [x for x, _ in points], [y for _, y in points]

    for name, key, colour in (("random-init kNN", "random_knn_top1", GREY),
                              ("random-init, data BN kNN", "random_bn_knn_top1", TEAL),
                              ("raw-pixel kNN", "pixels_knn_top1", PURPLE),
                              ("raw-pixel linear probe", "pixels_probe_top1", PINK)):
        _, values = series(key, 100.0)
        if values:
            # The references do not change with training: a level at their mean.
            level = sum(values) / len(values)
            accuracy_axis.axhline(level, color=colour, linestyle="--", linewidth=2,
                                  label=f"{name} ({level:.1f}%)")
    for name, key, colour in (("kNN top-1", "knn_top1", BLUE), ("linear probe top-1", "probe_top1", GREEN)):
        xs, values = series(key, 100.0)
        if values:
            accuracy_axis.plot(xs, values, color=colour, linewidth=2.5, marker="o",
                               label=f"{name} (last {values[-1]:.1f}%)")
    accuracy_axis.set_xlim(left=0)
    handles, labels = accuracy_axis.get_legend_handles_labels()
    xs, losses = series("loss", 1.0)
    if losses:
        loss_axis = accuracy_axis.twinx()
        loss_axis.set_ylabel("training loss", color=ORANGE)
        line, = loss_axis.plot(xs, losses, color=ORANGE, linewidth=2.5, marker="o")
        handles.append(line)
        labels.append(f"training loss (last {losses[-1]:.3f})")
    # Under the axes, where the legend can hide no data.
    figure.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    return figure


def write_plot(results_jsonl: str | Path, png_path: str | Path) -> Path | None:
    """Draw the rows of `results_jsonl` into `png_path` (written atomically); returns the path, or None
    when matplotlib is not installed."""
    figure = draw_plot(read_results(results_jsonl))
    if figure is None:
        return None
    storage.write_bytes_atomic(str(png_path), plotting.png_bytes(figure), StorageConfig())
    return Path(png_path)


# ---- evaluation loop ----------------------------------------------------------------------------------


class Follower:
    """Evaluates checkpoints of one folder against fixed labelled shards, each step once."""

    def __init__(self, checkpoints: str, train: str, test: str, out_dir: str | Path,
                 storage_cfg: StorageConfig | None = None, *, probe: bool = False, references: bool = False,
                 k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, image_size: int = 0,
                 batch_size: int = 256, device: torch.device | None = None, max_train: int = 0, max_test: int = 0,
                 metrics: EvalMetrics | None = None) -> None:
        self.checkpoints = checkpoints.rstrip("/")
        self.train, self.test = train, test
        self.storage_cfg = storage_cfg or StorageConfig()
        self.probe, self.references = probe, references
        self.k, self.temperature = k, temperature
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device or pick_device()
        self.max_train, self.max_test = max_train, max_test
        self.metrics = metrics
        # Step -> why its last evaluation failed: retried at every round, logged again only when the
        # reason changes (a damaged milestone is retained for good).
        self.failed: dict[int, str] = {}
        self.results = ResultLog(out_dir)
        # latest.json's `time` at the last round of `evaluate_retained` (an object: none yet).
        self.latest_time_seen: object = object()
        self.plot_path = self.results.out_dir / PLOT_PNG
        self._data: dict[int, EvalData] = {}
        self._reference_rows: dict[tuple[str, bool, int], dict[str, float]] = {}
        if self.metrics is not None and self.results.rows:
            last = max(self.results.rows, key=lambda r: r["step"])
            self.metrics.observe_evaluation(step=last["step"], images_seen=last.get("images_seen") or 0,
                                            knn_top1=last["knn_top1"], duration_s=last.get("eval_seconds") or 0.0)

    def _eval_data(self, size: int) -> EvalData:
        if size not in self._data:
            log.info("loading evaluation images at %d px from %s and %s", size, self.train, self.test)
            self._data[size] = load_eval_data(self.train, self.test, size, self.storage_cfg, self.max_train,
                                              self.max_test)
        return self._data[size]

    def _references(self, resolved: ResolvedCheckpoint, data: EvalData) -> dict[str, float]:
        key = (resolved.spec, data.image_size)
        if key not in self._reference_rows:
            mean, std = resolved.normalization()
            rows = reference_rows(resolved.spec, data, mean, std, k=self.k,
                                  temperature=self.temperature, probe=self.probe, batch_size=self.batch_size,
                                  device=self.device)
            self._reference_rows[key] = {
                f"{REFERENCE_PREFIXES[row['features']]}_{metric}": row[metric]
                for row in rows for metric in ("knn_top1", "probe_top1") if metric in row}
        return self._reference_rows[key]

    def evaluate(self, resolved: ResolvedCheckpoint, probe: bool | None = None) -> dict[str, Any]:
        """Evaluate one checkpoint, record the row (jsonl, csv, plot, gauges) and return it; `probe`
        overrides the follower's own setting for this checkpoint (not for the references)."""
        started = time.monotonic()
        size = self.image_size or resolved.global_crop_size()
        if not size:
            raise ValueError(f"{resolved.url}: no crops.global_size in the checkpoint's configuration; "
                             f"pass --image-size")
        data = self._eval_data(size)
        mean, std = resolved.normalization()
        scores = evaluate_backbone(load_resolved_backbone(resolved, self.storage_cfg), "checkpoint", data, mean,
                                   std, k=self.k, temperature=self.temperature,
                                   probe=self.probe if probe is None else probe,
                                   batch_size=self.batch_size, device=self.device)
        metrics = resolved.record.get("metrics") if isinstance(resolved.record.get("metrics"), dict) else {}
        loss = metrics.get("loss")
        row: dict[str, Any] = {
            "step": int(resolved.step if resolved.step is not None else -1),
            "images_seen": resolved.images_seen,
            "knn_top1": scores["knn_top1"],
            "probe_top1": scores.get("probe_top1"),
            "loss": loss if isinstance(loss, (int, float)) and math.isfinite(loss) else None,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "checkpoint_time": resolved.record.get("time"),
            "checkpoint": resolved.backbone_url,
            "image_size": size,
            "train_count": len(data.train),
            "test_count": len(data.test),
        }
        if self.references:
            row.update(self._references(resolved, data))
        row["eval_seconds"] = round(time.monotonic() - started, 3)
        self.results.append(row)
        write_plot(self.results.jsonl, self.plot_path)
        if self.metrics is not None:
            self.metrics.observe_evaluation(step=row["step"], images_seen=row["images_seen"] or 0,
                                            knn_top1=row["knn_top1"], duration_s=row["eval_seconds"])
        log.info("step %d (%s images): kNN top-1 %.2f%%%s", row["step"], row["images_seen"],
                 100 * row["knn_top1"],
                 f", linear {100 * row['probe_top1']:.2f}%" if row["probe_top1"] is not None else "")
        return row

    def poll(self) -> dict[str, Any] | None:
        """Evaluate the checkpoint latest.json names if it is new; the row, or None."""
        latest = ckpt.read_latest(self.checkpoints, self.storage_cfg)
        if latest is None or self.results.evaluated(latest["step"], latest.get("time")):
            return None
        return self.evaluate(resolve_checkpoint(self.checkpoints, self.storage_cfg, record=latest))

    def evaluate_retained(self, probe_newest_only: bool = False) -> list[dict[str, Any]]:
        """Evaluate every complete step folder present that has no result yet, oldest first;
        `probe_newest_only` runs the linear probe (when the follower has it on) on the newest only."""
        try:
            latest = ckpt.read_latest(self.checkpoints, self.storage_cfg)
            latest_time: object = latest.get("time") if latest is not None else None
        except (*storage.TRANSIENT_ERRORS, ValueError):
            latest_time = object()  # unknown: look at every step
        # A step evaluated already is looked at again only after a save (latest.json moved since the
        # last round), as a step saved again comes with one: reading every retained meta.json each
        # round would cost a request per milestone per round on S3.
        recheck = latest_time != self.latest_time_seen
        self.latest_time_seen = latest_time
        pending = []
        for step, url in sorted(ckpt.list_step_dirs(self.checkpoints, self.storage_cfg).items()):
            if step in self.results.steps and not recheck:
                continue
            try:
                # By the time it was saved, not by step alone: a step saved again (a run resumed from an
                # older checkpoint) is another checkpoint, as `poll` has it.
                record = storage.read_json(storage.join_url(url, ckpt.META), self.storage_cfg)
            except (*storage.TRANSIENT_ERRORS, ValueError) as error:
                self.count_failure(step, error)
                continue
            saved_at = record.get("time") if isinstance(record, dict) else None
            if record is not None and not self.results.evaluated(step, saved_at if isinstance(saved_at, str) else None):
                pending.append((step, url))
        rows = []
        for i, (step, url) in enumerate(pending):
            newest = i == len(pending) - 1
            try:
                ckpt.check_contained(self.checkpoints, url, self.storage_cfg)
                rows.append(self.evaluate(resolve_checkpoint(url, self.storage_cfg),
                                          probe=self.probe and newest if probe_newest_only else None))
            except (*storage.TRANSIENT_ERRORS, ValueError, RuntimeError) as error:
                # One damaged checkpoint must not hold back the others, nor the latest.
                self.count_failure(step, error)
                continue
            self.failed.pop(step, None)
        return rows

    def count_failure(self, step: int | None, error: BaseException) -> None:
        """An evaluation that failed: counted, and logged unless it failed the same way before."""
        why = logs.error_line(error, with_type=True)
        if self.metrics is not None:
            self.metrics.count_failure()
        if step is None or self.failed.get(step) != why:
            log.error("evaluation failed for %s: %s", "the latest checkpoint" if step is None else f"step {step}", why)
        if step is not None:
            self.failed[step] = why


def evaluate_checkpoints(checkpoint_dir: str | Path, train: str, test: str, *,
                         storage_cfg: StorageConfig | None = None, out_dir: str | Path, references: bool = False,
                         probe: bool = False, probe_newest_only: bool = False,
                         **options: Any) -> list[dict[str, Any]]:
    """Evaluate every retained checkpoint not evaluated yet (see `Follower`); returns all rows
    of out_dir/results.jsonl, oldest step first. `probe_newest_only`: the linear probe (when `probe`)
    runs on the newest checkpoint only, the others get kNN."""
    follower = Follower(str(checkpoint_dir), str(train), str(test), out_dir, storage_cfg, probe=probe,
                        references=references, **options)
    follower.evaluate_retained(probe_newest_only)
    write_plot(follower.results.jsonl, follower.plot_path)
    return sorted(follower.results.rows, key=lambda r: r["step"])


# ---- command line -------------------------------------------------------------------------------------


def check_inputs(train: str, test: str, checkpoints: str, once: bool, storage_cfg: StorageConfig) -> None:
    """Refuse, in one line naming the option, evaluation shards that are not there (a follower would
    fail at every poll, for days); a checkpoint folder that does not exist is refused with --once
    and waited for otherwise (the run may not have saved yet), with a warning."""
    for option, url in (("--train", train), ("--test", test)):
        try:
            found = ShardSource(url, storage_cfg).list_shards()
        except UsageError:
            raise
        except Exception as error:  # noqa: BLE001 - a storage failure becomes one line; anything else is raised
            storage.raise_as_usage(error, option, url, storage_cfg)
        if not found:
            raise UsageError(f"{option}: no shards at {url}; give labelled evaluation shards (a folder, s3:// "
                             f"prefix, brace pattern or .txt list; `stream-swav make-shards` makes them)")
    try:
        there = storage.exists(checkpoints, storage_cfg)
    except Exception as error:  # noqa: BLE001 - as above
        storage.raise_as_usage(error, "--checkpoints", checkpoints, storage_cfg)
    if not there:
        if once:
            raise UsageError(f"--checkpoints: {checkpoints} does not exist; give the checkpoint.dir of a run")
        log.warning("--checkpoints %s does not exist (yet): waiting for a run to save there", checkpoints)


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.temperature <= 0 or args.interval_s <= 0 or not 0 <= args.port <= 65535:
        print("follow: need --k >= 1, --temperature > 0, --interval-s > 0, --port in [0, 65535]", file=sys.stderr)
        return 2
    storage_cfg = StorageConfig(endpoint_url=args.endpoint_url)
    check_inputs(args.train, args.test, args.checkpoints, args.once, storage_cfg)
    metrics = EvalMetrics()
    follower = Follower(args.checkpoints, args.train, args.test, args.out,
                        storage_cfg, probe=args.probe,
                        references=args.references, k=args.k, temperature=args.temperature,
                        image_size=args.image_size, batch_size=args.batch_size, device=pick_device(args.device),
                        max_train=args.max_train, max_test=args.max_test, metrics=metrics)
    if not args.once:
        try:
            port = metrics.start_server(args.host, args.port)
        except OSError as error:
            raise UsageError(f"--port: cannot serve metrics on {args.host}:{args.port} ({error.strerror or error}); "
                             f"choose another port, or 0 for any free one") from error
        log.info("evaluation metrics on http://%s:%d/metrics", args.host, port)
    try:
        while True:
            if args.all:
                follower.evaluate_retained()
            try:
                follower.poll()
            except (*storage.TRANSIENT_ERRORS, ValueError, RuntimeError) as error:
                # A checkpoint pruned between listing and loading, a storage hiccup (a network blip
                # must not end a follower that runs for days), a damaged file: report it and try
                # again at the next poll (the step was not recorded as done).
                follower.count_failure(None, error)
                if args.once:
                    return 1
            if args.once:
                return 1 if follower.failed else 0
            time.sleep(args.interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        metrics.stop_server()
