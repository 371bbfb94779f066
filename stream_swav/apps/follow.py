"""`stream-swav follow`: evaluate each new checkpoint of a running (or finished) training.

Polls the checkpoint folder's latest.json; when it names a step not evaluated
yet, that checkpoint's backbone gets a weighted kNN (and optionally linear
probe) evaluation on labelled shards. Each result is appended to
``results.jsonl`` (the record of what was done: on restart, steps found there
are not evaluated again), ``results.csv`` is rewritten from it, a PNG plot of
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
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from stream_swav.apps.evaluate import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    EvalData,
    evaluate_backbone,
    load_eval_data,
    pick_device,
    reference_rows,
)
from stream_swav import storage
from stream_swav.config import StorageConfig
from stream_swav import checkpoint as ckpt
from stream_swav.checkpoint import ResolvedCheckpoint, load_resolved_backbone, resolve_checkpoint
from stream_swav.runtime.metrics import EvalMetrics

log = logging.getLogger(__name__)

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
PLOT_PNG = "accuracy.png"
CSV_COLUMNS = ("step", "images_seen", "knn_top1", "probe_top1", "loss", "random_knn_top1", "random_bn_knn_top1",
               "pixels_knn_top1", "time", "eval_seconds", "checkpoint")
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

    def append(self, row: dict[str, Any]) -> None:
        append_jsonl(self.jsonl, row, allow_nan=False)
        self.rows.append(row)
        write_csv(self.rows, self.csv)


# ---- plot ---------------------------------------------------------------------------------------------


def nice_ticks(low: float, high: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    low, high = min(low, high), max(low, high)
    if high - low < 1e-12:
        pad = max(abs(low) * 0.05, 1e-6)
        low, high = low - pad, high + pad
    raw = (high - low) / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    count = int(round((last - first) / step))
    return [round(first + i * step, 10) for i in range(count + 1)]


def _padded(values: list[float], share: float = 0.03) -> tuple[float, float]:
    """min and max widened a little, so no series runs along the frame."""
    low, high = min(values), max(values)
    pad = (high - low) * share
    return low - pad, high + pad


def _short_number(value: float) -> str:
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def _dashed_line(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float],
                 fill: tuple[int, int, int], width: int = 2, dash: int = 8) -> None:
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    for offset in range(0, int(length), 2 * dash):
        a, b = offset / length, min(offset + dash, length) / length
        draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                  fill=fill, width=width)


BLUE, GREEN, ORANGE, GREY, PURPLE = (31, 94, 180), (40, 150, 70), (220, 110, 20), (130, 130, 130), (150, 60, 160)
TEAL = (0, 140, 140)


def draw_plot(rows: list[dict[str, Any]], title: str = "Streaming SwAV: evaluation against images seen",
              size: tuple[int, int] = (960, 580)) -> Image.Image:
    """Accuracy (left axis, %) and training loss (right axis) against images seen, with the
    reference accuracies (random-init backbone, raw pixels) as dashed lines when present."""
    width, height = size
    left, right, top, bottom = 80, 80, 56, 110
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    draw.text((width / 2, 14), title, fill="black", font=ImageFont.load_default(size=17), anchor="mt")

    rows = sorted(rows, key=lambda r: r.get("images_seen") or 0)
    xs = [float(r.get("images_seen") or 0) for r in rows]

    def series(key: str) -> list[tuple[float, float]]:
        return [(x, 100.0 * r[key] if key != "loss" else r[key]) for x, r in zip(xs, rows)
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    accuracy = {"kNN top-1": (series("knn_top1"), BLUE), "linear probe top-1": (series("probe_top1"), GREEN)}
    references = {"random-init kNN": (series("random_knn_top1"), GREY),
                  "random-init, data BN kNN": (series("random_bn_knn_top1"), TEAL),
                  "raw-pixel kNN": (series("pixels_knn_top1"), PURPLE)}
    loss = series("loss")
    plot_box = (left, top, width - right, height - bottom)
    draw.rectangle(plot_box, outline="black", width=1)
    if not rows:
        draw.text((width / 2, height / 2), "no evaluations yet", fill="black", font=font, anchor="mm")
        return image

    x_ticks = nice_ticks(min(xs + [0.0]), max(xs))
    accuracy_values = [v for points, _ in (*accuracy.values(), *references.values()) for _, v in points]
    acc_ticks = nice_ticks(*_padded(accuracy_values or [0.0, 100.0]), 5)
    loss_ticks = nice_ticks(*_padded([v for _, v in loss]), 5) if loss else []

    def to_px(x: float, y: float, ticks: list[float]) -> tuple[float, float]:
        fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (y - ticks[0]) / (ticks[-1] - ticks[0])
        return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

    for tick in x_ticks:
        px, _ = to_px(tick, acc_ticks[0], acc_ticks)
        draw.line([(px, top), (px, height - bottom)], fill=(235, 235, 235))
        draw.line([(px, height - bottom), (px, height - bottom + 5)], fill="black")
        draw.text((px, height - bottom + 8), _short_number(tick), fill="black", font=small, anchor="mt")
    for tick in acc_ticks:
        _, py = to_px(x_ticks[0], tick, acc_ticks)
        draw.line([(left, py), (width - right, py)], fill=(235, 235, 235))
        draw.line([(left - 5, py), (left, py)], fill="black")
        draw.text((left - 8, py), f"{tick:g}%", fill=BLUE, font=small, anchor="rm")
    for tick in loss_ticks:
        _, py = to_px(x_ticks[0], tick, loss_ticks)
        draw.line([(width - right, py), (width - right + 5, py)], fill="black")
        draw.text((width - right + 8, py), f"{tick:g}", fill=ORANGE, font=small, anchor="lm")
    draw.rectangle(plot_box, outline="black", width=1)
    draw.text(((left + width - right) / 2, height - bottom + 34), "images seen", fill="black", font=font,
              anchor="mm")
    draw.text((12, top - 22), "accuracy", fill=BLUE, font=font, anchor="lm")
    if loss:
        draw.text((width - 12, top - 22), "training loss", fill=ORANGE, font=font, anchor="rm")

    def polyline(points: list[tuple[float, float]], ticks: list[float], color: tuple[int, int, int]) -> None:
        pixels = [to_px(x, y, ticks) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=3, joint="curve")
        for px, py in pixels:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)

    legend: list[tuple[str, tuple[int, int, int], bool]] = []
    for name, (points, color) in references.items():
        if points:
            # The references do not change with training: a level line at their mean.
            level = sum(v for _, v in points) / len(points)
            _dashed_line(draw, to_px(x_ticks[0], level, acc_ticks), to_px(x_ticks[-1], level, acc_ticks), color)
            legend.append((f"{name} ({level:.1f}%)", color, True))
    for name, (points, color) in accuracy.items():
        if points:
            polyline(points, acc_ticks, color)
            legend.append((f"{name} (last {points[-1][1]:.1f}%)", color, False))
    if loss:
        polyline(loss, loss_ticks, ORANGE)
        legend.append((f"training loss (last {loss[-1][1]:.3f})", ORANGE, False))

    # The legend sits in rows under the axis title, where it can hide no data.
    x, y = left, height - 44
    for text, color, dashed in legend:
        entry_width = 40 + draw.textlength(text, font=small) + 24
        if x + entry_width > width - right and x > left:
            x, y = left, y + 20
        if dashed:
            _dashed_line(draw, (x, y), (x + 30, y), color, dash=5)
        else:
            draw.line([(x, y), (x + 30, y)], fill=color, width=3)
        draw.text((x + 38, y), text, fill="black", font=small, anchor="lm")
        x += entry_width
    return image


def write_plot(results_jsonl: str | Path, png_path: str | Path) -> Path:
    """Draw the rows of `results_jsonl` into `png_path` (written atomically); returns the path."""
    buffer = io.BytesIO()
    draw_plot(read_results(results_jsonl)).save(buffer, format="PNG")
    storage.write_bytes_atomic(str(png_path), buffer.getvalue(), StorageConfig())
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
        self.results = ResultLog(out_dir)
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

    def evaluate(self, resolved: ResolvedCheckpoint) -> dict[str, Any]:
        """Evaluate one checkpoint, record the row (jsonl, csv, plot, gauges) and return it."""
        started = time.monotonic()
        size = self.image_size or resolved.global_crop_size()
        if not size:
            raise ValueError(f"{resolved.url}: no crops.global_size in the checkpoint's configuration; "
                             f"pass --image-size")
        data = self._eval_data(size)
        mean, std = resolved.normalization()
        scores = evaluate_backbone(load_resolved_backbone(resolved, self.storage_cfg), "checkpoint", data, mean,
                                   std, k=self.k, temperature=self.temperature, probe=self.probe,
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
        if latest is None or latest["step"] in self.results.steps:
            return None
        return self.evaluate(resolve_checkpoint(self.checkpoints, self.storage_cfg, record=latest))

    def evaluate_retained(self) -> list[dict[str, Any]]:
        """Evaluate every complete step folder present that has no result yet, oldest first."""
        rows = []
        for step, url in sorted(ckpt.list_step_dirs(self.checkpoints, self.storage_cfg).items()):
            if step in self.results.steps or not storage.exists(storage.join_url(url, ckpt.META), self.storage_cfg):
                continue
            ckpt.check_contained(self.checkpoints, url, self.storage_cfg)
            rows.append(self.evaluate(resolve_checkpoint(url, self.storage_cfg)))
        return rows


def evaluate_checkpoints(checkpoint_dir: str | Path, train: str, test: str, *,
                         storage_cfg: StorageConfig | None = None, out_dir: str | Path, references: bool = False,
                         probe: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Evaluate every retained checkpoint not evaluated yet (see `Follower`); returns all rows
    of out_dir/results.jsonl, oldest step first."""
    follower = Follower(str(checkpoint_dir), str(train), str(test), out_dir, storage_cfg, probe=probe,
                        references=references, **options)
    follower.evaluate_retained()
    write_plot(follower.results.jsonl, follower.plot_path)
    return sorted(follower.results.rows, key=lambda r: r["step"])


