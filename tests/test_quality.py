"""The learning-quality study's pure parts: run configuration and the results table."""
from __future__ import annotations

from pipelines.quality import VARIANTS, format_markdown, run_config, run_id


def test_run_config_is_the_demo_recipe_with_the_variant_the_budget_and_the_seed(tmp_path):
    cfg = run_config(75_000, VARIANTS["jitter-0.4"], ["swav.temperature=0.2"], 3, "shards/train",
                     str(tmp_path / "ckpt"))
    assert (cfg.train.image_budget, cfg.train.time_budget_s) == (75_000, 0.0)
    assert (cfg.train.seed, cfg.data.seed, cfg.data.shards) == (3, 3, "shards/train")
    assert (cfg.augment.brightness, cfg.augment.contrast) == (0.4, 0.4)
    assert cfg.swav.temperature == 0.2
    # The demo recipe underneath: the CPU backbone, no local crops, the constant rate.
    assert (cfg.model.arch, cfg.model.width, cfg.crops.local_count) == ("resnet10", 16, 0)
    assert cfg.optim.schedule == "warmup-constant"
    assert (cfg.checkpoint.keep_last, cfg.metrics.enabled) == (1, False)


def test_set_changes_the_base_and_a_variant_wins_on_its_own_keys(tmp_path):
    stride_2 = ["model.stem_stride=2"]
    assert run_config(1000, VARIANTS["base"], stride_2, 0, "s", str(tmp_path)).model.stem_stride == 2
    assert run_config(1000, VARIANTS["stem-1"], stride_2, 0, "s", str(tmp_path)).model.stem_stride == 1
    assert run_config(1000, VARIANTS["width-32"], stride_2, 0, "s", str(tmp_path)).model.stem_stride == 2


def test_a_wall_clock_run_stops_on_time_with_the_images_as_its_cap(tmp_path):
    cfg = run_config(2_000_000, {}, [], 0, "shards/train", str(tmp_path / "ckpt"), minutes=4)
    assert (cfg.train.image_budget, cfg.train.time_budget_s) == (2_000_000, 240.0)
    # Image-budget runs keep the ids they had before --minutes existed (their results stay found).
    assert run_id("base", {}, 0, 1000, 0.0) == run_id("base", {}, 0, 1000)
    assert run_id("base", {}, 0, 1000, 4.0) != run_id("base", {}, 0, 1000)


def test_trend_and_minutes_are_refused_together(tmp_path, capsys):
    import pytest

    from pipelines.quality import main

    with pytest.raises(SystemExit) as refused:
        main(["--out", str(tmp_path), "--trend", "--budgets", "1000", "--minutes", "4"])
    assert refused.value.code == 2 and "--minutes" in capsys.readouterr().err


def test_run_id_changes_with_every_part():
    first = run_id("base", {}, 0, 1000)
    assert first == run_id("base", {}, 0, 1000)
    assert len({first, run_id("base", {}, 1, 1000), run_id("base", {}, 0, 2000),
                run_id("base", {"a": 1}, 0, 1000), run_id("other", {}, 0, 1000)}) == 5


def test_table_pairs_each_variant_with_base_by_seed():
    def row(variant, seed, knn):
        return {"variant": variant, "seed": seed, "images": 1000, "knn_top1": knn, "probe_top1": 0.5,
                "images_seen": 1024, "train_seconds": 2.0}

    rows = [row("base", 0, 0.80), row("base", 1, 0.82), row("local-0", 0, 0.83), row("local-0", 1, 0.84)]
    refs = {"raw-pixels": {"knn_top1": 0.857, "probe_top1": 0.844}}
    table = format_markdown(rows, refs)
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # Paired differences +3 and +2 points: mean 2.50, sample std 0.71.
    assert "| +2.50 ± 0.71 |" in lines["local-0"]
    assert "| 81.00 ± 1.41 |" in lines["base"] and "| 512 |" in lines["base"]
    assert "| raw-pixels | 85.70 | 84.40 | - | - | - |" in table


