"""Learning-quality study: which recipe learns the most per image on Fashion-MNIST, on 2 CPU cores.

``python -m pipelines.quality --out runs/quality --variants base,cosine --seeds 0,1 --images 150000``

1. Shards, made once under OUT/shards: the demo's own (`demo_shards`: every
   Fashion-MNIST training image plus the demo's corrupt samples for training; the
   whole 60k training split as the labelled index and the whole 10k test split
   as queries).
2. Every (variant, seed) trains with the real runtime (the driver's `train`,
   what `stream-swav train` runs: local Ray, decode actors, learner actor,
   checkpoints) for exactly ``--images`` images, or with ``--minutes M`` for M
   minutes of training (--images the cap: variants of different speeds
   compared at equal wall-clock time). The recipe is the demo's CPU
   recipe (`demo_config`) at that image budget, then ``--set`` (for every run),
   then the variant's overrides (`VARIANTS`, winning over --set on their own
   keys); train.seed and data.seed are the run's seed.
3. The final checkpoint's backbone is evaluated on the full split: weighted
   kNN (k=20, cosine, T=0.07) and the library's linear probe (L-BFGS); with
   ``--sklearn`` also scikit-learn's LogisticRegression on the same
   standardised features and the same objective (C = 1 / (weight decay * N)),
   an independent solver for the probe's margin. The no-learning references
   (raw pixels, the random-init backbone of the base recipe) are scored once.
4. One row per run in OUT/results.jsonl; OUT/results.md (mean ± sample std
   over seeds per variant, with its kNN difference to `base` paired by seed)
   is rewritten after every run. Runs already in results.jsonl with the same
   variant, seed, image budget and overrides are skipped, so an interrupted
   study picks up where it stopped; ``--rescore`` scores their kept checkpoints again.

``--checkpoint NAME=DIR`` (repeatable) scores checkpoints trained elsewhere, e.g. by
``make demo``, the same way, as rows of variant NAME.

``--trend --budgets 150000,300000,600000`` instead trains each (variant, seed)
once to the largest budget, keeps its checkpoints at every budget and evaluates
them (the schedule is constant, so the checkpoint at N images is what a run of
N images writes), and plots accuracy against images seen beside the
references (OUT/trend.png).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stream_swav import logs, plotting, storage
from stream_swav.apps.datasets import require_fashion_mnist
from stream_swav.apps.demo import demo_config, demo_shards
from stream_swav.apps.evaluate import (EvalData, embed, knn_top1, linear_probe_top1, load_eval_data, pick_device,
                                       pixel_features, random_backbone, recalibrate_batchnorm, reference_rows,
                                       standardised)
from stream_swav.apps.follow import append_jsonl, read_jsonl
from stream_swav.checkpoint import ResolvedCheckpoint, load_resolved_backbone, resolve_checkpoint
from stream_swav.config import Config, StorageConfig, config_from_dict, load_config, merge_dicts
from stream_swav.model import BackboneSpec, ResNetTrunk

log = logging.getLogger("stream_swav.quality")

RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"
TREND_PNG = "trend.png"

# One factor at a time, each against `base` (the demo recipe as it stands). Values are
# `--set`-style overrides; a variant named in --variants must be here or be given with --variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "cosine": {"optim": {"schedule": "warmup-cosine"}},
    "lr-0.6": {"optim": {"base_lr": 0.6}},
    "lr-2.4": {"optim": {"base_lr": 2.4}},
    "sgd": {"optim": {"optimizer": "sgd", "base_lr": 0.3, "weight_decay": 5e-4}},
    "global-scale-0.2": {"crops": {"global_scale": [0.2, 1.0]}},
    "global-scale-0.5": {"crops": {"global_scale": [0.5, 1.0]}},
    "local-0": {"crops": {"local_count": 0}},
    "local-4": {"crops": {"local_count": 4}},
    "local-6": {"crops": {"local_count": 6}},
    "local-20px": {"crops": {"local_size": 20, "local_scale": [0.2, 0.5]}},
    "blur-off": {"augment": {"blur_prob_global": 0.0}},
    "jitter-off": {"augment": {"color_jitter_prob": 0.0}},
    "jitter-0.4": {"augment": {"brightness": 0.4, "contrast": 0.4}},
    "jitter-1.0": {"augment": {"brightness": 1.0, "contrast": 1.0}},
    "jitter-p1": {"augment": {"color_jitter_prob": 1.0}},
    "prototypes-256": {"model": {"prototypes": 256}},
    "prototypes-1024": {"model": {"prototypes": 1024}},
    "temperature-0.2": {"swav": {"temperature": 0.2}},
    "epsilon-0.03": {"swav": {"epsilon": 0.03}},
    "queue-off": {"swav": {"queue_length": 0}},
    "queue-on": {"swav": {"queue_length": 1024, "queue_start_images": 4096}},
    "queue-4096": {"swav": {"queue_length": 4096}},
    "freeze-off": {"swav": {"freeze_prototypes_steps": 0}},
    "batch-64": {"train": {"batch_size": 64}},
    "batch-256": {"train": {"batch_size": 256}},
    "width-24": {"model": {"width": 24}},
    "width-32": {"model": {"width": 32}},
    # A stride-1 stem: the first stage at the image's full 28x28 instead of 14x14, the last stage 4x4.
    "stem-1": {"model": {"stem_stride": 1}},
    "resnet18": {"model": {"arch": "resnet18"}},
    "head-128": {"model": {"output_dim": 128, "prototypes": 128}},
    "grid-1": {"model": {"feature_grid": 1}},
    "grid-2": {"model": {"feature_grid": 2}},
    "ema-0.99": {"optim": {"ema_momentum": 0.99}},
    # Combinations of the single factors that helped.
    "scale-0.5+jitter-0.4": {"crops": {"global_scale": [0.5, 1.0]}, "augment": {"brightness": 0.4, "contrast": 0.4}},
    "scale-0.5+jitter-0.4+local-0": {"crops": {"global_scale": [0.5, 1.0], "local_count": 0},
                                     "augment": {"brightness": 0.4, "contrast": 0.4}},
}


# ---- runs ---------------------------------------------------------------------------------------------


def run_id(variant: str, overrides: dict[str, Any], seed: int, images: int, minutes: float = 0.0) -> str:
    key = {"variant": variant, "overrides": overrides, "seed": seed, "images": images}
    text = json.dumps({**key, "minutes": minutes} if minutes else key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_config(images: int, overrides: dict[str, Any], extra: list[str], seed: int, shards: str,
               checkpoint_dir: str, minutes: float = 0.0) -> Config:
    """The demo recipe for `images` images (stopping earlier after `minutes` of training, when given)
    <- --set <- the variant's overrides <- this run's seed and paths. --set changes the base that every
    variant changes one thing of, so a variant's own keys win over it."""
    base = load_config(None, extra, base=demo_config(images, gpu=False))
    return config_from_dict(merge_dicts(merge_dicts(base.to_dict(), overrides), {
        "data": {"shards": shards, "seed": seed}, "train": {"seed": seed, "time_budget_s": 60.0 * minutes,
                                                            "image_budget": images, "progress_bar": False},
        # One checkpoint at the end is all the study reads.
        "checkpoint": {"dir": checkpoint_dir, "every_seconds": 0, "every_steps": 0, "keep_last": 1},
        "metrics": {"enabled": False}}))