# ---- command line -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.k < 1 or args.temperature <= 0 or args.interval_s <= 0 or not 0 <= args.port <= 65535:
        print("follow: need --k >= 1, --temperature > 0, --interval-s > 0, --port in [0, 65535]", file=sys.stderr)
        return 2
    metrics = EvalMetrics()
    follower = Follower(args.checkpoints, args.train, args.test, args.out,
                        StorageConfig(endpoint_url=args.endpoint_url), probe=args.probe,
                        references=args.references, k=args.k, temperature=args.temperature,
                        image_size=args.image_size, batch_size=args.batch_size, device=pick_device(args.device),
                        max_train=args.max_train, max_test=args.max_test, metrics=metrics)
    if not args.once:
        port = metrics.start_server(args.host, args.port)
        log.info("evaluation metrics on http://%s:%d/metrics", args.host, port)
    try:
        while True:
            try:
                if args.all:
                    follower.evaluate_retained()
                follower.poll()
            except (OSError, ValueError, RuntimeError) as error:
                # A checkpoint pruned between listing and loading, a storage hiccup, a damaged file:
                # report it and try again at the next poll (the step was not recorded as done).
                metrics.count_failure()
                log.error("evaluation failed: %s: %s", type(error).__name__, error)
                if args.once:
                    return 1
            if args.once:
                return 0
            time.sleep(args.interval_s)
    except KeyboardInterrupt:
        return 0
    finally:
        metrics.stop_server()
