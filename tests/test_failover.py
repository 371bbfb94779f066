"""Failures a cluster brings, on real Ray clusters: learners killed, a node removed, too few
resources, a stop while waiting for them.

The tests share one cluster made with `ray.cluster_utils.Cluster` (raylets with their own object
stores on this machine, as Ray's own tests do): each starts from its head alone, or from its head and
one worker node (`worker_node`), with every CPU free, and trains the tiny CPU configuration. A worker
node is kept for the next test that wants one (tests that want one are placed together), since
starting a raylet and seeing it go costs seconds of both cores; a test may remove it.
Which samples were trained comes from the RecordingLearner's log, written inside the learners,
so work done by a learner that is killed afterwards is counted too.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import pytest
import ray
from conftest import colour_samples, tar_bytes
from ray.cluster_utils import Cluster
from runtime_helpers import (RAY_ENV, WatchedTrainer, close_trainer, object_url, pass_counts, run_to_end, runs,
                             sample_keys, tiny_config, write_shard)

from stream_swav.config import Config
from stream_swav.runtime import driver
from stream_swav.runtime.cluster import ClusterPlan, StartupError, plan_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Nodes that stop answering are declared dead within about 2 seconds instead of Ray's 15.
FAST_FAILURE_DETECTION = {"health_check_failure_threshold": 3, "health_check_period_ms": 500,
                          "health_check_initial_delay_ms": 0}


HEAD_CPUS = 3
WORKER_CPUS = 3


@pytest.fixture(scope="module")
def module_cluster():
    """One cluster for the module (a cluster's start costs ~10 s on 2 cores); `cluster` resets it."""
    made = Cluster(initialize_head=True, connect=False,
                   head_node_args={"num_cpus": HEAD_CPUS, "include_dashboard": False,
                                   "_system_config": FAST_FAILURE_DETECTION})
    ray.init(address=made.address, runtime_env=RAY_ENV, log_to_driver=False)
    yield made
    ray.shutdown()
    made.shutdown()


@pytest.fixture
def cluster(module_cluster):
    """The module's cluster as each test expects it: the head alone, all its CPUs free. A worker node
    kept from a test before is removed, and the test waits until Ray has seen it go and the actors
    of the test before have released their CPUs."""
    for node in list(module_cluster.worker_nodes):
        module_cluster.remove_node(node)
    wait_for_free(nodes=1, cpus=HEAD_CPUS)
    return module_cluster


@pytest.fixture
def worker_node(module_cluster):
    """A worker node of WORKER_CPUS beside the module's head, every CPU of both free: the one a test
    before kept, else a new one. The test may remove it (`module_cluster.remove_node`)."""
    kept = next(iter(module_cluster.worker_nodes), None)
    if kept is not None and not kept.any_processes_alive():  # its raylet died (not removed by a test)
        module_cluster.remove_node(kept, allow_graceful=False)
    if not module_cluster.worker_nodes:
        module_cluster.add_node(num_cpus=WORKER_CPUS)
        module_cluster.wait_for_nodes()
    wait_for_free(nodes=2, cpus=HEAD_CPUS + WORKER_CPUS)
    return next(iter(module_cluster.worker_nodes))


def wait_for_free(nodes: int, cpus: int, timeout_s: float = 60) -> None:
    """Until `nodes` nodes are alive with `cpus` CPUs in all, every one of them free."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [node for node in ray.nodes() if node["Alive"]]
        free = ray.available_resources().get("CPU", 0)
        if len(alive) == nodes and free == cpus and ray.cluster_resources().get("CPU") == cpus:
            return
        assert time.monotonic() < deadline, \
            f"cluster not back to {nodes} node(s) and {cpus} free CPUs: {len(alive)} nodes, {free} CPUs free"
        time.sleep(0.2)


def shards(folder, count: int = 4, size: int = 16) -> tuple[str, set[str]]:
    keys: set[str] = set()
    for index in range(count):
        samples = colour_samples(size, prefix=f"s{index}", start=100 * index)
        url = write_shard(object_url(str(folder), f"shard-{index}.tar"), tar_bytes(samples))
        keys |= sample_keys(url, samples)
    return str(folder), keys


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()))


# ------------------------------------------------------------------------------------ learner failure


def test_a_killed_learner_is_replaced_and_only_what_followed_the_checkpoint_is_trained_again(cluster, tmp_path):
    folder, keys = shards(tmp_path / "shards")
    # One reader on one shard at a time: a fixed stream order, so the replay can be checked exactly.
    cfg = tiny_config({"data": {"shards": folder, "open_shards_per_actor": 1},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
                       "train": {"image_budget": len(keys)}})
    # The learner dies (SIGKILL) right after step 5, past its checkpoint at step 4; once.
    dying = {"die_after_step": 5, "die_once_marker": str(tmp_path / "died")}
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", dying=dying)

    assert trainer.restarts == 1
    assert trainer.metrics.registry.get_sample_value("stream_swav_learner_restarts_total") == 1
    killed_run, recovered_run = runs(trainer.trained)
    assert max(s.step for s in killed_run) == 5 and min(s.step for s in recovered_run) == 5
    counts = collections.Counter(s.key for s in killed_run + recovered_run)
    # Every sample of the stream was trained, none lost...
    assert set(counts) == keys
    # ...and the only ones trained twice are those of the step after the last checkpoint.
    assert {key for key, n in counts.items() if n > 1} == {s.key for s in killed_run if s.step == 5}
    assert max(counts.values()) == 2
    assert trainer.images_seen == len(keys)


def test_a_learner_lost_while_the_run_starts_is_a_counted_failure_and_the_run_goes_on(cluster, tmp_path):
    folder, keys = shards(tmp_path / "shards")
    cfg = tiny_config({"data": {"shards": folder},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": len(keys)}})
    dying = {"die_while_starting": True, "die_once_marker": str(tmp_path / "died")}
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", dying=dying)
    assert trainer.restarts == 1
    assert trainer.metrics.registry.get_sample_value("stream_swav_learner_restarts_total") == 1
    assert collections.Counter(s.key for s in trainer.trained) == {key: 1 for key in keys}


def test_a_spent_failure_budget_ends_the_run_with_one_clear_line(cluster, tmp_path, caplog):
    folder, _ = shards(tmp_path / "shards", count=2)
    cfg = tiny_config({"data": {"shards": folder},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 1},
                       "train": {"max_failures": 1}})  # no budget: only the failures end it
    caplog.set_level(logging.INFO, logger="stream_swav")
    # Every learner dies after its first step.
    trainer = WatchedTrainer(cfg, tmp_path / "trained.jsonl", dying={"die_after_step": 1})
    assert driver.train(cfg, trainer) == driver.EXIT_FAILED
    assert ray.is_initialized(), "train() disconnected from a Ray its caller had connected to"
    final = [r for r in caplog.records if r.levelno >= logging.ERROR][-1].getMessage()
    assert "learners failed 2 time(s), more than train.max_failures=1" in final
    assert "\n" not in final and "the latest checkpoint is step" in final


def test_learners_the_configuration_cannot_build_end_the_run_in_one_line_not_in_restarts(worker_node, tmp_path):
    """SyncBatchNorm asked of CPU learners raises as each learner builds its model: the run
    restarted the group until train.max_failures ran out (for ever with -1), then exited 1."""
    folder, keys = shards(tmp_path / "shards")
    cfg = tiny_config({"data": {"shards": folder, "decode_actors": 2}, "model": {"sync_batchnorm": True},
                       "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"learners": 2, "image_budget": len(keys), "max_failures": -1}})
    trainer = driver.Trainer(cfg)
    try:
        with pytest.raises(StartupError, match="the learners cannot be built as configured: model.sync_batchnorm: "
                                               "SyncBatchNorm needs CUDA learners"):
            trainer.run()
    finally:
        close_trainer(trainer)
    assert trainer.restarts == 0


def test_killing_one_of_two_learners_restarts_both_from_scratch_before_any_checkpoint(worker_node, tmp_path, caplog):
    folder, keys = shards(tmp_path / "shards")
    cfg = tiny_config({"data": {"shards": folder, "decode_actors": 2},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"learners": 2, "image_budget": len(keys)}})
    dying = {"die_after_step": 1, "die_rank": 1, "die_once_marker": str(tmp_path / "died")}
    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", dying=dying)

    assert trainer.restarts == 1
    assert "no checkpoint yet: restarting from scratch" in caplog.text
    # After the restart the stream began again: the second run alone covers every sample once.
    *_, final_run = runs(trainer.trained)
    assert collections.Counter(s.key for s in final_run) == {key: 1 for key in keys}
    assert {s.rank for s in final_run} == {0, 1}


# ------------------------------------------------------------------------------------ node failure


def test_a_run_survives_losing_a_node(module_cluster, worker_node, tmp_path):
    folder, keys = shards(tmp_path / "shards", count=6)
    # A replacement that does not fit on the remaining node is given up after 10 s; the shards of
    # pass 0 its slot held wait for it until then, while the other readers read on into later passes.
    # The run stops once pass 0 is complete; its time budget is only a backstop, and one that outlasts
    # that wait whatever the machine's speed (a budget of 6 passes was trained within the 10 s on a
    # quiet machine, which ended the run with pass 0 unfinished).
    cfg = tiny_config({"data": {"shards": folder, "decode_actors": 4, "inflight_batches_per_actor": 2},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 2},
                       "train": {"image_budget": 0, "time_budget_s": 120, "startup_timeout_s": 10}})
    removed: dict[str, object] = {}

    def remove_the_second_node_then_stop_after_pass_zero(trainer: WatchedTrainer) -> None:
        if removed and trainer.ledger.cursor.pass_index >= 1:
            trainer.request_stop("pass 0 trained")
        if removed or trainer.step < 2:
            return
        nodes = {node_of(a) for a in [*trainer.group.actors, *trainer.pool.actors.values()]}
        removed.update(nodes=len(nodes), step=trainer.step)
        module_cluster.remove_node(worker_node)

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=remove_the_second_node_then_stop_after_pass_zero)

    assert removed, "the run ended before the node could be removed"
    assert removed["nodes"] == 2, "the run's actors did not sit on both nodes"
    assert trainer.stop_reason == "pass 0 trained"
    # Whatever was lost with the node (decode actors, their batches, maybe the learner) was read again.
    assert set(s.key for s in trainer.trained) == keys
    decode_restarts = trainer.metrics.registry.get_sample_value("stream_swav_decode_actor_restarts_total") or 0
    assert decode_restarts + trainer.restarts >= 1


@ray.remote(num_cpus=1)
class CpuHolder:
    """Holds a CPU of the cluster, as another job's task would."""

    def ready(self) -> bool:
        return True


def test_a_learner_whose_only_decode_actor_cannot_start_again_waits_for_it_and_loses_nothing(cluster, tmp_path,
                                                                                             caplog):
    folder, keys = shards(tmp_path / "shards", count=4)
    # 3 CPUs: the learner, its one decode actor, one free. A replacement is given 2 s to start.
    cfg = tiny_config({"data": {"shards": folder, "decode_actors": 1},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": 2 * len(keys), "startup_timeout_s": 2}})
    caplog.set_level(logging.INFO, logger="stream_swav")
    seen: dict[str, object] = {}

    def starve_then_free(trainer: WatchedTrainer) -> None:
        if "holders" not in seen and trainer.step >= 2:
            holders = [CpuHolder.remote()]
            ray.get(holders[0].ready.remote())  # the free CPU
            (actor,) = trainer.pool.actors.values()
            ray.kill(actor, no_restart=True)
            # The decode actor's CPU, taken before its replacement (launched at the next chunk) asks.
            holders.append(CpuHolder.remote())
            ray.get(holders[1].ready.remote(), timeout=30)
            seen.update(holders=holders, starved_at=trainer.step)
        elif "holders" in seen and "freed_at" not in seen and "launched again" in caplog.text:
            # From now on a replacement has room: give its start the time a loaded machine needs.
            trainer.cfg.train.startup_timeout_s = 60
            for holder in seen["holders"]:
                ray.kill(holder)
            seen["freed_at"] = trainer.step

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=starve_then_free)

    assert "freed_at" in seen, "the replacement was never launched again"
    assert "decode actor 0 could not start again" in caplog.text and "learner 0's only one" in caplog.text
    # Training went on once the replacement came up.
    assert trainer.step > seen["freed_at"]
    assert trainer.stop_reason == "budget reached" and trainer.images_seen >= 2 * len(keys)
    assert set(s.key for s in trainer.trained) == keys


def test_a_decode_actor_dropped_for_want_of_room_comes_back_when_the_room_does(cluster, tmp_path, caplog):
    folder, keys = shards(tmp_path / "shards", count=4)
    # 3 CPUs: the learner and its two decode actors. A replacement is given 2 s to start; a dropped
    # slot is tried again every 0.5 s.
    cfg = tiny_config({"data": {"shards": folder, "decode_actors": 2},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": 100 * len(keys), "startup_timeout_s": 2,
                                 "resize_interval_s": 0.5}})
    caplog.set_level(logging.INFO, logger="stream_swav")
    seen: dict[str, object] = {}

    def take_room_then_give_it_back(trainer: WatchedTrainer) -> None:
        if "holder" not in seen and trainer.step >= 2:
            victim = min(trainer.pool.actors)
            ray.kill(trainer.pool.actors[victim], no_restart=True)
            # Its CPU, taken before its replacement (launched after the chunk that finds it dead) asks.
            holder = CpuHolder.remote()
            ray.get(holder.ready.remote(), timeout=30)
            seen.update(holder=holder, victim=victim)
        elif "holder" in seen and "freed_at" not in seen and "running without it" in caplog.text:
            assert seen["victim"] in trainer.pool.dropped and len(trainer.pool.actors) == 1
            assert trainer.metrics.registry.get_sample_value("stream_swav_decode_actors_up") == 1
            # From now on the slot's next try has room: give its start the time a loaded machine needs.
            trainer.cfg.train.startup_timeout_s = 60
            ray.kill(seen["holder"])
            seen["freed_at"] = trainer.step
        elif "freed_at" in seen and seen["victim"] in trainer.pool.actors:
            # Back: it holds shards and its batches are trained (the run stops after a few of them).
            if trainer.ledger.holders.get(seen["victim"]):
                seen.setdefault("held_at", trainer.step)
            if "held_at" in seen and trainer.step >= seen["held_at"] + 4:
                seen["at_stop"] = (sorted(trainer.pool.dropped), len(trainer.pool.actors),
                                   trainer.metrics.registry.get_sample_value("stream_swav_decode_actors_up"))
                trainer.request_stop("the dropped decode actor is back")

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=take_room_then_give_it_back)

    assert "freed_at" in seen, "the decode actor was never dropped"
    assert f"decode actor {seen['victim']} is back" in caplog.text
    assert trainer.stop_reason == "the dropped decode actor is back", trainer.stop_reason
    assert seen["at_stop"] == ([], 2, 2)  # nothing dropped, both actors up (and the gauge says so)
    # Every sample of each pass trained once, through the drop and the return; the passes in hand
    # where the run was stopped (two are handed out at a time, and an idle decode actor may run one
    # ahead: the last three) may end unfinished, each of their samples trained at most once.
    last = max(s.pass_index for s in trainer.trained)
    assert last >= 1
    for pass_index in range(last + 1):
        counts = pass_counts(trainer.trained, pass_index)
        if pass_index < last - 2:
            assert counts == {key: 1 for key in keys}, f"pass {pass_index}"
        else:
            assert max(counts.values()) == 1, f"pass {pass_index}"