def test_wall_clock_runs_are_paired_with_base_at_the_same_minutes_and_show_the_images_trained():
    def row(variant, seed, knn, seen, minutes):
        return {"variant": variant, "seed": seed, "images": 10_000, "minutes": minutes, "knn_top1": knn,
                "probe_top1": 0.5, "images_seen": seen, "train_seconds": 60.0 * minutes}

    rows = [row("base", 0, 0.80, 3000, 4.0), row("stem-1", 0, 0.83, 1000, 4.0), row("base", 0, 0.70, 10_000, 0.0)]
    lines = {(line.split(" | ")[0].strip("| "), line.split(" | ")[1]): line
             for line in format_markdown(rows, {}).splitlines()[2:] if line.startswith("| ")}
    # Paired with the 4-minute base (80%), not the image-budget one (70%).
    assert "| +3.00 |" in lines[("stem-1", "1,000 in 4 min")]
    assert ("base", "3,000 in 4 min") in lines and ("base", "10,000") in lines


def test_feature_kinds_of_a_resnet_read_its_stages():
    import torch

    from pipelines.quality import FEATURE_KINDS, feature_sets
    from stream_swav.apps.evaluate import EvalData, random_backbone
    from stream_swav.data.labelled import LabeledImages
    from stream_swav.model import BackboneSpec

    images = torch.randint(0, 256, (6, 28, 28, 3), dtype=torch.uint8)
    split = LabeledImages(images, torch.arange(6) % 2)
    data = EvalData(split, split, 28)
    backbone = random_backbone(BackboneSpec("resnet10", small_stem=True, stem_stride=2, width=8, feature_grid=2))
    sets = feature_sets(backbone, data, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    assert set(sets) == set(FEATURE_KINDS)
    # Output: the 2x2 grid of the last stage (64 channels); layer3+4: 32 pooled + that output;
    # the 2x2 grid kind equals the output here; the third stage's map is 32 x 4 x 4 at 28 px.
    dims = {kind: (train.shape, test.shape) for kind, (train, test) in sets.items()}
    assert dims == {"": ((6, 256), (6, 256)), "l34_": ((6, 288), (6, 288)), "grid_": ((6, 256), (6, 256)),
                    "l3map_": ((6, 512), (6, 512))}
    torch.testing.assert_close(sets["grid_"][0], sets[""][0])


def test_the_other_studies_keep_the_stem_they_were_measured_with(tmp_path):
    # The demo moved to a stride-1 stem; the long-tail and curation studies' tables were measured
    # with the stride-2 one, and their commands must still reproduce them.
    from pipelines import curation_study, longtail
    from stream_swav.config import merge_dicts

    assert run_config(1000, {}, [], 0, "s", str(tmp_path)).model.stem_stride == 1
    dedup = merge_dicts(curation_study.RECIPE, curation_study.CONDITIONS["messy-dedup"][1])
    cfg = run_config(1000, dedup, [], 0, "s", str(tmp_path))
    assert cfg.model.stem_stride == 2 and cfg.curation.dedup
    assert longtail.shared_config(1000, None, []).model.stem_stride == 2


def test_trend_draws_the_grid_only_where_it_is_not_the_output():
    from pipelines.quality import trend_kinds

    pooled = {"knn_top1": 0.84, "probe_top1": 0.83, "grid_knn_top1": 0.85, "grid_probe_top1": 0.86}
    grid = {"knn_top1": 0.87, "probe_top1": 0.88, "grid_knn_top1": 0.87, "grid_probe_top1": 0.88}
    assert [label for _, label, _ in trend_kinds([pooled, pooled])] == ["output", "2x2 grid"]
    assert [label for _, label, _ in trend_kinds([grid, grid])] == ["output"]
    assert [label for _, label, _ in trend_kinds([{"knn_top1": 0.8, "probe_top1": 0.8}])] == ["output"]


def test_the_study_pipelines_refuse_a_missing_dataset_in_one_line_before_writing(tmp_path, capsys):
    """Each study needs Fashion-MNIST: without it, one line naming where it looked and the option,
    exit 2, and no output folder, where it had been a traceback after the folder was made."""
    import importlib

    for name in ("quality", "curation_study", "longtail"):
        main = importlib.import_module(f"pipelines.{name}").main
        out = tmp_path / name
        assert main(["--out", str(out), "--data-dir", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert err == f"{name}: no Fashion-MNIST IDX files in {tmp_path / 'none'} (set --data-dir)\n"
        assert not out.exists()
