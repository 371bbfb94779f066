import math
import socket
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from stream_swav.config import MetricsConfig
from stream_swav.runtime.metrics import (
    usage_perplexity,
    EVAL_METRIC_NAMES,
    METRIC_NAMES,
    TRAINER_METRIC_NAMES,
    EvalMetrics,
    Metrics,
    PrototypeUsage,
    collapse_alarm,
    CollapseSettings,
)


def scrape(port: int) -> dict[str, float]:
    """Sample name (labels appended as {k=v}) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_trainer_metrics_are_served_with_their_values():
    clock = FakeClock(1_000.0)
    metrics = Metrics(clock=clock)
    port = metrics.start_server("127.0.0.1", 0)
    try:
        assert port > 0
        metrics.observe_steps(steps=1, images=64, images_seen=6_464, loss=7.5, learning_rate=0.15)
        metrics.observe_steps(steps=1, images=64, images_seen=6_528, loss=7.25, learning_rate=0.3)
        metrics.count_nonfinite_loss()
        metrics.set_throughput(images_per_second=812.5, input_wait_ratio=0.25, input_wait_s=1.5, busy_s=4.5)
        metrics.set_throughput(images_per_second=812.5, input_wait_ratio=0.25, input_wait_s=0.5, busy_s=1.5)
        metrics.set_swav_health(queue_fill_ratio=0.5, prototype_perplexity=123.0, prototypes_unused=7,
                                sinkhorn_marginal_error=0.01, feature_spread=0.5, score_spread=0.25,
                                collapse=True)
        metrics.set_gpu_memory(allocated_bytes=3 * 2**30, reserved_bytes=4 * 2**30)
        metrics.set_actors_up(learners=1, decode_actors=6, learners_target=2)
        metrics.count_resize("shrink")
        metrics.count_rollback_steps(3)
        metrics.count_decode_errors({"corrupt_image": 2, "too_large": 1})
        metrics.count_decode_errors({"corrupt_image": 3})
        metrics.count_curation({"duplicate": 4}, seen_hashes=900)
        metrics.count_curation({"duplicate": 2}, seen_hashes=1_000)
        metrics.count_reads(bytes_read=10_000, shards_completed=2)
        metrics.count_decode_actor_restarts()
        metrics.count_learner_restart()
        metrics.set_batches_in_flight(5)
        metrics.observe_checkpoint(step=100, wall_time=990.0, duration_s=1.5, size_bytes=2_048)
        metrics.count_checkpoint_failure()
        clock.now = 1_030.0

        samples = scrape(port)
        p = "stream_swav_"
        expected = {
            p + "images_trained_total": 128, p + "steps_total": 2, p + "images_seen": 6_528,
            p + "loss": 7.25, p + "learning_rate": 0.3, p + "nonfinite_loss_total": 1,
            p + "images_per_second": 812.5, p + "input_wait_ratio": 0.25,
            p + "input_wait_seconds_total": 2.0, p + "learner_busy_seconds_total": 6.0,
            p + "queue_fill_ratio": 0.5, p + "prototype_perplexity": 123.0, p + "prototypes_unused": 7,
            p + "sinkhorn_marginal_error": 0.01, p + "feature_spread": 0.5, p + "prototype_score_spread": 0.25,
            p + "collapse_alarm": 1,
            p + "gpu_memory_allocated_bytes": 3 * 2**30, p + "gpu_memory_reserved_bytes": 4 * 2**30,
            p + "learners": 1, p + "decode_actors_up": 6, p + "learners_target": 2,
            p + "resizes_total{direction=shrink}": 1, p + "resizes_total{direction=grow}": 0,
            p + "rollback_steps_total": 3,
            p + "decode_errors_total{reason=corrupt_image}": 5, p + "decode_errors_total{reason=too_large}": 1,
            p + "curation_dropped_total{reason=duplicate}": 6, p + "curation_seen_hashes": 1_000,
            p + "bytes_read_total": 10_000, p + "shards_completed_total": 2,
            p + "decode_actor_restarts_total": 1, p + "learner_restarts_total": 1,
            p + "object_store_batches_in_flight": 5,
            p + "checkpoint_age_seconds": 40.0, p + "checkpoint_duration_seconds": 1.5,
            p + "checkpoint_size_bytes": 2_048, p + "last_checkpoint_step": 100,
            p + "checkpoints_saved_total": 1, p + "checkpoint_failures_total": 1,
        }
        for name, value in expected.items():
            assert samples.get(name) == pytest.approx(value), name
        served = {name.split("{")[0] for name in samples}
        assert set(TRAINER_METRIC_NAMES) <= served
    finally:
        metrics.stop_server()


def test_checkpoint_age_counts_from_start_until_the_first_checkpoint():
    clock = FakeClock(500.0)
    metrics = Metrics(clock=clock)
    clock.now = 620.0
    assert metrics.registry.get_sample_value("stream_swav_checkpoint_age_seconds") == 120.0


def test_a_checkpoint_found_on_resume_sets_the_age_but_is_not_counted_as_saved():
    clock = FakeClock(1_000.0)
    metrics = Metrics(clock=clock)
    metrics.observe_checkpoint(step=40, wall_time=900.0, duration_s=0.0, size_bytes=10, saved_now=False)
    assert metrics.registry.get_sample_value("stream_swav_checkpoint_age_seconds") == 100.0
    assert metrics.registry.get_sample_value("stream_swav_last_checkpoint_step") == 40
    assert metrics.registry.get_sample_value("stream_swav_checkpoints_saved_total") == 0


def test_server_binds_only_the_configured_host_and_stops():
    metrics = Metrics()
    port = metrics.start_server("127.0.0.1", 0)
    try:
        assert "stream_swav_steps_total" in scrape(port)
        with pytest.raises(RuntimeError, match="already listening"):
            metrics.start_server("127.0.0.1", 0)
        # Another local address of the machine must not reach the endpoint.
        other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        other.settimeout(5)
        try:
            assert other.connect_ex(("127.0.0.2", port)) != 0
        finally:
            other.close()
    finally:
        metrics.stop_server()
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        probe.close()


def test_two_instances_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.observe_steps(steps=1, images=8, images_seen=8, loss=1.0, learning_rate=0.1)
    assert a.registry.get_sample_value("stream_swav_steps_total") == 1
    assert b.registry.get_sample_value("stream_swav_steps_total") == 0


def test_decode_error_reasons_are_capped():
    metrics = Metrics()
    metrics.count_decode_errors({f"reason_{i}": 1 for i in range(40)})
    reasons = {s.labels["reason"] for f in metrics.registry.collect() if f.name == "stream_swav_decode_errors"
               for s in f.samples if s.name.endswith("_total")}
    assert len(reasons) == 33 and "other" in reasons
    assert metrics.registry.get_sample_value("stream_swav_decode_errors_total", {"reason": "other"}) == 8


def test_eval_metrics_are_served():
    metrics = EvalMetrics()
    port = metrics.start_server("127.0.0.1", 0)
    try:
        metrics.observe_evaluation(step=300, images_seen=19_200, knn_top1=0.42, duration_s=12.0)
        metrics.count_failure()
        samples = scrape(port)
    finally:
        metrics.stop_server()
    assert samples["stream_swav_eval_knn_top1_ratio"] == pytest.approx(0.42)
    assert samples["stream_swav_eval_checkpoint_step"] == 300
    assert samples["stream_swav_eval_images_seen"] == 19_200
    assert samples["stream_swav_evaluations_total"] == 1
    assert samples["stream_swav_eval_failures_total"] == 1
    assert set(EVAL_METRIC_NAMES) <= set(samples)


def test_metric_names_follow_conventions():
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    assert all(name.startswith("stream_swav_") for name in METRIC_NAMES)
    counters = {f.name + "_total" for m in (Metrics(), EvalMetrics()) for f in m.registry.collect()
                if f.type == "counter"}
    assert counters == {name for name in METRIC_NAMES if name.endswith("_total")}


def test_collapse_alarm_fires_on_lost_spread_or_shrunk_usage_after_warmup_only():
    settings = CollapseSettings(spread=0.05, score_spread=0.02, perplexity=2.0, after_images=1_000)
    healthy = {"feature_spread": 0.4, "score_spread": 0.25, "perplexity": 3.4, "settings": settings}
    assert not collapse_alarm(**healthy, images_seen=10_000)
    assert collapse_alarm(**{**healthy, "feature_spread": 0.01}, images_seen=10_000)
    # Spread embeddings that no prototype tells apart (measured: 0.0009 on such a run, 0.24-0.27 on healthy ones).
    assert collapse_alarm(**{**healthy, "score_spread": 0.001}, images_seen=10_000)
    assert collapse_alarm(**{**healthy, "perplexity": 1.1}, images_seen=10_000)
    # Not before warm-up: an untrained network's embeddings are close together too.
    assert not collapse_alarm(**{**healthy, "feature_spread": 0.01}, images_seen=999)
    assert not collapse_alarm(feature_spread=math.nan, score_spread=math.nan, perplexity=math.nan, settings=settings,
                              images_seen=10_000)


def test_collapse_settings_resolve_automatic_values():
    assert CollapseSettings.from_config(MetricsConfig(), prototypes=3000, warmup_images=500) == \
        CollapseSettings(spread=0.05, score_spread=0.02, perplexity=60.0, after_images=500)
    # With few prototypes K/50 < 1 could never fire; everything on one prototype (perplexity 1) must.
    assert CollapseSettings.from_config(MetricsConfig(), prototypes=30, warmup_images=0).perplexity == 2.0
    cfg = MetricsConfig(collapse_perplexity=10.0, collapse_after_images=7, collapse_spread=0.1)
    assert CollapseSettings.from_config(cfg, prototypes=3000, warmup_images=500) == CollapseSettings(0.1, 0.02, 10.0, 7)

def test_usage_perplexity_of_counts():
    assert math.isnan(usage_perplexity([0, 0, 0]))
    assert usage_perplexity([3, 3, 3, 3]) == pytest.approx(4.0)
    assert usage_perplexity([0, 7, 0]) == pytest.approx(1.0)
    p = np.array([5, 1, 1, 1]) / 8
    assert usage_perplexity([5, 1, 1, 1]) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_prototype_usage_window():
    usage = PrototypeUsage(num_prototypes=4, window_steps=2)
    assert math.isnan(usage.perplexity()) and usage.unused() == 4
    usage.update_from_counts([1, 1, 1, 1])
    assert usage.perplexity() == pytest.approx(4.0)
    assert usage.unused() == 0
    usage.update_from_counts(np.array([4, 0, 0, 0]))
    # Window = both steps: counts [5, 1, 1, 1].
    assert usage.perplexity() == pytest.approx(usage_perplexity([5, 1, 1, 1]))
    usage.update_from_counts([2, 0, 0, 0])
    # The first step has left the window: only prototype 0 is used.
    assert usage.perplexity() == pytest.approx(1.0)
    assert usage.unused() == 3
    with pytest.raises(ValueError, match="4 non-negative integers"):
        usage.update_from_counts(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="4 non-negative integers"):
        usage.update_from_counts(np.array([1, -2, 0, 0]))
    with pytest.raises(ValueError, match="4 non-negative integers"):
        usage.update_from_counts(np.array([0.5, 0, 0, 0]))
    assert usage.perplexity() == pytest.approx(1.0)  # refused counts changed nothing


def test_prototype_usage_window_counts_steps_not_chunks():
    usage = PrototypeUsage(num_prototypes=2, window_steps=10)
    usage.update_from_counts([5, 0], steps=6)
    usage.update_from_counts([0, 5], steps=6)
    # 12 steps held: the older chunk is still needed to cover 10 steps.
    assert usage.perplexity() == pytest.approx(2.0)
    usage.update_from_counts([0, 5], steps=4)
    # The newest two chunks cover 10 steps: the oldest left the window.
    assert usage.unused() == 1
    usage.update_from_counts([7, 0], steps=25)
    # A chunk longer than the window is the window alone.
    assert usage.unused() == 1 and usage.perplexity() == pytest.approx(1.0)


def test_a_chunk_summary_merges_every_ranks_report():
    from stream_swav.runtime.reports import ChunkSummary, Progress, StepReport

    def report(rank: int, **values) -> StepReport:
        progress = Progress()
        progress.positions = {("pass0", f"shard-{rank}"): 10 * (rank + 1)}
        progress.bytes_read = 100
        return StepReport(rank=rank, steps=4, step=40, images=256, images_seen=10_240, loss=3.0 + rank, lr=0.5,
                          prototype_counts=[rank, 1], progress=progress, latency_s=[0.1 * rank],
                          failed_feeders=[rank, 7], batches_held=2, gpu_memory_reserved_bytes=rank * 10, **values)

    summary = ChunkSummary.merge([report(0, busy_s=9.0, wait_s=1.0), report(1, busy_s=7.0, wait_s=3.0)])

    assert (summary.steps, summary.step, summary.images_seen, summary.loss) == (4, 40, 10_240, 3.0)  # rank 0's
    assert summary.images == 512 and summary.prototype_counts == [1, 2] and summary.batches_held == 4
    assert summary.progress.bytes_read == 200 and len(summary.progress.positions) == 2
    assert summary.failed_feeders == [0, 1, 7] and summary.latency_s == [0.0, 0.1]
    assert summary.gpu_memory_reserved_bytes == 10
    # The pacing rank is the one that waited most: its own wait and busy seconds, and their ratio.
    assert (summary.wait_s, summary.busy_s, summary.input_wait_ratio) == (3.0, 7.0, 0.3)


def test_the_union_of_survivors_views_takes_each_ranks_longest_and_counts_nothing_twice():
    from collections import Counter

    from stream_swav.runtime.reports import GroupView, Progress

    def delta(rank: int, position: int, errors: int = 0, finished: bool = False) -> Progress:
        shard = (0, rank)
        return Progress(positions={shard: position}, finished=[shard] if finished else [],
                        errors=Counter({"corrupt_image": errors}) if errors else Counter(), bytes_read=10)

    # Ranks 0, 1 and 2 committed two steps; rank 2 then died. Survivor 0 completed a third step
    # (with rank 2's last batch, which finished its shard) that survivor 1's collective failed on.
    ahead, behind = GroupView(), GroupView()
    for view in (ahead, behind):
        for position in (8, 16):
            for rank in range(3):
                view.commit(rank, delta(rank, position, errors=1))
    for rank in range(3):
        ahead.commit(rank, delta(rank, 24, finished=rank == 2))

    union = GroupView.union([behind, ahead])
    assert union.positions == {(0, 0): 24, (0, 1): 24, (0, 2): 24}
    assert union.finished == [(0, 2)]
    # Each rank's view counted once: 3 steps x 3 ranks, not summed over the two survivors.
    assert union.bytes_read == 90 and union.errors == {"corrupt_image": 6}
    assert GroupView.union([behind]).positions == {(0, 0): 16, (0, 1): 16, (0, 2): 16}


@pytest.mark.parametrize("signal, highest, warned", [("label", 1_000, True), ("label", 999, False),
                                                     ("prototypes", 5_000, False)])
def test_classes_beyond_the_label_balance_are_said_once(caplog, signal, highest, warned):
    """A label-balanced run whose stream carries class indices at or above curation.balance_classes
    leaves those images unbalanced: the driver says so once, naming the key; it says nothing when
    every class fits, or when the labels balance nothing."""
    from stream_swav.config import Config
    from stream_swav.data.batch import BatchMeta
    from stream_swav.runtime.observers import RunObserver
    from stream_swav.runtime.reports import Progress

    cfg = Config()
    cfg.curation.balance, cfg.curation.balance_signal, cfg.curation.balance_classes = 1.0, signal, 1_000
    observer = RunObserver(cfg.validate(), Metrics())
    progress = Progress.of(BatchMeta(keys=["a", "b", "c"], labels=[3, -1, highest]))
    other_rank = Progress.of(BatchMeta(keys=["d"], labels=[7]))
    progress.merge(other_rank)
    assert progress.max_label == highest and Progress().max_label == -1
    with caplog.at_level("WARNING"):
        for _ in range(3):
            observer._count_progress(progress)
    said = [r.getMessage() for r in caplog.records if "curation.balance_classes" in r.getMessage()]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert f"class {highest}" in said[0] and "balance_classes=1000" in said[0]


def test_a_stall_names_the_commonest_skip_reasons_and_the_settings_behind_them(caplog):
    """A stream whose every image a limit refuses (data.min_side above the images' side) trained
    nothing, and the stall warning said only how many decode errors there were."""
    from stream_swav.config import Config
    from stream_swav.runtime.observers import RunObserver
    from stream_swav.runtime.reports import Progress

    observer = RunObserver(Config().validate(), Metrics())
    progress = Progress()
    progress.errors.update({"too-small": 400, "truncated": 3})
    observer._count_progress(progress)
    with caplog.at_level("WARNING"):
        observer.on_stall(20.0, {0: 0}, shards_listed=4, paused_s=0.0)
    said = caplog.records[-1].getMessage()
    assert "decode errors so far 403 (too-small 400: data.min_side, truncated 3)" in said


@pytest.mark.parametrize("saved_swav, now_swav, emptied", [
    ({"queue_length": 32}, {"queue_length": 64}, True),
    ({"queue_length": 32, "crops_for_assign": [0, 1]}, {"queue_length": 32, "crops_for_assign": [0]}, True),
    ({"queue_length": 0}, {"queue_length": 32}, True),
    ({"queue_length": 32, "crops_for_assign": [0, 1]}, {"queue_length": 32, "crops_for_assign": [1, 0]}, False),
    ({"queue_length": 32}, {"queue_length": 0}, False),
    ({"queue_length": 32, "temperature": 0.1}, {"queue_length": 32, "temperature": 0.2}, False),
])
def test_a_resume_names_the_settings_changed_since_its_checkpoint_and_whether_the_queue_starts_empty(
        caplog, saved_swav, now_swav, emptied):
    """As the learners have it: a saved queue of another shape is not loaded; one of the same shape
    is, rows by position."""
    from stream_swav.checkpoint import ResumePoint
    from stream_swav.config import load_config
    from stream_swav.runtime.observers import RunObserver

    def swav_settings(values: dict) -> list[str]:
        return [f"swav.{key}={value}" for key, value in values.items()]

    saved = load_config(overrides=swav_settings(saved_swav)).to_dict()
    now = load_config(overrides=swav_settings(now_swav) + ["train.image_budget=100"])
    observer = RunObserver(now, Metrics())
    point = ResumePoint(step=7, url="ckpt/step-000000007", state={}, record={"config": saved}, skipped=[])
    with caplog.at_level("INFO"):
        observer.on_resume(point, 7, 700)
    said = caplog.records[-1]
    assert said.getMessage().startswith("settings changed since checkpoint step 7 was saved: ")
    changed = [key for key in saved_swav if saved_swav[key] != now_swav[key]]
    assert all(f"swav.{key} " in said.getMessage() for key in changed)
    assert "train.image_budget 0 -> 100" in said.getMessage() and said.levelname == "WARNING"
    assert said.getMessage().endswith("; the feature queue starts empty") == emptied
