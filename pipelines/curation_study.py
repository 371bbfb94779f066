"""What online curation recovers on the messy-stream benchmark: clean vs messy vs messy with dedup,
each trained through the real runtime and scored on the full Fashion-MNIST split.

``python -m pipelines.curation_study --out runs/curation --seeds 0,1,2 [--images 153600]
[--conditions clean,messy,messy-dedup] [--stream-seed 0] [--duplicate-fraction 0.4 ...]``

Conditions: `clean`, `messy` (no curation), `messy-dedup` (curation.dedup), `messy-dedup-balance`
(and curation.balance 0.5), `messy-balance` (curation.balance 1, no dedup), `messy-dedup-equal-steps`
(dedup, budget in images trained), `messy-density` (curation.balance 1.5 by the density of the projected
features, no dedup), `messy-label` (curation.balance 1 by the stream's labels: the perfect signal as
weights), `messy-resample-label` and `messy-resample-density` (the same signals resampling: rare
images shown again with fresh crops, budget in images trained; `messy-dedup-resample-label` and
`messy-dedup-resample-density` after dedup; `messy-resample-reference` and
`messy-dedup-resample-reference` by a curated reference: 200 images of the clean stream
(`-0.9`: placing an image only at cosine similarity 0.9 to its anchor, not 0.8);
`messy-perfect-dedup-resample-reference` and `-label` the same on the messy stream without its
repeats, `messy_stream.deduped_entries`: what a perfect near-copy detector would add), `oracle` (the
messy stream's distinct images balanced by their labels, `messy_stream.oracle_entries`: the ceiling
of any concept balancing).

1. The benchmark stream (`pipelines.messy_stream`, its knobs as given, ``--stream-seed``) under
   OUT/stream, and the demo's evaluation shards (the whole 60k training split as the labelled
   index and probe set, the 10k test split as queries) under OUT/shards.
2. Every (condition, seed) trains the demo's CPU recipe (`pipelines.quality.run_config`; with the
   stride-2 stem it was measured with, `RECIPE`) with the
   driver's `train`, what `stream-swav train` runs, for the same number of images *read from the
   stream* (``--images``): the clean and messy streams train every image they read; with dedup,
   a pass trains only the images it keeps, so the run's image budget is ``--images`` times the
   share a pass keeps (measured once per stream by the same hash and seen-set, `dedup_study`),
   except in `messy-dedup-equal-steps`, which trains ``--images`` images.
   train.seed and data.seed are the run's seed.
3. The final checkpoint is scored as the quality study scores (weighted kNN, the library's
   linear probe); raw pixels and the random-init backbone are scored once.
4. One row per run in OUT/results.jsonl (runs already there are skipped); OUT/results.md gives
   mean ± sample std per condition and the differences to `messy` paired by seed. Use one OUT per
   set of stream knobs: OUT/stream is built once.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipelines import dedup_study, messy_stream
from pipelines.quality import evaluate_run, references, run_config
from stream_swav import logs
from stream_swav.apps.datasets import require_fashion_mnist
from stream_swav.apps.demo import demo_shards
from stream_swav.apps.evaluate import load_eval_data, pick_device
from stream_swav.apps.follow import append_jsonl, read_jsonl
from stream_swav.checkpoint import resolve_checkpoint
from stream_swav.config import CurationConfig, merge_dicts
from stream_swav.curation import SeenSet
from stream_swav.data.multicrop import min_decode_side

log = logging.getLogger("stream_swav.curation_study")

# Every condition's recipe: the demo's, with the stride-2 stem this study was measured with (docs/curation.md;
# the demo's stride-1 stem costs twice the time per image).
RECIPE: dict[str, Any] = {"model": {"stem_stride": 2}}

# The reference signal's settings; {stream} is OUT/stream. Similarity 0.8 since the stream is placed by
# its eval-mode view (2026-12-07; 0.6 before): real images reach it (99% at 0.78 or more on the harsher
# stream, 95% at 0.925 on the 50x one), most junk does not (median 0.49 and 0.60; docs/curation.md).
REFERENCE: dict[str, Any] = {"balance": 1.0, "balance_signal": "reference", "balance_reference": "{stream}/clean",
                             "balance_reference_images": 200, "balance_momentum": 0.998,
                             "balance_reference_similarity": 0.8}

# condition -> (stream folder under OUT/stream, recipe overrides, whether the budget counts images read
# (a dedup run trains fewer) or trained)
CONDITIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "clean": ("clean", {}, "read"),
    "messy": ("messy", {}, "read"),
    "messy-dedup": ("messy", {"curation": {"dedup": True}}, "read"),
    "messy-dedup-balance": ("messy", {"curation": {"dedup": True, "balance": 0.5}}, "read"),
    # Balance alone, at full strength: what the network's prototype usage does against the imbalance.
    "messy-balance": ("messy", {"curation": {"balance": 1.0}}, "read"),
    # Balance alone by the density of the projected features (docs/curation.md: the own-model signal
    # that sees the most of the imbalance offline).
    "messy-density": ("messy", {"curation": {"balance": 1.5, "balance_signal": "density"}}, "read"),
    # Balance by the labels the stream carries: the perfect signal, weighing instead of resampling.
    "messy-label": ("messy", {"curation": {"balance": 1.0, "balance_signal": "label"}}, "read"),
    # Resampling instead of weighing (curation.balance_mode resample): images the signal finds rare
    # are shown again with fresh crops; as many images trained as `messy` (replays included), so
    # fewer read from the stream, as `oracle`. By the labels, then by the density.
    "messy-resample-label": ("messy", {"curation": {"balance": 1.0, "balance_signal": "label",
                                                    "balance_mode": "resample"}}, "trained"),
    "messy-resample-density": ("messy", {"curation": {"balance": 1.5, "balance_signal": "density",
                                                      "balance_mode": "resample"}}, "trained"),
    # Repeats dropped first, so that neither signal is dominated by the floods' copies.
    "messy-dedup-resample-label": ("messy", {"curation": {"dedup": True, "balance": 1.0, "balance_signal": "label",
                                                          "balance_mode": "resample"}}, "trained"),
    "messy-dedup-resample-density": ("messy", {"curation": {"dedup": True, "balance": 1.5, "balance_signal": "density",
                                                            "balance_mode": "resample"}}, "trained"),
    # Resampling by a curated reference (DINOv2's retrieval, online): 200 images of the clean stream
    # (about 20 per class, unlabelled to the run) are the anchors; a stream image's anchor is its most
    # similar one, if cosine similarity 0.8 is reached (junk mostly is not: docs/curation.md); a slow
    # estimate, as 200 anchors share each batch.
    "messy-resample-reference": ("messy", {"curation": {**REFERENCE, "balance_mode": "resample"}}, "trained"),
    "messy-dedup-resample-reference": ("messy", {"curation": {**REFERENCE, "dedup": True,
                                                              "balance_mode": "resample"}}, "trained"),
    # A stricter placement: at 0.8, 39% of the 50x stream's junk is placed, most of it at the rare
    # classes' anchors (sandal's hold 89% junk); at 0.9, 3%, with 97.5% of real images placed
    # (docs/curation.md, "Where the reference's weights go wrong").
    "messy-dedup-resample-reference-0.9": ("messy", {"curation": {**REFERENCE, "balance_reference_similarity": 0.9,
                                                                  "dedup": True, "balance_mode": "resample"}},
                                           "trained"),
    # Up to 20 or 40 shows instead of 10, within the same replay budget: at 50x a rare class needs
    # 50. Offline (balance_signals --resample N, seed 0) the reference takes the 50x stream's
    # classes to 0.354 (20) and 0.306 (40) from balanced, against 0.406 at 10 shows.
    "messy-dedup-resample-reference-0.9-shows20": ("messy", {"curation": {
        **REFERENCE, "balance_reference_similarity": 0.9, "dedup": True, "balance_mode": "resample",
        "resample_max_shows": 20}}, "trained"),
    "messy-dedup-resample-reference-0.9-shows40": ("messy", {"curation": {
        **REFERENCE, "balance_reference_similarity": 0.9, "dedup": True, "balance_mode": "resample",
        "resample_max_shows": 40}}, "trained"),
    # Skipping as well as replaying (curation.resample_min_shows): the batch's median weight is shown
    # once, what looks more over-represented less than once (at least a tenth), and what is near no
    # anchor a tenth of a time in a batch it places half of, as DINOv2 keeps only what retrieval
    # finds near curated data. Offline (docs/curation.md) this takes the 50x stream's classes to
    # 0.31 from balanced, against 0.39 without skipping and 0.22 by the labels; in training it does
    # not help.
    "messy-dedup-skip-reference": ("messy", {"curation": {**REFERENCE, "balance_reference_similarity": 0.9,
                                                          "dedup": True, "balance_mode": "resample",
                                                          "resample_quantile": 0.5, "resample_min_shows": 0.1}},
                                   "trained"),
    "messy-dedup-skip-label": ("messy", {"curation": {"dedup": True, "balance": 1.0, "balance_signal": "label",
                                                      "balance_mode": "resample", "resample_quantile": 0.5,
                                                      "resample_min_shows": 0.1}}, "trained"),
    # What catching every near copy would add: the messy stream without its repeats (`messy_stream
    # .deduped_entries`, a perfect detector, by the stream's own records), the hash dedup still on
    # (it drops the solid junk, all one hash), then resampled as above.
    "messy-perfect-dedup-resample-reference": ("deduped", {"curation": {**REFERENCE, "dedup": True,
                                                                        "balance_mode": "resample"}}, "trained"),
    "messy-perfect-dedup-resample-label": ("deduped", {"curation": {"dedup": True, "balance": 1.0,
                                                                    "balance_signal": "label",
                                                                    "balance_mode": "resample"}}, "trained"),
    # The same compute as `messy`: as many images trained, so more passes read.
    "messy-dedup-equal-steps": ("messy", {"curation": {"dedup": True}}, "trained"),
    # Labels balance the distinct images perfectly: what a balancing signal could reach at best.
    "oracle": ("oracle", {}, "read"),
}


def kept_share(stream: Path, min_side: int, cache: Path) -> float:
    """The share of a pass over `stream` that dedup (the default distance and repeats) keeps, the
    images decoded as a worker whose largest crop is `min_side` decodes them."""
    if cache.is_file():
        return json.loads(cache.read_text())["kept_share"]
    defaults = CurationConfig()
    scored = dedup_study.score(dedup_study.stream_hashes(stream, min_side),
                               SeenSet(10_000_000, defaults.dedup_max_distance, defaults.max_repeats))
    share = scored["images_kept"] / scored["images"]
    cache.write_text(json.dumps({**scored, "kept_share": share}, indent=2) + "\n")
    return share


def _pm(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * values[0]:.2f}" if values else "-"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def format_markdown(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> str:
    by_condition: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_condition.setdefault(row["condition"], {})[row["seed"]] = row
    lines = ["| condition | seeds | images trained | kNN top-1 | linear probe | kNN vs messy (paired) | "
             "probe vs messy (paired) | train images/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    messy = by_condition.get("messy", {})
    for name in [c for c in CONDITIONS if c in by_condition]:
        runs = by_condition[name]
        seeds = sorted(runs)
        diffs = {metric: [runs[s][metric] - messy[s][metric] for s in seeds if s in messy]
                 for metric in ("knn_top1", "probe_top1")}
        rate = [runs[s]["images_seen"] / runs[s]["train_seconds"] for s in seeds]
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {runs[seeds[0]]['images_seen']:,} | "
                     f"{_pm([runs[s]['knn_top1'] for s in seeds])} | {_pm([runs[s]['probe_top1'] for s in seeds])} | "
                     + " | ".join("-" if name == "messy" or not d else f"{_pm(d)}" for d in diffs.values())
                     + f" | {statistics.mean(rate):.0f} |")
    for ref in ("raw-pixels", "random-init"):
        lines.append(f"| {ref} | | | {100 * refs[ref]['knn_top1']:.2f} | {100 * refs[ref]['probe_top1']:.2f} | | | |")
    return "\n".join(lines) + "\n"


def run_study(args: argparse.Namespace) -> int:
    from stream_swav.runtime.driver import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.conditions.split(",")
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        print(f"curation_study: unknown condition(s) {', '.join(unknown)}; known: {', '.join(CONDITIONS)}",
              file=sys.stderr)
        return 2
    try:
        spec = messy_stream.MessySpec(args.imbalance_ratio, args.duplicate_fraction, args.pool_fraction,
                                      args.near_fraction, args.junk_fraction, args.stream_seed)
    except ValueError as err:
        print(f"curation_study: {err}", file=sys.stderr)
        return 2
    messy_stream.build(out / "stream", spec, data_dir=args.data_dir,
                       oracle=any(CONDITIONS[n][0] == "oracle" for n in names),
                       deduped=any(CONDITIONS[n][0] == "deduped" for n in names))
    made = demo_shards(out / "shards", eval_train=60_000, eval_test=10_000, dataset="fashion-mnist",
                       data_dir=args.data_dir)
    recipe = run_config(args.images, RECIPE, [], 0, made.train, str(out / "unused"))
    share = kept_share(out / "stream" / "messy", min_decode_side(recipe.crops), out / "kept.json")
    device = pick_device("auto")
    data = load_eval_data(made.eval_train, made.eval_test, made.image_size)
    refs_path = out / "references.json"
    if not refs_path.is_file():
        refs_path.write_text(json.dumps(references(recipe, data, device, False), indent=2) + "\n")
    refs = json.loads(refs_path.read_text())
    results = out / "results.jsonl"
    failures = 0
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            stream, overrides, budget = CONDITIONS[name]
            overrides = merge_dicts(RECIPE, overrides)
            if "balance_reference" in overrides.get("curation", {}):
                overrides["curation"]["balance_reference"] = overrides["curation"]["balance_reference"].format(
                    stream=out / "stream")
            done = [r for r in read_jsonl(results) if (r["condition"], r["seed"], r["images_read"]) ==
                    (name, seed, args.images) and r.get("stream", asdict(messy_stream.MessySpec())) == asdict(spec)]
            if done:
                continue
            checkpoint_dir = out / "checkpoints" / f"{name}-s{seed}-{args.images}"
            cfg = run_config(args.images, overrides, [], seed, str(out / "stream" / stream), str(checkpoint_dir))
            images = args.images
            if cfg.curation.dedup and budget == "read":
                images = round(args.images * share / cfg.global_batch) * cfg.global_batch
                cfg = run_config(images, overrides, [], seed, str(out / "stream" / stream), str(checkpoint_dir))
            reads = f" ({args.images} read)" if budget == "read" else " (replays or dedup's drops make the reads differ)"
            log.info("%s seed %d: %d images trained%s", name, seed, images, reads)
            started = time.monotonic()
            if train(cfg) != 0:
                log.error("%s seed %d: training failed; no row written", name, seed)
                failures += 1
                continue
            train_seconds = round(time.monotonic() - started, 1)
            row = evaluate_run(resolve_checkpoint(str(checkpoint_dir)), data, device, False)
            row.update({"condition": name, "seed": seed, "images_read": args.images, "train_seconds": train_seconds,
                        "stream": asdict(spec)})
            append_jsonl(results, row)
            log.info("%s seed %d: kNN %.2f%%, probe %.2f%%", name, seed, 100 * row["knn_top1"],
                     100 * row["probe_top1"])
            (out / "results.md").write_text(format_markdown(read_jsonl(results), refs))
    (out / "results.md").write_text(format_markdown(read_jsonl(results), refs))
    print((out / "results.md").read_text())
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.curation_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/curation", help="folder for streams, shards, checkpoints, results")
    parser.add_argument("--conditions", default="clean,messy,messy-dedup", help=f"from: {', '.join(CONDITIONS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (train.seed and data.seed)")
    parser.add_argument("--images", type=int, default=153_600, help="images read from the stream per run")
    parser.add_argument("--stream-seed", type=int, default=0, help="the messy stream's seed")
    defaults = messy_stream.MessySpec()
    for knob in ("imbalance_ratio", "duplicate_fraction", "pool_fraction", "near_fraction", "junk_fraction"):
        parser.add_argument(f"--{knob.replace('_', '-')}", type=float, default=getattr(defaults, knob),
                            help=f"the messy stream's {knob} (default {getattr(defaults, knob):g})")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: searched)")
    args = parser.parse_args(argv)
    try:  # refused before any stream or run folder is written
        require_fashion_mnist(args.data_dir, hint="set --data-dir")
    except FileNotFoundError as err:
        print(f"curation_study: {err}", file=sys.stderr)
        return 2
    logs.configure()
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
