"""The typed configuration: layering, typed parsing of overrides, and errors that name the key."""
from __future__ import annotations

import json
import re

import pytest

from stream_swav.config import (Config, ConfigError, CurationConfig, OverrideText, changed_settings, config_from_dict,
                                load_config, merge_dicts, parse_overrides)


def refused(overrides: list[str], key: str) -> ConfigError:
    """load_config must refuse these overrides with a message that starts with the dotted key."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ") as info:
        load_config(overrides=overrides)
    return info.value


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg == Config()
    assert Config().validate() == cfg
    assert cfg.train.batch_size == 64
    assert cfg.crops.global_scale == (0.14, 1.0)
    assert cfg.total_crops == cfg.crops.global_count + cfg.crops.local_count == 8


def test_to_dict_is_plain_and_round_trips_through_config_from_dict():
    cfg = load_config(overrides=["crops.local_count=2", "swav.crops_for_assign=[1,3]", "optim.base_lr=0.3"])
    plain = cfg.to_dict()
    assert plain["crops"]["global_scale"] == [0.14, 1.0]  # tuples become lists, e.g. for YAML
    assert plain["swav"]["crops_for_assign"] == [1, 3]
    again = config_from_dict(plain)
    assert again == cfg
    assert again.swav.crops_for_assign == (1, 3)
    assert isinstance(again.crops.global_scale, tuple)


def test_changed_settings_name_what_differs_from_a_saved_configuration():
    saved = json.loads(json.dumps(load_config(overrides=["model.prototypes=16", "swav.crops_for_assign=[0,1]"]).to_dict()))
    saved["model"].pop("width")  # a setting that older code did not have
    saved["obsolete"] = {"setting": 1}
    now = load_config(overrides=["model.prototypes=32", "model.width=8", "optim.base_lr=0.3"])
    assert changed_settings(saved, now) == [("model.prototypes", 16, 32), ("optim.base_lr", 0.6, 0.3)]
    assert changed_settings(saved, now, ("swav", "optim")) == [("optim.base_lr", 0.6, 0.3)]
    assert changed_settings(None, now) == [] and changed_settings(saved, load_config(overrides=[
        "model.prototypes=16"]), ("model", "swav")) == []


def test_base_then_yaml_then_overrides_later_layers_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 32\n  learners: 2\noptim:\n  base_lr: 0.3\n")
    base = {"train": {"batch_size": 16, "seed": 7}, "optim": {"base_lr": 0.1, "momentum": 0.8}}
    cfg = load_config(path, ["train.learners=4"], base=base)
    assert cfg.train.seed == 7  # base only
    assert cfg.optim.momentum == 0.8  # base only
    assert cfg.train.batch_size == 32  # YAML beats base
    assert cfg.optim.base_lr == 0.3  # YAML beats base
    assert cfg.train.learners == 4  # override beats YAML
    assert cfg.model.arch == "resnet50"  # untouched default


def test_only_the_final_merged_config_is_validated():
    # A bad value in an early layer is fine if a later layer replaces it.
    cfg = load_config(overrides=["train.batch_size=8"], base={"train": {"batch_size": -1}})
    assert cfg.train.batch_size == 8


def test_later_overrides_of_the_same_key_win():
    cfg = load_config(overrides=["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2


def test_override_values_are_parsed_into_the_annotated_types():
    cfg = load_config(overrides=[
        "train.batch_size=128",
        "optim.base_lr=1e-3",
        "optim.weight_decay=0",  # an int for a float field
        "data.follow=true",
        "train.progress_bar=off",
        "crops.global_scale=[0.5,1.0]",
        "crops.local_scale=0.1,0.4",  # bare comma list
        "swav.crops_for_assign=[0]",  # variable-length tuple
        "model.arch=resnet18",
        "checkpoint.dir=s3://bucket/runs",
        "metrics.host=0.0.0.0",
        "data.shards=",  # empty value -> empty string
        "train.image_budget=1e6",  # an integral float for an int field
    ])
    assert cfg.train.batch_size == 128 and type(cfg.train.batch_size) is int
    assert cfg.optim.base_lr == pytest.approx(1e-3) and type(cfg.optim.base_lr) is float
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert cfg.data.follow is True
    assert cfg.train.progress_bar is False
    assert cfg.crops.global_scale == (0.5, 1.0)
    assert cfg.crops.local_scale == (0.1, 0.4)
    assert cfg.swav.crops_for_assign == (0,)
    assert cfg.model.arch == "resnet18"
    assert cfg.checkpoint.dir == "s3://bucket/runs"
    assert cfg.metrics.host == "0.0.0.0"
    assert cfg.data.shards == ""
    assert cfg.train.image_budget == 1_000_000 and type(cfg.train.image_budget) is int


def test_parse_overrides_builds_a_nested_dict_of_text_and_parsed_values():
    nested = parse_overrides(["optim.base_lr=0.3", "crops.global_scale=[0.2,1]", " train.seed = 5"])
    assert nested == {"optim": {"base_lr": OverrideText("0.3", 0.3)},
                      "crops": {"global_scale": OverrideText("[0.2,1]", [0.2, 1])},
                      "train": {"seed": OverrideText(" 5", 5)}}


def test_string_keys_take_override_text_as_typed():
    cfg = load_config(overrides=["metrics.host=010", "checkpoint.dir=no", "data.shards={000..009}.tar"])
    assert cfg.metrics.host == "010" and cfg.checkpoint.dir == "no" and cfg.data.shards == "{000..009}.tar"


def test_unparseable_override_is_refused_naming_the_key():
    refused(["crops.global_scale=[0.5"], "crops.global_scale")
    refused(["train.batch_size={8"], "train.batch_size")


def test_bools_accept_0_and_1_and_empty_sections_are_empty(tmp_path):
    assert load_config(overrides=["train.compile=1"]).train.compile is True
    path = tmp_path / "empty-section.yaml"
    path.write_text("train:\n  # batch_size: 8\nmodel:\n  arch: resnet18\n")
    cfg = load_config(path)
    assert cfg.train.batch_size == Config().train.batch_size and cfg.model.arch == "resnet18"


def test_unknown_section_or_key_is_refused_naming_it(tmp_path):
    refused(["trian.batch_size=8"], "trian")
    err = refused(["train.batchsize=8"], "train.batchsize")
    assert "batch_size" in str(err)  # the message lists the known keys
    with pytest.raises(ConfigError, match=r"^optim\.lr: unknown key"):
        config_from_dict({"optim": {"lr": 0.1}})
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: resnet18\n  depth: 50\n")
    with pytest.raises(ConfigError, match=r"^model\.depth: unknown key"):
        load_config(path)


def test_wrong_types_are_refused_naming_the_key():
    refused(["train.batch_size=abc"], "train.batch_size")
    refused(["train.batch_size=1.5"], "train.batch_size")
    refused(["train.seed=true"], "train.seed")  # bools are not integers
    refused(["optim.base_lr=fast"], "optim.base_lr")
    refused(["data.follow=maybe"], "data.follow")
    refused(["model.arch=[1,2]"], "model.arch")
    refused(["crops.global_scale=0.5"], "crops.global_scale")  # a scalar, not a list
    refused(["crops.global_scale=[0.1,0.5,1.0]"], "crops.global_scale")  # wrong length
    refused(["swav.crops_for_assign=[0,x]"], "swav.crops_for_assign[1]")
    refused(["train=3"], "train")  # a section must be a mapping
    with pytest.raises(ConfigError, match=r"^train\.learners: expected an integer"):
        config_from_dict({"train": {"learners": "two"}})


def test_malformed_overrides_are_refused_clearly():
    for pair in ("train.batch_size", "=3"):
        with pytest.raises(ConfigError, match=re.escape(f"--set {pair!r}: expected section.key=value")):
            parse_overrides([pair])
    # No section: the bare key is looked up as a section, and refused by name.
    with pytest.raises(ConfigError, match=r"^batch_size: unknown key \(known: augment, "):
        load_config(overrides=["batch_size=3"])


@pytest.mark.parametrize("override, key", [
    # Positive numbers, zero allowed or not.
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=-4", "train.batch_size"),
    ("train.cpu_threads=-1", "train.cpu_threads"),
    ("optim.base_lr=0", "optim.base_lr"),
    ("optim.base_lr=.inf", "optim.base_lr"),  # must be finite
    ("storage.retries=-1", "storage.retries"),
    ("data.decode_actors=-1", "data.decode_actors"),
    # Probabilities and bounded ranges.
    ("crops.hflip_prob=1.5", "crops.hflip_prob"),
    ("augment.grayscale_prob=-0.1", "augment.grayscale_prob"),
    ("augment.hue=0.6", "augment.hue"),
    ("optim.momentum=1.0", "optim.momentum"),
    ("swav.mass_momentum=1.0", "swav.mass_momentum"),
    ("swav.mass_floor_gamma=1.5", "swav.mass_floor_gamma"),
    ("swav.prior_exponent=-1", "swav.prior_exponent"),
    ("metrics.port=70000", "metrics.port"),
    # Choices.
    ("model.arch=vit_b16", "model.arch"),
    ("model.stem_stride=3", "model.stem_stride"),
    ("model.width=-8", "model.width"),
    ("model.feature_grid=0", "model.feature_grid"),
    ("swav.codes=greedy", "swav.codes"),
    ("optim.optimizer=adam", "optim.optimizer"),
    ("optim.schedule=linear", "optim.schedule"),
    ("train.device=tpu", "train.device"),
    ("train.precision=fp16", "train.precision"),
    ("train.compile_mode=fast", "train.compile_mode"),
    # (min, max) pairs.
    ("crops.global_scale=[1.0,0.5]", "crops.global_scale"),
    ("crops.local_scale=[0,0.14]", "crops.local_scale"),
    ("crops.global_scale=[0.5,1.5]", "crops.global_scale"),
    ("augment.blur_sigma=[2.0,0.1]", "augment.blur_sigma"),
    ("augment.std=[0.2,0,0.2]", "augment.std"),
    # Required non-empty string.
    ("checkpoint.dir=", "checkpoint.dir"),
])
def test_validation_names_the_offending_key(override, key):
    refused([override], key)


def test_stride_two_stem_needs_the_small_stem():
    assert "model.small_stem" in str(refused(["model.stem_stride=2"], "model.stem_stride"))
    assert load_config(None, ["model.small_stem=true", "model.stem_stride=2"]).model.stem_stride == 2


@pytest.mark.parametrize("overrides, key, says", [
    (["model.arch=vit_s_16", "model.small_stem=true"], "model.small_stem", "patch size"),
    (["model.arch=regnet_y_400mf", "model.small_stem=true", "model.stem_stride=2"], "model.stem_stride", "ResNet"),
    (["model.arch=regnet_y_400mf", "model.width=32"], "model.width", "RegNets keep torchvision's widths"),
    (["model.arch=vit_s_16", "model.feature_grid=2"], "model.feature_grid", "ResNets only"),
    (["model.arch=resnet18", "model.vit_layers=4"], "model.vit_layers", "applies to ViTs only"),
    (["model.arch=vit_s_16", "model.width=100"], "model.width", "multiple of its heads (6)"),
    (["model.arch=vit_s_16", "model.vit_image_size=100"], "model.vit_image_size", "multiple of the patch size (16)"),
    (["model.arch=vit_s_16", "crops.local_size=90"], "crops.local_size", "multiple of its patch size (16)"),
    (["model.arch=vit_b_16", "model.sync_batchnorm=true"], "model.sync_batchnorm", "no BatchNorm"),
    (["optim.schedule=warmup-cosine", "optim.base_lr=0.0001"], "optim.final_lr", "<= optim.base_lr"),
])
def test_backbone_families_refuse_what_does_not_apply_to_them(overrides, key, says):
    assert says in str(refused(overrides, key))


def test_the_optimiser_and_its_defaults_follow_the_architecture():
    resnet, vit = load_config(), load_config(overrides=["model.arch=vit_s_16"])
    assert (resnet.optimizer, resnet.optim.base_lr, resnet.optim.weight_decay_schedule) == ("lars", 0.6, "constant")
    assert (vit.optimizer, vit.optim.base_lr, vit.optim.final_lr) == ("adamw", 5e-4, 1e-6)
    assert (vit.optim.weight_decay, vit.optim.weight_decay_end, vit.optim.clip_grad_norm) == (0.04, 0.4, 3.0)
    # Whatever the configuration sets wins, and a configuration that travels as a dict stays the same.
    tuned = load_config(overrides=["model.arch=vit_s_16", "optim.base_lr=0.001", "optim.weight_decay=0.05"])
    assert (tuned.optim.base_lr, tuned.optim.weight_decay, tuned.optim.final_lr) == (0.001, 0.05, 1e-6)
    assert config_from_dict(tuned.to_dict()) == tuned
    # AdamW chosen for a ResNet takes AdamW's defaults; LARS chosen for a ViT takes SwAV's.
    assert load_config(overrides=["optim.optimizer=adamw"]).optim.base_lr == 5e-4
    lars_vit = load_config(overrides=["model.arch=vit_s_16", "optim.optimizer=lars"])
    assert (lars_vit.optimizer, lars_vit.optim.base_lr) == ("lars", 0.6)
    # A LARS rate carried over to a ViT is valid but warned about, naming the key.
    (line,) = load_config(overrides=["model.arch=vit_s_16", "optim.base_lr=0.6"]).warnings()
    assert line.startswith("optim.base_lr: 0.6 is a LARS rate; AdamW diverges there")


def test_fewer_prototypes_than_embedding_dimensions_is_valid_but_warned():
    assert load_config().warnings() == []
    (line,) = load_config(overrides=["model.prototypes=30", "model.output_dim=64"]).warnings()
    assert line.startswith("model.prototypes: 30 prototypes span fewer directions than model.output_dim=64")


def test_choice_errors_list_the_allowed_values():
    err = refused(["optim.optimizer=adam"], "optim.optimizer")
    assert "lars" in str(err) and "sgd" in str(err) and "'adam'" in str(err)


def test_at_least_two_crops_are_required_in_total():
    refused(["crops.global_count=1", "crops.local_count=0"], "crops.global_count")
    cfg = load_config(overrides=["crops.global_count=2", "crops.local_count=0"])
    assert cfg.total_crops == 2


def test_crops_for_assign_must_be_distinct_indices_below_the_crop_count():
    refused(["swav.crops_for_assign=[0,0]"], "swav.crops_for_assign")
    refused(["swav.crops_for_assign=[]"], "swav.crops_for_assign")
    refused(["swav.crops_for_assign=[-1]"], "swav.crops_for_assign")
    err = refused(["swav.crops_for_assign=[0,8]"], "swav.crops_for_assign")  # 2 + 6 crops: indices 0..7
    assert "[0, 8)" in str(err)
    # The bound follows the crop counts.
    cfg = load_config(overrides=["crops.local_count=7", "swav.crops_for_assign=[0,8]"])
    assert cfg.swav.crops_for_assign == (0, 8)


def test_cosine_schedule_needs_cosine_images_past_warmup():
    refused(["optim.schedule=warmup-cosine", "optim.warmup_images=1000", "optim.cosine_images=1000"],
            "optim.cosine_images")
    assert load_config(overrides=["optim.warmup_images=1000", "optim.cosine_images=1000"]).optim.cosine_images == 1000


def test_a_single_learner_needs_a_batch_of_at_least_two():
    refused(["train.batch_size=1"], "train.batch_size")
    cfg = load_config(overrides=["train.batch_size=1", "train.learners=2"])
    assert cfg.train.batch_size == 1


def test_boundary_values_are_accepted():
    cfg = load_config(overrides=[
        "crops.hflip_prob=0", "augment.blur_prob_local=1", "augment.hue=0.5", "train.cpu_threads=0",
        "crops.global_scale=[1,1]", "metrics.port=0", "optim.weight_decay=0", "swav.prior_exponent=0",
    ])
    assert cfg.crops.global_scale == (1.0, 1.0)
    assert cfg.augment.hue == 0.5


def test_merge_dicts_merges_nested_dicts_without_changing_its_inputs():
    a = {"train": {"batch_size": 8, "seed": 1}, "model": {"arch": "resnet18"}, "keep": 1}
    b = {"train": {"seed": 2, "learners": 3}, "optim": {"base_lr": 0.3}, "keep": {"now": "a dict"}}
    a_before = {"train": {"batch_size": 8, "seed": 1}, "model": {"arch": "resnet18"}, "keep": 1}
    b_before = {"train": {"seed": 2, "learners": 3}, "optim": {"base_lr": 0.3}, "keep": {"now": "a dict"}}
    merged = merge_dicts(a, b)
    assert merged == {"train": {"batch_size": 8, "seed": 2, "learners": 3}, "model": {"arch": "resnet18"},
                      "optim": {"base_lr": 0.3}, "keep": {"now": "a dict"}}
    assert a == a_before and b == b_before
    # A dict replaces a non-dict and vice versa, rather than merging.
    assert merge_dicts({"x": {"y": 1}}, {"x": 5}) == {"x": 5}
    # Changing the result never reaches back into an input (e.g. a module-level recipe).
    merged["model"]["arch"] = "resnet50"
    merged["optim"]["base_lr"] = 9.9
    assert a == a_before and b == b_before


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


@pytest.mark.parametrize("text", ["- train\n- optim\n", "just a string\n", "42\n"])
def test_yaml_whose_top_level_is_not_a_mapping_is_refused(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: top level must be a mapping of sections")):
        load_config(path)


def test_yaml_section_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "section.yaml"
    path.write_text("train: 64\n")
    with pytest.raises(ConfigError, match=r"^train: expected a mapping, got 64"):
        load_config(path)


def test_missing_yaml_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": cannot read"):
        load_config(path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [batch_size: 8\n")
    with pytest.raises(ConfigError, match=re.escape(str(broken)) + ": not valid YAML at line 2, column 1") as refused:
        load_config(broken)
    assert "\n" not in str(refused.value)  # was 5-7 lines of PyYAML's marks
    # Not text, and nested past Python's recursion limit: tracebacks before.
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(128, 256)) * 3)
    with pytest.raises(ConfigError, match=re.escape(str(garbage)) + ": not UTF-8 text"):
        load_config(garbage)
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match=re.escape(str(deep)) + ": nested too deep"):
        load_config(deep)


def test_min_learners_makes_the_group_elastic_and_may_not_exceed_learners():
    fixed = load_config(overrides=["train.learners=4"])
    assert (fixed.train.fewest_learners, fixed.train.elastic) == (4, False)
    elastic = load_config(overrides=["train.learners=4", "train.min_learners=2"])
    assert (elastic.train.fewest_learners, elastic.train.elastic) == (2, True)
    assert "train.learners (0: equal to it)" in str(refused(["train.learners=2", "train.min_learners=3"],
                                                            "train.min_learners"))
    refused(["train.collective_timeout_s=0"], "train.collective_timeout_s")


def test_resampling_needs_a_balance_to_resample_by():
    err = refused(["curation.balance_mode=resample"], "curation.balance_mode")
    assert "curation.balance > 0" in str(err)
    refused(["curation.balance_mode=drop"], "curation.balance_mode")
    refused(["curation.balance=1", "curation.balance_mode=resample", "curation.resample_share=1"],
            "curation.resample_share")
    cfg = load_config(overrides=["curation.balance=1", "curation.balance_mode=resample"])
    assert (cfg.curation.resample_max_shows, cfg.curation.resample_share) == (10, 0.75)
    # The cache must outlast a replay request's way back: (inflight + 2) batches.
    err = refused(["curation.balance=1", "curation.balance_mode=resample", "train.batch_size=512"],
                  "curation.resample_cache")
    assert "= 2048" in str(err)
    refused(["curation.balance=1", "curation.balance_mode=resample", "train.batch_size=2", "curation.resample_share=0.4"],
            "curation.resample_share")


def test_the_reference_signal_needs_its_shards():
    err = refused(["curation.balance=1", "curation.balance_signal=reference"], "curation.balance_reference")
    assert "curated reference set" in str(err)
    cfg = load_config(overrides=["curation.balance=1", "curation.balance_signal=reference",
                                 "curation.balance_reference=s3://bucket/reference/"])
    assert (cfg.curation.balance_reference_images, cfg.curation.balance_reference_similarity) == (1000, -1.0)
    load_config(overrides=["curation.balance_signal=reference"])  # balance off: nothing to refuse
    refused(["curation.balance_reference_similarity=1.5"], "curation.balance_reference_similarity")
    # It places each image by its first global crop.
    err = refused(["curation.balance=1", "curation.balance_signal=reference", "curation.balance_reference=ref/",
                   "crops.global_count=0", "crops.local_count=2"], "curation.balance_signal")
    assert "crops.global_count >= 1" in str(err)


def test_the_balance_estimates_are_bounded():
    # Every step folds balance_classes shares and compares each image with balance_bank features.
    refused(["curation.balance_classes=1000000000000"], "curation.balance_classes")
    refused(["curation.balance_bank=100000000"], "curation.balance_bank")
    cfg = load_config(overrides=["curation.balance_classes=21841", "curation.balance_bank=65536"])
    assert (cfg.curation.balance_classes, cfg.curation.balance_bank) == (21841, 65536)


def test_replay_rows_keep_the_share_of_a_full_batch_and_of_one_cut_short():
    curation = CurationConfig(resample_share=0.75)
    # A full batch of 128: 96 rows for replays, so 4 shows per image read at most on average.
    assert curation.replay_slots(128) == 96 and curation.replay_budget(128) == 4.0
    # Beside 32 fresh rows as many replays as a full batch holds; beside 5, 15; beside none, none.
    assert (curation.replays_beside(32), curation.replays_beside(5), curation.replays_beside(0)) == (96, 15, 0)
    half = CurationConfig(resample_share=0.5)
    assert (half.replay_slots(3), half.replays_beside(3), half.replays_beside(1)) == (1, 3, 1)


@pytest.mark.parametrize("key, value, says", [
    ("data.shards", "gs://bucket/x", "data.shards: must be a local path, file://... or s3://<bucket>/..."),
    ("checkpoint.dir", "s3://", "checkpoint.dir: must be a local path"),
    ("curation.balance_reference", "ftp://host/ref", "curation.balance_reference: must be a local path"),
    ("data.shards", "s3://Bad_Bucket!/x", "data.shards: must be a local path"),
    ("storage.endpoint_url", "minio:9000", "storage.endpoint_url: must be empty or an http(s)://host[:port] URL"),
    ("storage.region", "bad region/", "storage.region: must be empty or a region name"),
    ("data.seed", -1, "data.seed: must be in [0, 2**32)"),
    ("train.seed", 10**30, "train.seed: must be in [0, 2**32)"),
    ("augment.mean", [float("nan"), 0, 0], "augment.mean: must be finite"),
    ("augment.std", [float("inf"), 1, 1], "augment.std: must be finite and > 0"),
    ("model.feature_grid", 100_000, "model.feature_grid: must be in [1, 32]"),
    # Lease reads and writes wait lease_s / 8 at most: under 10 s, one slow answer would fail them.
    ("checkpoint.lease_s", 5, "checkpoint.lease_s: must be 0 (no lease) or in [10, 86400]"),
    ("checkpoint.lease_s", float("nan"), "checkpoint.lease_s: must be 0 (no lease) or in [10, 86400]"),
])
def test_values_that_used_to_fail_deep_in_a_run_are_refused_at_the_edge(key, value, says):
    """Each of these passed validation and then failed with a traceback (a scheme storage cannot read,
    an endpoint botocore refuses), crash-looped the learners (a seed numpy refuses), or trained
    non-finite losses until exit 3 (a NaN mean)."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as refused:
        config_from_dict({section: {name: value}})
    assert str(refused.value).startswith(says)