# ------------------------------------------------------------------------------------ resources


def test_decode_actors_that_do_not_fit_are_scaled_down_with_a_warning(cluster, tmp_path, caplog):
    folder, keys = shards(tmp_path / "shards", count=2)
    # 3 CPUs: the learner takes 1, so 2 of the 5 decode actors fit.
    cfg = tiny_config({"data": {"shards": folder, "decode_actors": 5},
                       "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": 0},
                       "train": {"image_budget": 16}})
    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl")
    assert trainer.metrics.registry.get_sample_value("stream_swav_decode_actors_up") == 2
    assert "data.decode_actors: 5 wanted, running 2 (only 2 fit" in caplog.text


@pytest.mark.parametrize("train, missing", [
    ({"device": "cuda"}, r"1 GPUs requested for 1 learner\(s\), cluster has 0"),
    # More CPUs than the whole cluster has (as after losing a node for good): the learners' placement
    # is what is missing, not CPUs for decode actors.
    ({"device": "cpu", "cpus_per_learner": 4}, r"4 CPUs requested for 1 learner\(s\), cluster has 3"),
])
def test_learners_that_cannot_be_placed_fail_within_the_timeout_naming_what_is_missing(cluster, tmp_path, train,
                                                                                        missing):
    folder, _ = shards(tmp_path / "shards", count=2)
    cfg = tiny_config({"data": {"shards": folder}, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {**train, "startup_timeout_s": 1}})
    trainer = WatchedTrainer(cfg, tmp_path / "trained.jsonl")
    started = time.monotonic()
    try:
        with pytest.raises(StartupError, match=r"train\.learners: .*" + missing):
            trainer.run()
    finally:
        close_trainer(trainer)
    assert time.monotonic() - started < 30


