"""The long-tail pipeline's parts: streams, frequency groups, scores, aggregation, restart, evaluation."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from pipelines import longtail
from stream_swav.apps.evaluate import EvalData
from stream_swav.data.labelled import LabeledImages
from pipelines.longtail import zipf_subset
from stream_swav.apps.datasets import find_fashion_mnist, load_split
from stream_swav.config import StorageConfig
from stream_swav.model import SwAVModel
from stream_swav.runtime.metrics import usage_perplexity
from stream_swav.swav import prototype_counts
from stream_swav.checkpoint import save_checkpoint


def shuffled_labels(per_class: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


# ---- streams -------------------------------------------------------------------------------------------


def test_longtail_stream_counts_follow_zipf_with_ratio_100():
    labels = shuffled_labels(600)
    indices = longtail.stream_indices("longtail", labels, seed=3)
    counts = longtail.class_counts(labels[indices])
    assert len(set(indices.tolist())) == len(indices)
    assert counts[0] == 600 and counts[-1] == 6
    assert counts[0] / counts[-1] == pytest.approx(100, rel=0.02)
    # Zipf with exponent log(100)/log(10) = 2: n_c = n_0 / (c + 1)^2, rounded down.
    assert counts.tolist() == [int(600 / (c + 1) ** 2 + 1e-9) for c in range(10)]
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_shuffled_class_order_moves_the_head_and_tail_to_other_classes():
    labels = shuffled_labels(600)
    order = longtail.frequency_order("shuffled", seed=3)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == longtail.frequency_order("shuffled", seed=3)
    counts = longtail.class_counts(labels[longtail.stream_indices("longtail", labels, seed=3, class_order="shuffled")])
    # The same Zipf counts, now carried by the classes in `order`; the groups follow the counts.
    assert counts[order].tolist() == [int(600 / (r + 1) ** 2 + 1e-9) for r in range(10)]
    groups = longtail.frequency_groups(counts)
    assert groups["frequent"] == tuple(order[:3]) and groups["rare"] == tuple(order[-3:])
    assert longtail.frequency_order("label", seed=3) == list(range(10))
    with pytest.raises(ValueError, match="class_order must be one of"):
        longtail.frequency_order("reversed", seed=0)


def test_balanced_stream_has_equal_counts_and_the_same_total():
    labels = shuffled_labels(600)
    longtail_size = len(longtail.stream_indices("longtail", labels, seed=0))
    indices = longtail.stream_indices("balanced", labels, seed=0)
    counts = longtail.class_counts(labels[indices])
    assert len(set(counts.tolist())) == 1
    assert len(indices) == longtail_size // 10 * 10
    assert len(set(indices.tolist())) == len(indices)


def test_streams_differ_by_seed_and_unknown_streams_are_refused():
    labels = shuffled_labels(100)
    a = longtail.stream_indices("longtail", labels, seed=0)
    b = longtail.stream_indices("longtail", labels, seed=1)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="stream must be one of"):
        longtail.stream_indices("uniform", labels, seed=0)
    with pytest.raises(ValueError, match="fewer than"):
        longtail.balanced_subset(np.array([0, 0, 1]), per_class=2, seed=0)


def test_fashion_mnist_longtail_stream():
    folder = find_fashion_mnist()
    if folder is None:
        pytest.skip("Fashion-MNIST not found")
    _, labels = load_split(folder, "train")
    counts = longtail.class_counts(labels[longtail.stream_indices("longtail", labels, seed=0)])
    assert counts.tolist() == [6000, 1500, 666, 375, 240, 166, 122, 93, 74, 60]
    assert longtail.frequency_groups(counts) == {"frequent": (0, 1, 2), "middle": (3, 4, 5, 6), "rare": (7, 8, 9)}


# ---- groups and scores ---------------------------------------------------------------------------------


def test_frequency_groups_rank_classes_by_count():
    counts = np.array([5, 50, 20, 1, 7, 30, 2, 9, 40, 3])
    assert longtail.frequency_groups(counts) == {"frequent": (1, 8, 5), "middle": (2, 7, 4, 0),
                                                 "rare": (9, 6, 3)}
    with pytest.raises(ValueError, match="10 class counts"):
        longtail.frequency_groups(np.ones(9))


def test_group_top1_on_a_hand_made_example():
    groups = {"frequent": (0, 1, 2), "middle": (3, 4, 5, 6), "rare": (7, 8, 9)}
    labels = torch.tensor([0, 0, 1, 3, 4, 5, 6, 7, 8, 9, 9, 9])
    predictions = torch.tensor([0, 1, 1, 3, 3, 5, 6, 2, 8, 9, 0, 1])
    scores = longtail.group_top1(predictions, labels, groups)
    assert scores["top1"] == pytest.approx(7 / 12)
    assert scores["frequent_top1"] == pytest.approx(2 / 3)
    assert scores["middle_top1"] == pytest.approx(3 / 4)
    assert scores["rare_top1"] == pytest.approx(2 / 5)
    only_frequent = longtail.group_top1(torch.tensor([0]), torch.tensor([0]), groups)
    assert only_frequent["frequent_top1"] == 1.0 and math.isnan(only_frequent["rare_top1"])


def fake_row(stream: str, method: str, seed: int, top1: float, rare: float, config: str = "cfg") -> dict:
    return {"stream": stream, "method": method, "seed": seed, "config_id": config, "top1": top1,
            "frequent_top1": top1 + 0.1, "middle_top1": top1, "rare_top1": rare, "perplexity": 10.0 + seed}


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [fake_row("longtail", "sinkhorn", s, t, r) for s, t, r in ((0, 0.5, 0.2), (1, 0.6, 0.3), (2, 0.7, 0.4))]
    rows.append(fake_row("longtail", "relaxed", 0, 0.55, 0.5))
    (sinkhorn, relaxed) = longtail.summarize(rows)
    assert sinkhorn["seeds"] == [0, 1, 2]
    assert sinkhorn["top1"] == pytest.approx((0.6, 0.1))
    assert sinkhorn["rare_top1"] == pytest.approx((0.3, 0.1))
    assert sinkhorn["perplexity"] == pytest.approx((11.0, 1.0))
    assert relaxed["top1"] == pytest.approx((0.55, 0.0))
    table = longtail.format_markdown(rows, references={"raw-pixels": {"top1": 0.8, "frequent_top1": 0.7,
                                                                      "middle_top1": 0.6, "rare_top1": 0.9}})
    assert ("| longtail | sinkhorn | 3 | 60.0 ± 10.0 | 70.0 ± 10.0 | 60.0 ± 10.0 | 30.0 ± 10.0 | 11.0 ± 1.0 |"
            in table)
    assert "| (reference) | raw-pixels | - | 80.0 | 70.0 | 60.0 | 90.0 | - |" in table


def test_paired_differences_and_verdicts():
    rows = []
    for seed, (base, better) in enumerate(((0.20, 0.30), (0.25, 0.36), (0.30, 0.39))):
        rows += [fake_row("longtail", "sinkhorn", seed, 0.6, base),
                 fake_row("longtail", "prior", seed, 0.6, better)]
        rows += [fake_row("balanced", "sinkhorn", seed, 0.6 + 0.01 * seed, 0.5),
                 fake_row("balanced", "prior", seed, 0.6 - 0.01 * seed, 0.5)]
    rare = longtail.paired_differences(rows, "longtail", "prior", "rare_top1")
    assert rare == pytest.approx([0.10, 0.11, 0.09])
    assert longtail.verdict(rare) == "higher"
    balanced = longtail.paired_differences(rows, "balanced", "prior", "top1")
    assert balanced == pytest.approx([0.0, -0.02, -0.04])
    assert longtail.verdict(balanced) == "within noise"
    assert longtail.verdict([-0.1, -0.11, -0.12]) == "lower"
    assert longtail.verdict([0.1]) == "-"
    table = longtail.format_markdown(rows, methods=("sinkhorn", "prior"))
    assert "| prior | +10.0 ± 1.0 | higher |" in table


def test_restart_skips_runs_already_recorded(tmp_path):
    results = tmp_path / "results.jsonl"
    longtail.append_jsonl(results, fake_row("longtail", "sinkhorn", 0, 0.5, 0.2))
    longtail.append_jsonl(results, fake_row("longtail", "relaxed", 0, 0.5, 0.2, config="other"))
    with open(results, "a") as f:
        f.write('{"stream": "longtail", "method": "rel')  # torn by a crash mid-write
    rows = longtail.read_jsonl(results)
    assert len(rows) == 2
    plan = longtail.plan_runs(["longtail"], ["sinkhorn", "relaxed"], [0, 1])
    assert [r.name for r in plan] == ["longtail-sinkhorn-seed0", "longtail-relaxed-seed0",
                                      "longtail-sinkhorn-seed1", "longtail-relaxed-seed1"]
    todo = longtail.pending_runs(plan, rows, "cfg")
    assert [r.name for r in todo] == ["longtail-relaxed-seed0", "longtail-sinkhorn-seed1", "longtail-relaxed-seed1"]
    assert longtail.pending_runs(plan, rows, "other") == [plan[0], plan[2], plan[3]]
    with pytest.raises(ValueError, match="method must be one of"):
        longtail.plan_runs(["longtail"], ["equal"], [0])


def test_plot_is_a_png_with_one_panel_per_stream_and_a_bar_colour_per_method(tmp_path):
    rows = [fake_row(stream, method, seed, 0.5 + 0.05 * seed, 0.3)
            for stream in ("longtail", "balanced") for method in ("sinkhorn", "relaxed", "prior")
            for seed in (0, 1)]
    both = longtail.write_plot(rows, longtail.STREAMS, longtail.CODES, tmp_path / "both.png")
    one = longtail.write_plot([r for r in rows if r["stream"] == "longtail"], ("longtail",), longtail.CODES,
                              tmp_path / "one.png")
    with Image.open(both) as image, Image.open(one) as one_panel:
        assert image.format == "PNG" and one_panel.format == "PNG"
        assert image.size == (longtail.MARGIN_PX + 2 * longtail.PANEL_WIDTH_PX, longtail.PLOT_HEIGHT_PX)
        assert one_panel.size == (longtail.MARGIN_PX + longtail.PANEL_WIDTH_PX, longtail.PLOT_HEIGHT_PX)
        pixels = np.asarray(image.convert("RGB"))
    for method, colour in longtail.METHOD_COLORS.items():
        # Bars are filled rectangles: thousands of pixels of exactly the method's colour.
        assert (pixels == np.array(ImageColor.getrgb(colour))).all(axis=2).sum() > 2000, method
    with pytest.raises(ValueError, match="no rows"):
        longtail.draw_plot(rows, streams=("neither",))


def test_without_matplotlib_the_reports_are_written_and_the_plot_skipped(tmp_path, monkeypatch, caplog):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # an import of matplotlib now fails
    rows = [fake_row("longtail", method, 0, 0.5, 0.3) for method in ("sinkhorn", "relaxed")]
    longtail.write_reports(tmp_path, rows, "cfg", ["longtail"], ["sinkhorn", "relaxed"], {})
    assert "| longtail | relaxed | 1 |" in (tmp_path / longtail.RESULTS_MD).read_text()
    assert not (tmp_path / longtail.PLOT_PNG).exists()
    assert "longtail.png not drawn: matplotlib is not installed (pip install 'stream-swav[plots]')" in caplog.text


# ---- configuration -------------------------------------------------------------------------------------


def test_config_is_scaled_to_the_budget_and_overrides_win():
    cfg = longtail.shared_config(4096, None, ["swav.mass_momentum=0.95", "train.batch_size=64"])
    assert cfg.train.image_budget == 4096
    assert cfg.optim.warmup_images == 409
    assert cfg.swav.relaxed_anneal_images == 2048
    assert cfg.swav.freeze_prototypes_steps == 6  # 64 steps at batch 64
    assert cfg.swav.mass_momentum == 0.95
    assert cfg.model.arch == "resnet10" and cfg.model.prototypes == 30
    # The study's recipe is one the library does not warn about (prototypes span the embedding space).
    assert cfg.model.output_dim <= cfg.model.prototypes and cfg.warnings() == []
    assert longtail.shared_config(10_000_000, None, []).swav.mass_momentum == 0.99
    run = longtail.RunSpec("balanced", "prior", 2)
    per_run = longtail.run_config(cfg, run, "/shards/balanced", "/ckpt/x")
    assert (per_run.swav.codes, per_run.train.seed, per_run.data.seed) == ("prior", 2, 2)
    assert (per_run.data.shards, per_run.checkpoint.dir) == ("/shards/balanced", "/ckpt/x")
    assert longtail.config_id(cfg.to_dict()) != longtail.config_id(longtail.shared_config(8192, None, []).to_dict())


# ---- evaluation of a real checkpoint -------------------------------------------------------------------


def test_evaluate_run_scores_the_latest_checkpoint(tmp_path):
    cfg = longtail.shared_config(256, None, ["model.hidden_dim=32", "model.output_dim=16", "model.prototypes=7",
                                             "crops.global_size=16"])
    torch.manual_seed(0)
    model = SwAVModel(cfg.model).eval()
    save_checkpoint(str(tmp_path), step=4, images_seen=256, state={"model": model.state_dict()},
                    backbone=model.backbone_state_dict(),
                    info={**model.spec.to_record(), "config": cfg.to_dict(),
                          "metrics": {"loss": 2.5, "perplexity": 3.0}}, storage_cfg=StorageConfig())
    generator = torch.Generator().manual_seed(1)
    index = LabeledImages(torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8, generator=generator),
                          torch.arange(40) % 10)
    queries = LabeledImages(torch.randint(0, 256, (20, 16, 16, 3), dtype=torch.uint8, generator=generator),
                            torch.arange(20) % 10)
    groups = longtail.frequency_groups(np.arange(10)[::-1])
    row = longtail.evaluate_run(str(tmp_path), EvalData(index, queries, 16), groups, torch.device("cpu"))

    assert (row["step"], row["images_seen"], row["final_loss"], row["final_batch_perplexity"]) == (4, 256, 2.5, 3.0)
    for key in ("top1", "frequent_top1", "middle_top1", "rare_top1"):
        assert 0.0 <= row[key] <= 1.0
    # The queries' best prototypes, computed here directly from the model that was saved.
    mean, std = torch.tensor(cfg.augment.mean).view(1, 3, 1, 1), torch.tensor(cfg.augment.std).view(1, 3, 1, 1)
    with torch.no_grad():
        pixels = (queries.images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        scores = model.prototypes(F.normalize(model.projection(model.backbone(pixels)), dim=1))
    assert row["perplexity"] == pytest.approx(usage_perplexity(prototype_counts(scores).numpy()), rel=1e-4)
    assert 1.0 <= row["perplexity"] <= 7.0
    json.dumps(row)


def test_zipf_subset_has_the_requested_imbalance():
    labels = np.repeat(np.arange(10), 500)
    indices = zipf_subset(labels, imbalance_ratio=100, seed=0)
    counts = np.bincount(labels[indices], minlength=10)
    assert counts[0] == 500 and counts[-1] == 5
    assert (np.diff(counts) <= 0).all()
    # Zipf: n_c proportional to 1/(c+1)^a with a = log(100)/log(10) = 2.
    assert counts.tolist() == [500, 125, 55, 31, 20, 13, 10, 7, 6, 5]
    assert len(set(indices.tolist())) == len(indices)
    assert (zipf_subset(labels, 100, seed=0) == indices).all()
    assert not (zipf_subset(labels, 100, seed=1) == indices).all()
    with pytest.raises(ValueError):
        zipf_subset(labels, imbalance_ratio=0.5)
    reordered = np.bincount(labels[zipf_subset(labels, 100, seed=0, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])],
                            minlength=10)
    assert reordered.tolist() == counts.tolist()[::-1]
    with pytest.raises(ValueError, match="each class once"):
        zipf_subset(labels, 100, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