def test_storage_urls_and_endpoints_that_work_are_accepted():
    config_from_dict({"data": {"shards": "s3://my-bucket.eu/shards/{000000..000099}.tar"},
                      "checkpoint": {"dir": "file:///tmp/ckpt"},
                      "storage": {"endpoint_url": "http://[::1]:9000", "region": "eu-west-1"},
                      "curation": {"balance_reference": "s3a://ref/"}})
    config_from_dict({"storage": {"endpoint_url": "https://s3.example.com/path"}, "data": {"seed": 2**32 - 1}})


def test_a_yaml_number_where_text_goes_is_refused_not_retyped(tmp_path):
    """YAML reads `dir: 0755` as 493 and `shards: 1_000` as 1000: taken as text, they named
    other folders silently. From --set the text is kept as typed."""
    path = tmp_path / "numbers.yaml"
    path.write_text("checkpoint:\n  dir: 0755\n")
    with pytest.raises(ConfigError, match=r"checkpoint.dir: expected a string .*got 493"):
        load_config(path)
    path.write_text("checkpoint:\n  dir: '0755'\n")
    assert load_config(path).checkpoint.dir == "0755"
    assert load_config(overrides=["checkpoint.dir=0755"]).checkpoint.dir == "0755"


def test_absurd_sizes_are_refused_and_dedup_settings_without_dedup_are_flagged():
    with pytest.raises(ConfigError, match=r"train.batch_size: must be in \[1, 1,048,576\]"):
        config_from_dict({"train": {"batch_size": 10**30}})
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer: must be in \[1, 16,777,216\]"):
        config_from_dict({"data": {"shuffle_buffer": 10**18}})
    said = config_from_dict({"curation": {"max_repeats": 3}}).warnings()
    assert "curation.max_repeats: set to 3, but curation.dedup is off, so it does nothing" in said
    assert not [w for w in config_from_dict({"curation": {"dedup": True, "max_repeats": 3}}).warnings()
                if "curation." in w]


def test_override_mistakes_name_what_was_typed():
    with pytest.raises(ConfigError, match=r"^optim.base_lr: expected a number, got \{'x': '1'\}$"):
        load_config(overrides=["optim.base_lr.x=1"])  # showed OverrideText(text='1', parsed=1)
    for pair in (".base_lr=5", "optim.=5", "optim..base_lr=5"):
        with pytest.raises(ConfigError, match="expected section.key=value"):
            load_config(overrides=[pair])  # "": unknown key