def test_a_stop_while_waiting_for_resources_exits_zero_promptly(cluster, tmp_path):
    folder, _ = shards(tmp_path / "shards", count=2)
    cfg = tiny_config({"data": {"shards": folder}, "checkpoint": {"dir": str(tmp_path / "ckpt")},
                       "train": {"device": "cuda", "startup_timeout_s": 120}})
    trainer = WatchedTrainer(cfg, tmp_path / "trained.jsonl")
    # What the SIGTERM handler does (`ray job stop`), two seconds into the wait.
    threading.Timer(2.0, trainer.request_stop, args=("SIGTERM",)).start()
    started = time.monotonic()
    try:
        assert trainer.run() == 0
    finally:
        close_trainer(trainer)
    assert time.monotonic() - started < 20


def test_plan_scales_decode_actors_to_the_cluster_and_refuses_what_cannot_fit():
    cfg = tiny_config({"data": {"decode_actors": 0}, "train": {"learners": 2, "device": "auto"}})
    plan = plan_cluster(cfg, {"CPU": 16, "GPU": 2})
    assert plan == ClusterPlan(learners=2, gpus_per_learner=1.0, cpus_per_learner=1.0, decode_actors=14)
    # device auto without GPUs: CPU learners.
    assert plan_cluster(cfg, {"CPU": 16}).gpus_per_learner == 0.0
    # Too many asked for: what fits, rounded to a multiple of the learners, with a warning.
    tight = plan_cluster(tiny_config({"data": {"decode_actors": 12}, "train": {"learners": 2}}), {"CPU": 9})
    assert tight.decode_actors == 6 and "12 wanted, running 6" in tight.warnings[0]
    # One per learner at least.
    assert plan_cluster(tiny_config({"data": {"decode_actors": 1}, "train": {"learners": 2}}),
                        {"CPU": 8}).decode_actors == 2
    with pytest.raises(StartupError, match="no CPU left for decode actors"):
        plan_cluster(cfg, {"CPU": 3})
    # The learners themselves do not fit now (a node gone for good): no refusal here, the learners'
    # placement waits up to train.startup_timeout_s and names what they asked for.
    wide = tiny_config({"train": {"learners": 1, "cpus_per_learner": 2}})
    waiting = plan_cluster(wide, {"CPU": 1})
    assert waiting.decode_actors == 1 and waiting.learner_bundle == {"CPU": 2}
    assert waiting.warnings[0].startswith("train.learners:") and "train.startup_timeout_s" in waiting.warnings[0]