def sklearn_probe_top1(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                       weight_decay: float = 1e-4) -> float:
    """scikit-learn's multinomial LogisticRegression on the same standardised features, with the
    library probe's objective: mean cross-entropy + weight_decay/2 * |W|^2 is sklearn's
    C * sum cross-entropy + |W|^2 / 2 with C = 1 / (weight_decay * N)."""
    from sklearn.linear_model import LogisticRegression

    train, test = standardised(train_feats, test_feats)
    # Up to 2,000 iterations at tol 1e-6: converged, not stopped. On the 784-d pixels that takes
    # ~15 minutes on 2 cores (scored once per output folder); on 128-d features a few.
    model = LogisticRegression(C=1.0 / (weight_decay * len(train)), max_iter=2000, tol=1e-6)
    model.fit(train.numpy(), train_labels.numpy())
    return float((model.predict(test.numpy()) == test_labels.numpy()).mean())


def score(train_feats: Tensor, test_feats: Tensor, data: EvalData, with_sklearn: bool) -> dict[str, float]:
    row = {"knn_top1": knn_top1(train_feats, data.train.labels, test_feats, data.test.labels),
           "probe_top1": linear_probe_top1(train_feats, data.train.labels, test_feats, data.test.labels)}
    if with_sklearn:
        row["sklearn_probe_top1"] = sklearn_probe_top1(train_feats, data.train.labels, test_feats, data.test.labels)
    return row