# ------------------------------------------------------------------------------------ elastic groups


def metric(trainer, name: str, **labels: str) -> float:
    return trainer.metrics.registry.get_sample_value(name, labels or None) or 0.0


def elastic_config(tmp_path, folder: str, every_steps: int = 0, **train) -> Config:
    """Two decode actors and an elastic group (train: learners, min_learners...) that looks for room
    for joiners every second."""
    return tiny_config({"data": {"shards": folder, "decode_actors": 2},
                        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every_steps": every_steps},
                        "train": {"resize_interval_s": 1, **train}})


@pytest.mark.parametrize("dying, grow_from_steps", [
    # The learner that joined as rank 1 dies (SIGKILL) after 3 steps of its own.
    ({"die_after_own_steps": 3, "die_rank": 1}, None),
    # The first learner, rank 0 (whose state the others take), dies after its first step beside a
    # joiner, which joins at step 20; the group grows back at step 36. Runs of that sequence once
    # stalled for good when the survivor's decode actor held the last shards of pass 0 (whether it
    # does depends on the readers' timing): pass 1's copies of them waited, the new learner's decode
    # actor got none, and the learners step together (test_cursor checks the hand-out now).
    ({"die_in_group_of": 2, "die_rank": 0}, [20, 36]),
], ids=["joiner-dies", "first-dies"])
def test_an_elastic_group_goes_on_without_a_killed_learner_grows_back_and_trains_every_sample_once(
        worker_node, tmp_path, caplog, dying, grow_from_steps):
    folder, keys = shards(tmp_path / "shards", count=8, size=32)
    passes = 3
    cfg = elastic_config(tmp_path, folder, every_steps=4, learners=2, min_learners=1,
                         image_budget=passes * len(keys))
    dying = {**dying, "die_once_marker": str(tmp_path / "died")}  # once: the replacement lives

    def slow_while_short(trainer) -> None:
        if len(trainer.group.actors) < 2:
            time.sleep(1.0)  # leave a joining learner time to start before the stream runs out

    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=slow_while_short, dying=dying,
                         grow_from_steps=grow_from_steps)

    assert (tmp_path / "died").exists(), "the learner never died"
    # It started with one learner, grew to two, went on with one when one died, grew back to two.
    assert "1 learner(s) on cpu" in caplog.text
    assert metric(trainer, "stream_swav_resizes_total", direction="shrink") == 1
    assert metric(trainer, "stream_swav_resizes_total", direction="grow") == 2
    assert metric(trainer, "stream_swav_learners") == 2
    # Nothing was read back from a checkpoint and no step was trained twice.
    assert metric(trainer, "stream_swav_rollback_steps_total") == 0
    assert metric(trainer, "stream_swav_learner_restarts_total") == 0
    assert "resumed from" not in caplog.text and "restarting the learners" not in caplog.text
    # The chunk the death cut short is counted too: every image trained, once.
    assert metric(trainer, "stream_swav_images_trained_total") == trainer.images_seen
    steps = collections.Counter((s.rank, s.step) for s in trainer.trained)
    assert max(steps.values()) == cfg.train.batch_size, "some rank trained one step twice"
    # Every sample of each pass trained exactly once, across the shrink (pass 0) and the grow back;
    # the last pass may end unfinished at the budget (decode actors read ahead into it).
    for pass_index in range(passes - 1):
        assert pass_counts(trainer.trained, pass_index) == {key: 1 for key in keys}, f"pass {pass_index}"
    assert max(pass_counts(trainer.trained, passes - 1).values()) == 1
    # It ended at its budget with a final checkpoint of the step it reached.
    assert trainer.stop_reason == "budget reached" and trainer.last_checkpoint_step == trainer.step


def test_a_learner_lost_while_joining_is_left_out_and_the_group_trains_on_without_a_restart(worker_node, tmp_path,
                                                                                            caplog):
    folder, keys = shards(tmp_path / "shards", count=8, size=32)
    cfg = elastic_config(tmp_path, folder, learners=2, min_learners=1, image_budget=3 * len(keys),
                         collective_timeout_s=30)
    # The first learner built as rank 1 (the first joiner) dies as soon as its model is built, in
    # the middle of forming the new group; the next joiner lives.
    dying = {"die_while_starting": True, "die_rank": 1, "die_once_marker": str(tmp_path / "died")}

    def slow_while_short(trainer) -> None:
        if len(trainer.group.actors) < 2:
            time.sleep(1.0)

    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=slow_while_short, dying=dying)

    assert (tmp_path / "died").exists(), "the joiner never died"
    assert "the learners that answer form their group again" in caplog.text
    assert "restarting the learners" not in caplog.text
    assert metric(trainer, "stream_swav_learner_restarts_total") == 0
    assert metric(trainer, "stream_swav_resizes_total", direction="grow") == 1
    assert metric(trainer, "stream_swav_learners") == 2
    for pass_index in (0, 1):
        assert pass_counts(trainer.trained, pass_index) == {key: 1 for key in keys}, f"pass {pass_index}"
    assert max(pass_counts(trainer.trained, 2).values()) == 1