def embed_with_maps(backbone: torch.nn.Module, images: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The backbone's output, its third stage's map (N, C, H, W), and its last stage's map
    average-pooled to a 2x2 grid and flattened (on 28 px crops that map is 2x2 already: the grid keeps
    the coarse layout that global pooling throws away)."""
    map_layer3: list[Tensor] = []
    grid_layer4: list[Tensor] = []
    hooks = [backbone.layer3.register_forward_hook(
                 lambda _module, _inputs, output: map_layer3.append(output.float().cpu())),
             backbone.layer4.register_forward_hook(
                 lambda _module, _inputs, output: grid_layer4.append(
                     F.adaptive_avg_pool2d(output.float(), 2).flatten(1).cpu()))]
    try:
        final = embed(backbone, images, mean, std, device=device)
    finally:
        for hook in hooks:
            hook.remove()
    return final, torch.cat(map_layer3), torch.cat(grid_layer4)


# Feature kinds scored per run, by result-key prefix, with their table labels: "" is what backbone.pt
# returns (the last stage pooled globally, or to a grid with model.feature_grid); "l34_" the last two
# stages pooled and concatenated, as DINO's linear evaluation concatenates several blocks; "grid_" the
# last stage pooled to 2x2 and flattened, the small-grid pooling of conv features used in
# linear-evaluation benchmarks (Goyal et al., 2019); "l3map_" the third stage's whole map (4x4 on
# 28 px crops), more dimensions than the pixels, scored to show what an earlier, wider map gives.
FEATURE_KINDS = {"": "", "l34_": "layer3+4", "grid_": "2x2 grid", "l3map_": "layer3 map"}


def feature_sets(backbone: torch.nn.Module, data: EvalData, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """(index, query) features per kind in FEATURE_KINDS; only the output for backbones other
    than ResNets (the other kinds read a ResNet's stages)."""
    if not isinstance(backbone, ResNetTrunk):
        return {"": (embed(backbone, data.train.images, mean, std, device=device),
                     embed(backbone, data.test.images, mean, std, device=device))}
    train_final, train_l3, train_grid = embed_with_maps(backbone, data.train.images, mean, std, device)
    test_final, test_l3, test_grid = embed_with_maps(backbone, data.test.images, mean, std, device)

    def both(final: Tensor, layer3_map: Tensor) -> Tensor:
        # The third stage pooled globally; each part at unit norm, so neither dominates the cosine
        # similarity by its scale.
        return torch.cat([F.normalize(layer3_map.mean(dim=(2, 3)), dim=1), F.normalize(final, dim=1)], dim=1)

    return {"": (train_final, test_final), "l34_": (both(train_final, train_l3), both(test_final, test_l3)),
            "grid_": (train_grid, test_grid), "l3map_": (train_l3.flatten(1), test_l3.flatten(1))}


def evaluate_run(resolved: ResolvedCheckpoint, data: EvalData, device: torch.device,
                 with_sklearn: bool) -> dict[str, Any]:
    mean, std = resolved.normalization()
    features = feature_sets(load_resolved_backbone(resolved), data, mean, std, device)
    row: dict[str, Any] = {}
    for kind, (train_feats, test_feats) in features.items():
        row.update({kind + k: v for k, v in score(train_feats, test_feats, data, with_sklearn and not kind).items()})
    metrics = resolved.record.get("metrics", {})
    # The code that trained it (None in checkpoints written before it was recorded).
    return {**row, "step": resolved.step, "images_seen": resolved.images_seen, "final_loss": metrics.get("loss"),
            "code": resolved.record.get("code")}


def random_init_kinds(cfg: Config, data: EvalData, device: torch.device,
                      kinds: tuple[str, ...] = tuple(FEATURE_KINDS)[1:]) -> dict[str, dict[str, float]]:
    """The random-init backbone's (and the same with the data's BatchNorm statistics) scores for the
    feature kinds other than the output, which `reference_rows` scores."""
    out: dict[str, dict[str, float]] = {}
    random = random_backbone(BackboneSpec.from_config(cfg.model))
    for name, backbone in (("random-init", random), ("random-init-data-bn", recalibrate_batchnorm(
            random, data.train.images, cfg.augment.mean, cfg.augment.std, device=device))):
        out[name] = {}
        for kind, (train_feats, test_feats) in feature_sets(backbone, data, cfg.augment.mean, cfg.augment.std,
                                                            device).items():
            if kind in kinds:
                out[name].update({kind + k: v for k, v in score(train_feats, test_feats, data, False).items()})
    return out


def references(cfg: Config, data: EvalData, device: torch.device, with_sklearn: bool) -> dict[str, dict[str, float]]:
    """Raw pixels, the random-init backbone and the same with the data's BatchNorm statistics."""
    rows = reference_rows(BackboneSpec.from_config(cfg.model), data, cfg.augment.mean, cfg.augment.std,
                          device=device)
    out = {row["features"]: {"knn_top1": row["knn_top1"], "probe_top1": row["probe_top1"]} for row in rows}
    for name, values in random_init_kinds(cfg, data, device).items():
        out[name].update(values)
    if with_sklearn:
        pixels = (pixel_features(data.train.images, cfg.augment.mean, cfg.augment.std),
                  pixel_features(data.test.images, cfg.augment.mean, cfg.augment.std))
        out["raw-pixels"]["sklearn_probe_top1"] = sklearn_probe_top1(pixels[0], data.train.labels, pixels[1],
                                                                     data.test.labels)
    return out


# ---- reports ------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def format_markdown(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> str:
    """One line per (variant, images): seeds, kNN and probes as mean ± sample std, the kNN difference to
    `base` at the same budget (paired by seed), each other feature kind's kNN and probe, images/s
    (training time including Ray's start)."""
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["images"], row.get("minutes") or 0.0), []).append(row)
    other_kinds = [(prefix, label) for prefix, label in FEATURE_KINDS.items() if prefix]
    kind_headers = "".join(f" {label} kNN % | {label} probe % |" for _, label in other_kinds)
    lines = ["| variant | images | seeds | kNN % | linear probe % | sklearn probe % | kNN vs base (paired) |"
             + kind_headers + " images/s |",
             "|---|---:|---|---:|---:|---:|---:|" + "---:|---:|" * len(other_kinds) + "---:|"]

    def column(members: list[dict[str, Any]], key: str) -> str:
        return _mean_std([r[key] for r in members if key in r])

    for (variant, images, minutes), members in groups.items():
        base = {r["seed"]: r["knn_top1"] for r in groups.get(("base", images, minutes), [])}
        diffs = [r["knn_top1"] - base[r["seed"]] for r in members if r["seed"] in base]
        rates = [r["images_seen"] / r["train_seconds"] for r in members if r.get("train_seconds")]
        kinds = "".join(f" {column(members, prefix + 'knn_top1')} | {column(members, prefix + 'probe_top1')} |"
                        for prefix, _ in other_kinds)
        # A wall-clock budget trains as many images as fit: the column shows those trained (the mean).
        trained = (f"{statistics.mean(r['images_seen'] for r in members):,.0f} in {minutes:g} min" if minutes
                   else f"{images:,}")
        lines.append(f"| {variant} | {trained} | {','.join(str(r['seed']) for r in members)} | "
                     f"{column(members, 'knn_top1')} | {column(members, 'probe_top1')} | "
                     f"{column(members, 'sklearn_probe_top1')} | "
                     f"{'+' if diffs and statistics.mean(diffs) >= 0 else ''}{_mean_std(diffs)} |{kinds} "
                     f"{f'{statistics.mean(rates):,.0f}' if rates else '-'} |")
    ref_keys = ["knn_top1", "probe_top1", "sklearn_probe_top1"] + [
        prefix + metric for prefix, _ in other_kinds for metric in ("knn_top1", "probe_top1")]
    lines += ["", "| reference | kNN % | linear probe % | sklearn probe % |" + kind_headers,
              "|---|---:|---:|---:|" + "---:|---:|" * len(other_kinds)]

    def cell(values: dict[str, float], key: str) -> str:
        return f"{100 * values[key]:.2f}" if key in values else "-"

    for name, values in refs.items():
        lines.append(f"| {name} | " + " | ".join(cell(values, key) for key in ref_keys) + " |")
    return "\n".join(lines) + "\n"