def test_an_elastic_group_goes_on_at_the_smaller_size_when_a_learners_node_never_returns(
        module_cluster, worker_node, tmp_path):
    # Two CPUs per learner and one decode actor each: one learner per node, the third never fits.
    folder, keys = shards(tmp_path / "shards", count=8, size=32)
    cfg = elastic_config(tmp_path, folder, learners=2, min_learners=1, cpus_per_learner=2, cpu_threads=1,
                         image_budget=2 * len(keys), startup_timeout_s=10)
    removed: dict[str, int] = {}

    def remove_the_node_of_one_learner(trainer) -> None:
        if removed:
            return
        if len(trainer.group.actors) < 2:
            time.sleep(1.0)  # leave the joining learner time to start before the stream runs out
            return
        learner_nodes = {node_of(actor) for actor in trainer.group.actors}
        assert len(learner_nodes) == 2
        removed["step"] = trainer.step
        module_cluster.remove_node(worker_node)

    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=remove_the_node_of_one_learner)

    assert removed, "the group never reached two learners"
    assert metric(trainer, "stream_swav_learners") == 1
    assert metric(trainer, "stream_swav_resizes_total", direction="shrink") == 1
    assert metric(trainer, "stream_swav_rollback_steps_total") == 0
    assert trainer.stop_reason == "budget reached" and trainer.images_seen >= 2 * len(keys)
    assert pass_counts(trainer.trained, 0) == {key: 1 for key in keys}


def test_an_elastic_group_below_min_learners_saves_the_survivors_and_ends_with_one_clear_line(
        module_cluster, worker_node, tmp_path, caplog):
    folder, _ = shards(tmp_path / "shards", count=4, size=24)
    cfg = elastic_config(tmp_path, folder, learners=3, min_learners=2, cpus_per_learner=2, cpu_threads=1)
    removed: dict[str, int] = {}

    def remove_a_learners_node(trainer) -> None:
        # After a step has been trained, so that there is something for the survivors to save (the
        # first chunk can end before any learner has trained a step).
        if not removed and trainer.step > 0:
            removed["step"] = trainer.step
            # The learner that cannot come back is waited for train.startup_timeout_s: the learners'
            # first start keeps the tiny configuration's 60 s (it needed 15 on a loaded box), the wait
            # for one that cannot fit needs none.
            trainer.cfg.train.startup_timeout_s = 3
            module_cluster.remove_node(worker_node)

    caplog.set_level(logging.INFO, logger="stream_swav")
    trainer = run_to_end(cfg, tmp_path / "trained.jsonl", after_chunk=remove_a_learners_node,
                         expect=driver.EXIT_TOO_FEW_LEARNERS)
    final = [r for r in caplog.records if r.levelno >= logging.ERROR][-1].getMessage()
    assert final.startswith("train.min_learners: 1 learner(s) left, fewer than train.min_learners=2")
    assert "\n" not in final and f"checkpoint step {trainer.step} holds everything trained" in final
    assert trainer.last_checkpoint_step == trainer.step >= removed["step"] > 0