def trend_kinds(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(result-key prefix, label, line style) of the feature kinds a trend plot draws: the backbone's
    output, and the last stage's 2x2 grid where every row has it and it differs from the output (a
    model.feature_grid 2 backbone outputs that grid, and a second, identical line would only hide the first)."""
    grid_differs = all("grid_knn_top1" in r for r in rows) and any(
        r["grid_knn_top1"] != r["knn_top1"] or r["grid_probe_top1"] != r["probe_top1"] for r in rows)
    return [("", "output", "-")] + ([("grid_", "2x2 grid", "-.")] if grid_differs else [])


def draw_trend(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]], path: Path) -> Path | None:
    figure = plotting.new_figure(960, 680, TREND_PNG)
    if figure is None:
        return None
    axis = figure.add_subplot()
    axis.set_xlabel("images seen")
    axis.set_ylabel("top-1 on the full 10k test split (%)")
    axis.grid(color="#ebebeb")
    budgets = sorted({r["images"] for r in rows})
    kinds = trend_kinds(rows)
    for prefix, kind, line in kinds:
        for metric, name, colour in (("knn_top1", "kNN", "#1f5eb4"), ("probe_top1", "linear probe", "#289646")):
            key = prefix + metric
            means = [statistics.mean(100 * r[key] for r in rows if r["images"] == b) for b in budgets]
            axis.plot(budgets, means, marker="o", linewidth=2.5, linestyle=line, color=colour,
                      label=f"SwAV {name}, {kind}")
            for b in budgets:
                axis.scatter([b] * sum(r["images"] == b for r in rows),
                             [100 * r[key] for r in rows if r["images"] == b], color=colour, s=12, alpha=0.5)
    references = [("raw-pixels", "", "raw pixels", "#963ca0")] + [
        ("random-init", prefix, f"random init, {kind}", "#828282" if not prefix else "#b4b4b4")
        for prefix, kind, _ in kinds]
    for ref, prefix, name, colour in references:
        for metric, style in (("knn_top1", "--"), ("probe_top1", ":")):
            value = refs[ref].get(prefix + metric)
            if value is not None:
                axis.axhline(100 * value, color=colour, linestyle=style, linewidth=1.8,
                             label=f"{name} {'kNN' if metric == 'knn_top1' else 'probe'} ({100 * value:.1f}%)")
    axis.set_xscale("log", base=2)
    axis.set_xticks(budgets, [f"{b / 1000:.0f}k" for b in budgets])
    figure.legend(loc="outside lower center", ncol=3, frameon=False)
    storage.write_bytes_atomic(str(path), plotting.png_bytes(figure), StorageConfig())
    return path


# ---- pipeline -----------------------------------------------------------------------------------------


def run_study(args: argparse.Namespace) -> int:
    from stream_swav.runtime.driver import train

    out = Path(args.out)
    variants = dict(VARIANTS)
    for text in args.variant:
        name, _, spec = text.partition("=")
        variants[name] = json.loads(spec)
    # Only the named checkpoints when --checkpoint is given without --variants.
    names = [v for v in (args.variants or ("" if args.checkpoint else "base")).split(",") if v]
    unknown = [v for v in names if v not in variants]
    if unknown:
        print(f"quality: unknown variant(s) {', '.join(unknown)}; known: {', '.join(variants)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = sorted(int(b) for b in args.budgets.split(",")) if args.trend else [args.images]
    made = demo_shards(out / "shards", eval_train=60_000, eval_test=10_000, dataset="fashion-mnist",
                       data_dir=args.data_dir)
    device = pick_device(args.device)
    data = load_eval_data(made.eval_train, made.eval_test, made.image_size)
    # The references with scikit-learn's probe, once scored, serve every later report too.
    with_sklearn_refs = out / "references-sklearn.json"
    refs_path = with_sklearn_refs if args.sklearn or with_sklearn_refs.is_file() else out / "references.json"
    # The base recipe's backbone, whatever the variants: a wider variant's own random init scores
    # higher, and the table's references must not move with the first variant named.
    base_cfg = run_config(budgets[0], VARIANTS["base"], args.overrides, 0, made.train, str(out / "unused"))
    if not refs_path.is_file():
        refs_path.write_text(json.dumps(references(base_cfg, data, device, args.sklearn), indent=2) + "\n")
    refs = json.loads(refs_path.read_text())
    missing = tuple(kind for kind in FEATURE_KINDS if f"{kind}knn_top1" not in refs["random-init"])
    if missing:
        # References scored before a feature kind existed get the random-init backbones' new kinds.
        for name, values in random_init_kinds(base_cfg, data, device, missing).items():
            refs[name].update(values)
        refs_path.write_text(json.dumps(refs, indent=2) + "\n")
    results = out / RESULTS_JSONL
    for text in args.checkpoint:
        score_checkpoint(text, out, data, device, args)
    failures = 0
    for name in names:
        for seed in seeds:
            overrides = merge_dicts(variants[name], {"set": args.overrides} if args.overrides else {})
            # A trend is one run to the largest budget, evaluated at each budget: with the constant
            # learning rate nothing in a run depends on its budget, so its checkpoint at N images
            # is what a run of N images would have written.
            rids = {images: run_id(name, overrides, seed, images, args.minutes) + ("-trend" if args.trend else "")
                    for images in budgets}
            done = {r["run_id"]: r for r in read_jsonl(results) if r.get("run_id") in rids.values()}
            if not args.rescore and all(rid in done and (not args.sklearn or "sklearn_probe_top1" in done[rid])
                                        for rid in rids.values()):
                continue
            longest = budgets[-1]
            checkpoint_dir = str(out / "checkpoints" / f"{name}-s{seed}-{longest}-{rids[longest]}")
            cfg = run_config(longest, variants[name], args.overrides, seed, made.train, checkpoint_dir, args.minutes)
            if args.trend:
                if cfg.optim.schedule != "warmup-constant" or any(b % cfg.global_batch for b in budgets):
                    print("quality: --trend needs the constant schedule and budgets that are multiples of the "
                          f"batch ({cfg.global_batch})", file=sys.stderr)
                    return 2
                cfg = config_from_dict(merge_dicts(cfg.to_dict(), {"checkpoint": {
                    "every_steps": budgets[0] // cfg.global_batch, "keep_last": longest // budgets[0] + 1}}))
            train_seconds = next(iter(done.values()))["train_seconds"] if done else None
            if args.rescore and not done:
                continue  # --rescore only scores the checkpoints of finished runs again
            if not done:
                log.info("run %s seed %d: %d images", name, seed, longest)
                started = time.monotonic()
                rc = train(cfg)
                train_seconds = round(time.monotonic() - started, 1)
                if rc != 0:
                    log.error("run %s seed %d: training exited with %d; no row written", name, seed, rc)
                    failures += 1
                    continue
            steps = {images: images // cfg.global_batch for images in budgets} if args.trend else {longest: None}
            for images, step in steps.items():
                started = time.monotonic()
                row = evaluate_run(resolve_checkpoint(checkpoint_dir if step is None
                                                      else f"{checkpoint_dir}/step-{step:09d}"),
                                   data, device, args.sklearn)
                row.update({"variant": name, "overrides": overrides, "seed": seed, "images": images,
                            "minutes": args.minutes,
                            "run_id": rids[images], "train_seconds": train_seconds,
                            "eval_seconds": round(time.monotonic() - started, 1), "trend": args.trend})
                append_jsonl(results, row)
                log.info("run %s seed %d at %d images: kNN %.2f%%, probe %.2f%%", name, seed, row["images_seen"],
                         100 * row["knn_top1"], 100 * row["probe_top1"])
            write_reports(out, refs)
    write_reports(out, refs)
    print((out / RESULTS_MD).read_text())
    return 1 if failures else 0


def score_checkpoint(text: str, out: Path, data: EvalData, device: torch.device, args: argparse.Namespace) -> None:
    """--checkpoint NAME=DIR: score a checkpoint trained elsewhere (e.g. by `make demo`) as the study
    scores its own runs, as a row of variant NAME with the seed its configuration records."""
    name, _, path = text.partition("=")
    resolved = resolve_checkpoint(path)
    rid = "checkpoint-" + hashlib.sha256(f"{name}|{resolved.url}|{resolved.step}".encode()).hexdigest()[:12]
    done = [r for r in read_jsonl(out / RESULTS_JSONL) if r.get("run_id") == rid]
    if done and not args.rescore and (not args.sklearn or "sklearn_probe_top1" in done[-1]):
        return
    started = time.monotonic()
    row = evaluate_run(resolved, data, device, args.sklearn)
    train_cfg = resolved.record.get("config", {}).get("train", {})
    # Grouped by the run's image budget: runs cut short by a time cap still share a table line.
    row.update({"variant": name, "overrides": {"checkpoint": path}, "seed": train_cfg.get("seed"),
                "images": train_cfg.get("image_budget") or row["images_seen"],
                "run_id": rid, "train_seconds": None, "eval_seconds": round(time.monotonic() - started, 1),
                "trend": False})
    append_jsonl(out / RESULTS_JSONL, row)
    log.info("checkpoint %s (%s, seed %s) at %d images: kNN %.2f%%, probe %.2f%%", name, path, row["seed"],
             row["images_seen"], 100 * row["knn_top1"], 100 * row["probe_top1"])


def write_reports(out: Path, refs: dict[str, dict[str, float]]) -> None:
    rows = read_jsonl(out / RESULTS_JSONL)
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest[row["run_id"]] = row  # a rerun with --sklearn replaces the row without
    rows = list(latest.values())
    (out / RESULTS_MD).write_text(format_markdown([r for r in rows if not r.get("trend")], refs))
    trend = [r for r in rows if r.get("trend")]
    if trend:
        draw_trend(trend, refs, out / TREND_PNG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quality", help="folder for shards, checkpoints and results")
    parser.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: base, or none "
                                           "with --checkpoint)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME={JSON overrides}",
                        help="define another variant; repeatable")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (train.seed and data.seed)")
    parser.add_argument("--images", type=int, default=150_000, help="training images per run")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="train each run for this many minutes of wall-clock time (from the learners' first "
                             "step), --images being the cap: variants compared at equal time, not equal images")
    parser.add_argument("--trend", action="store_true", help="one run per image budget in --budgets, and a plot")
    parser.add_argument("--budgets", default="", help="comma-separated image budgets for --trend")
    parser.add_argument("--sklearn", action="store_true",
                        help="also score with scikit-learn's LogisticRegression (pip install -e '.[study]')")
    parser.add_argument("--rescore", action="store_true",
                        help="score the kept checkpoints of finished runs again (new feature kinds); train nothing")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="also score a checkpoint trained elsewhere (e.g. make demo's) as variant NAME; repeatable")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: searched)")
    parser.add_argument("--device", default="auto", help="evaluation device: auto, cpu or cuda")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value for every run; repeatable")
    args = parser.parse_args(argv)
    if args.trend and not args.budgets:
        parser.error("--trend needs --budgets")
    if args.trend and args.minutes:
        parser.error("--trend scores fixed image budgets; drop --minutes")
    try:  # refused before any stream or run folder is written
        require_fashion_mnist(args.data_dir, hint="set --data-dir")
    except FileNotFoundError as err:
        print(f"quality: {err}", file=sys.stderr)
        return 2
    logs.configure()
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main())
