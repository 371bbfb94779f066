"""The GPU proof kit (bench/gpu_proof.sh, bench/gpu_proof.py): its dry run, its runner and its figures.

Behaviour only (speed goals live in the benchmarks). The dry run: every step is reported with a
status, a step that fails does not stop the ones after it, the promised files exist, and $OUT
stays within what a device run brings back (at most 8 files, none deeper than $OUT/a/b/file,
16 MiB each). The runner, on real processes: caps, the KILL after the grace, the order the
profile gives, verdict exits, skips. Every figure function, on inputs recorded from the tools.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = {"setup", "demo-shards", "e2e-shards", "learner", "families", "e2e", "demo", "tests"}
PROMISED = {"summary.json", "gpu_proof.log", "learner.json", "e2e_metrics.jsonl", "demo_summary.json",
            "demo_accuracy.png", "demo_results.jsonl", "pytest.txt"}
P = "stream_swav_"


@pytest.fixture(scope="module")
def proof():
    # gpu_proof imports gpu_pack from beside it, as it does when run as a script.
    sys.path.append(str(REPO / "bench"))
    try:
        import gpu_proof
    finally:
        sys.path.remove(str(REPO / "bench"))
    return gpu_proof


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_reports_every_step_and_goes_on_after_a_failed_one(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_PROOF_PYTHON": sys.executable, "GPU_PROOF_WORK": str(tmp_path / "work"),
           # The demo's shards fail on purpose: the learner, e2e, demo and tests steps must still run,
           # and the demo, whose shard making is idempotent, makes them itself.
           "GPU_PROOF_FAIL_STEP": "demo-shards"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_proof.sh"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=570)
    output = (result.stdout + result.stderr)[-4000:]

    assert result.returncode == 1, output  # one step failed, and the exit status says so
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert set(steps) == STEPS
    forced = steps["demo-shards"]
    assert (forced["status"], forced["rc"]) == ("failed", 3) and "forced" in forced["note"], forced
    for name in sorted(STEPS - {"demo-shards"}):
        step = steps[name]
        assert step["status"] == "ok", (name, step, output)
        assert step["seconds"] <= step["budget_s"] and step["started_unix"] > 0
    assert summary["failed_steps"] == ["demo-shards"]

    setup = steps["setup"]["figures"]
    assert setup["imports"]["ray"] and setup["imports"]["torch"]
    assert steps["e2e-shards"]["figures"]["images"] == 256
    learner = steps["learner"]["figures"]
    assert learner["batches"]["4"]["ours"]["images_per_s"] > 0 and learner["batches"]["4"]["classic"]["images_per_s"] > 0
    assert learner["loss_match"]["ours_vs_classic"] < 1e-2
    families = steps["families"]["figures"]["families"]
    assert set(families) == {"regnet", "vit"}
    for family, figures in families.items():
        assert figures["images_per_s"] > 0 and figures["flops_per_image"] > 0 and "error" not in figures, family
    assert families["regnet"]["recipe"].startswith("regnet_y_400mf") and families["vit"]["recipe"].startswith("vit_s_16")
    e2e = steps["e2e"]["figures"]
    assert e2e["learners"] == 1 and e2e["decode_actors"] == 1 and e2e["steps"] >= 1 and e2e["images_trained"] > 0
    assert 0.0 <= e2e["input_wait_ratio_whole_run"] <= 1.0 and e2e["scrapes"] >= 2
    demo = steps["demo"]["figures"]
    assert demo["eval_split"] == "500/200" and 0.0 <= demo["knn_top1_last"] <= 1.0 and demo["images_seen"] > 0
    assert demo["image_budget"] == 512 and demo["checkpoints_evaluated"] >= 1
    assert "Fashion-MNIST" in demo["dataset"] or "procedural" in demo["dataset"]
    tests = steps["tests"]["figures"]
    assert not tests["failed"] and tests["counts"]["passed"] + tests["counts"]["skipped"] >= 1
    targets = summary["targets"]
    assert targets["applies"] is False  # tiny CPU figures are no verdict
    assert {"learner_ours_vs_classic_at_256", "demo_knn_top1", "e2e_input_wait"} <= set(targets)

    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    assert {str(p.relative_to(out)) for p in files} == PROMISED == set(summary["files"])
    assert len(files) <= 8
    for path in files:
        assert len(path.relative_to(out).parts) <= 3 and not path.is_symlink() and path.stat().st_size <= 16 * 2**20
    log_lines = (out / "gpu_proof.log").read_text().splitlines()
    tagged = {m[1] for line in log_lines if (m := re.match(r"\d\d:\d\d:\d\d (\S+)", line))}
    assert STEPS | {"gpu-proof"} <= tagged


# ---------------------------------------------------------------------------------------- the runner

def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def new_runner(proof, tmp_path, names, *, seconds_left=60.0, fail_step=""):
    now = time.time()
    run = proof.Run(mode="dry-run", python=sys.executable, out=tmp_path, work=tmp_path, started=now,
                    deadline=now + seconds_left, fail_step=fail_step)
    summary = proof.Summary(tmp_path / "summary.json", {"steps": {name: {"status": "pending"} for name in names}})
    return proof.Runner(run, proof.Log(tmp_path / "run.log"), summary, min_step_s=1, kill_grace_s=1)


def test_runner_caps_steps_goes_on_after_failures_and_keeps_the_order(proof, tmp_path):
    Step = proof.Step
    steps = [
        Step("sleeper", python("import time; print('asleep', flush=True); time.sleep(30)"), cap_s=1),
        # Ignores the TERM (and so does its child): the KILL after the grace ends it.
        Step("stubborn", ["bash", "-c", "trap '' TERM; sleep 30"], cap_s=1),
        Step("verdict", python("import sys; sys.exit(1)"), cap_s=30, accept=lambda rc: f"exit {rc} is a verdict"),
        Step("refused", python("import sys; sys.exit(1)"), cap_s=30, accept=lambda rc: None),
        Step("forced", python("print('would pass')"), cap_s=30),
        Step("broken-figures", python("pass"), cap_s=30, collect=lambda: {}["missing"]),
        Step("after-both", python("print('next')"), cap_s=30, after=("sleeper", "stubborn"),
             output=tmp_path / "after-both.txt", collect=lambda: {"read": (tmp_path / "after-both.txt").read_text()}),
    ]
    runner = new_runner(proof, tmp_path, [s.name for s in steps], fail_step="forced")
    runner.run_all(steps)

    recorded = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert {k: recorded["sleeper"][k] for k in ("status", "rc", "budget_s")} == {"status": "timeout", "rc": 124,
                                                                                 "budget_s": 1}
    assert (recorded["stubborn"]["status"], recorded["stubborn"]["rc"]) == ("timeout", 137)
    assert 1.9 <= recorded["stubborn"]["seconds"] < 10  # the TERM at 1 s, the KILL a grace of 1 s later
    assert recorded["verdict"]["status"] == "ok" and recorded["verdict"]["note"] == "exit 1 is a verdict"
    assert (recorded["refused"]["status"], recorded["refused"]["rc"]) == ("failed", 1)
    assert (recorded["forced"]["status"], recorded["forced"]["rc"], recorded["forced"]["note"]) == (
        "failed", proof.FORCED_RC, proof.FORCED_NOTE)
    broken = recorded["broken-figures"]
    assert broken["status"] == "ok" and "figures failed: KeyError" in broken["note"]
    after = recorded["after-both"]
    assert after["status"] == "ok" and after["figures"] == {"read": "next\n"}
    for earlier in ("sleeper", "stubborn"):  # (seconds are recorded to a tenth)
        assert after["started_unix"] >= recorded[earlier]["started_unix"] + recorded[earlier]["seconds"] - 0.06
    log = (tmp_path / "run.log").read_text()
    assert re.search(r"^\d\d:\d\d:\d\d sleeper\s+asleep$", log, flags=re.M)
    assert "failing on purpose" in log and "would pass" not in log


def test_runner_skips_a_step_that_the_deadline_leaves_no_time_for(proof, tmp_path):
    runner = new_runner(proof, tmp_path, ["late"], seconds_left=0.5)
    runner.run_all([proof.Step("late", python("pass"), cap_s=30)])
    late = json.loads((tmp_path / "summary.json").read_text())["steps"]["late"]
    assert late["status"] == "skipped" and "left before the deadline" in late["note"]


@pytest.mark.parametrize("mode", ["gpu", "dry-run"])
def test_plan_matches_its_profile_and_keeps_the_gpu_measurements_apart(proof, tmp_path, mode):
    run = proof.Run(mode=mode, python=sys.executable, out=tmp_path, work=tmp_path, started=0.0, deadline=530.0)
    steps = proof.plan(run)
    assert [s.name for s in steps] == ["setup", "demo-shards", "e2e-shards", "learner", "families", "e2e", "tests",
                                       "demo"]
    assert set(proof.PROFILES[mode].steps) == {s.name for s in steps}
    by_name = {s.name: s for s in steps}

    def before(name: str) -> set[str]:
        found, todo = set(), list(by_name[name].after)
        while todo:
            name = todo.pop()
            found.add(name)
            todo.extend(by_name[name].after)
        return found

    if mode == "gpu":  # each measurement runs alone on the GPU (the CUDA tests share the demo's start)
        apart = ["learner", "families", "e2e", "demo"]
        for earlier, later in zip(apart, apart[1:]):
            assert earlier in before(later), (earlier, later)
    else:  # no Ray start beside pytest's (Ray waits a fixed 30 s for its own processes)
        assert "tests" in before("e2e") and "tests" in before("demo")
    assert "setup" in before("demo") and "e2e-shards" in before("e2e") and "demo-shards" in before("demo")
    tests = by_name["tests"].command
    assert "-m" in tests and "cuda" in tests and "tests/test_cuda.py" in tests


def test_demo_trains_what_the_deadline_leaves_within_its_bounds(proof):
    assert proof.demo_minutes(seconds_left=330, reserve_s=60, most=4, least=1) == 4.0
    assert proof.demo_minutes(seconds_left=200, reserve_s=60, most=4, least=1) == 2.3  # floored to a tenth
    assert proof.demo_minutes(seconds_left=70, reserve_s=60, most=4, least=1) == 1.0


def test_out_check_names_what_the_device_tool_would_not_bring_back(proof, tmp_path):
    for n in range(9):
        (tmp_path / f"f{n}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "f0.txt")
    problems = proof.check_out(tmp_path)
    assert problems[0] == "11 files, the limit is 8"
    assert any("deep.txt: deeper" in p for p in problems) and any("link: a link" in p for p in problems)


def test_a_capped_log_keeps_its_head_and_tail(proof, tmp_path):
    log = tmp_path / "gpu_proof.log"
    log.write_bytes(b"head\n" + b"x" * 10_000 + b"\ntail\n")
    proof.cap_file(log, 4096)
    capped = log.read_bytes()
    assert len(capped) <= 4096 and capped.startswith(b"head\n") and capped.endswith(b"\ntail\n")
    assert b"bytes cut to stay under 4,096" in capped


# ---------------------------------------------------------------------------------------- figures

def test_metrics_page_samples_are_summed_over_labels_without_created_stamps(proof):
    # Recorded from the driver's registry (prometheus_client's text format).
    page = "\n".join([
        "# HELP stream_swav_steps_total Optimizer steps.", "# TYPE stream_swav_steps_total counter",
        "stream_swav_steps_total 12.0", "stream_swav_steps_created 1.7964813635224190e+09",
        "stream_swav_loss 4.27", "stream_swav_input_wait_seconds_total 0.75",
        "stream_swav_learner_busy_seconds_total 3.25", "stream_swav_decode_actors_up 14.0",
        'stream_swav_decode_errors_total{reason="corrupt"} 2.0',
        'stream_swav_decode_errors_total{reason="too_small"} 1.0',
        'stream_swav_decode_errors_created{reason="corrupt"} 1.7964813635233564e+09',
        "process_cpu_seconds_total 3.1"])
    assert proof.parse_metrics(page) == {
        P + "steps_total": 12.0, P + "loss": 4.27, P + "input_wait_seconds_total": 0.75,
        P + "learner_busy_seconds_total": 3.25, P + "decode_actors_up": 14.0, P + "decode_errors_total": 3.0}


def test_e2e_input_wait_is_the_steady_windows_own_share_from_the_counters(proof, tmp_path):
    # Recorded scrapes: a start-up with a long wait (5 s waited, 1 s busy), then a steady window where
    # the learner waits 1 s in every 20. The per-chunk gauge jumps around and must not matter.
    scrapes = [{"t": 100.0, "values": {P + "steps_total": 0, P + "learners": 1, P + "decode_actors_up": 14}}]
    for i in range(1, 8):
        scrapes.append({"t": 100.0 + 10 * i, "values": {
            P + "steps_total": 10 * i, P + "images_trained_total": 1280 * i, P + "loss": 8.0 - 0.1 * i,
            P + "input_wait_ratio": 0.9 if i % 2 else 0.0, P + "learners": 1, P + "decode_actors_up": 14,
            P + "object_store_batches_in_flight": 20 + i % 2,
            P + "input_wait_seconds_total": 5.0 + 0.5 * (i - 1), P + "learner_busy_seconds_total": 1.0 + 9.5 * (i - 1)}})
    # Drained: no new step, and the actors going down.
    scrapes.append({"t": 180.0, "values": {**scrapes[-1]["values"], P + "learners": 0, P + "decode_actors_up": 0}})
    # nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits, local time.
    csv = tmp_path / "gpu.csv"
    csv.write_text("".join(f"{time.strftime('%Y/%m/%d %H:%M:%S', time.localtime(t))}.000, {util}, {mib}\n"
                           for t, util, mib in ((125.0, 10, 900), (130.0, 90, 40000), (150.0, 94, 41000),
                                                (170.0, 98, 41500), (175.0, 0, 41500))) + "garbled line\n")
    shards = {"images": 40000, "shards": 40}
    figures = proof.e2e_figures(scrapes, shards, proof.gpu_samples(csv), skip_s=15.0)

    assert figures["steady"]["from_unix"] == 130.0 and figures["steady"]["to_unix"] == 170.0
    assert figures["input_wait_ratio_steady"] == 0.05
    assert figures["input_wait_ratio_whole_run"] == round(8.0 / (8.0 + 58.0), 4)
    assert figures["images_per_s_steady"] == 128.0
    assert (figures["learners"], figures["decode_actors"], figures["steps"]) == (1, 14, 70)
    assert figures["loss"] == pytest.approx(7.3) and figures["batches_in_flight_mean"] == 20.6
    assert {k: figures["steady"][k] for k in ("gpu_util_mean_pct", "gpu_memory_max_mib", "gpu_samples")} == {
        "gpu_util_mean_pct": 94.0, "gpu_memory_max_mib": 41500.0, "gpu_samples": 3}
    assert figures["shards"] == shards
    verdict = proof.targets({"mode": "gpu", "steps": {"e2e": {"figures": figures}}})["e2e_input_wait"]
    assert verdict["source"] == "steady window" and verdict["met"] is False  # 5% is not under 5%
    assert proof.e2e_figures([], None, []) == {"scrapes": 0}


def test_learner_figures_pair_ours_with_classic_per_batch(proof):
    # A recorded `bench/learner.py --json-out` report (settings left out), with batch 256 out of memory.
    report = {
        "environment": {"device": "CPU: AMD EPYC", "threads": "1"}, "syncs_per_step": {"ours": [], "classic": ["lars"]},
        "flops_per_image": 179134464.0, "peak_flops": None,
        "loss_match": {"batch": 4, "ours_precision": "fp32", "classic_precision": "fp32",
                       "losses": {"ours": 3.646042823791504, "classic": 3.6460423469543457,
                                  "float32 reference": 3.6460423469543457},
                       "ours_vs_classic": 1.307821228684966e-07, "ours_vs_fp32": 1.307821228684966e-07,
                       "classic_vs_fp32": 0.0},
        "results": [
            {"name": "ours: float32, channels_last, eager, augmentation on device", "batch": 4,
             "images_per_s": 4.035262203329803, "step_ms": 991.2614839995513, "peak_gib": None, "mfu": None,
             "warmup_s": 1.265460291004274, "nonfinite_steps": 0, "error": ""},
            {"name": "classic: float32 on CPU, NCHW, eager, no augmentation", "batch": 4,
             "images_per_s": 3.564345033963816, "step_ms": 1122.2258120033075, "peak_gib": None, "mfu": None,
             "warmup_s": 0.6444362799957162, "nonfinite_steps": 0, "error": ""},
            {"name": "ours: bf16, channels_last, compiled, augmentation on device", "batch": 256, "images_per_s": None,
             "step_ms": None, "peak_gib": None, "mfu": None, "warmup_s": None, "nonfinite_steps": 0,
             "error": "OutOfMemoryError: CUDA out of memory"}]}
    figures = proof.learner_figures(report)
    assert figures["batches"]["4"]["ours"] == {"images_per_s": 4.035262203329803, "step_ms": 991.2614839995513,
                                               "warmup_s": 1.265460291004274, "nonfinite_steps": 0}
    assert figures["ours_vs_classic"] == {"4": 1.132}
    assert figures["batches"]["256"] == {"ours": {"nonfinite_steps": 0,
                                                  "error": "OutOfMemoryError: CUDA out of memory"}}
    assert figures["loss_match"]["ours_vs_classic"] < 1e-6 and "float32 reference" in figures["loss_match"]["losses"]
    assert figures["host_syncs_per_step"] == {"ours": 0, "classic": 1} and figures["flops_per_image"] == 179134464.0
    assert proof.targets({"mode": "gpu", "steps": {"learner": {"figures": figures}}})[
        "learner_ours_vs_classic_at_256"]["met"] is None  # no figure at 256, no verdict


def test_family_figures_come_from_the_benchmarks_rows_and_keep_a_failed_family(proof):
    # A recorded `bench/learner.py --families` report: the RegNetY measured, the ViT out of memory.
    report = {"environment": {"device": "NVIDIA H100"}, "family_flops_per_image": {"regnet": 4.1e10},
              "families": [
                  {"name": "regnet: regnet_y_32gf, 2x160 + 4x96, lars", "batch": 64, "images_per_s": 812.5,
                   "step_ms": 78.8, "peak_gib": 41.2, "mfu": 0.21, "warmup_s": 9.0, "nonfinite_steps": 0, "error": ""},
                  {"name": "vit: vit_s_16, 2x224 + 8x96, adamw", "batch": 128, "images_per_s": None, "step_ms": None,
                   "peak_gib": None, "mfu": None, "warmup_s": None, "nonfinite_steps": 0,
                   "error": "OutOfMemoryError: CUDA out of memory"}]}
    figures = proof.families_figures(report)
    assert figures["families"]["regnet"] == {
        "recipe": "regnet_y_32gf, 2x160 + 4x96, lars", "batch": 64, "flops_per_image": 4.1e10, "images_per_s": 812.5,
        "step_ms": 78.8, "peak_gib": 41.2, "mfu": 0.21, "warmup_s": 9.0, "nonfinite_steps": 0}
    assert figures["families"]["vit"]["error"].startswith("OutOfMemoryError")
    assert "images_per_s" not in figures["families"]["vit"] and figures["environment"]["device"] == "NVIDIA H100"


def test_demo_figures_come_from_its_evaluation_rows_summary_and_last_checkpoint(proof, tmp_path):
    # Recorded from a dry run's demo (paths shortened, the checkpoint record cut to what is read).
    base = {"eval_seconds": 4.1, "image_size": 28, "pixels_knn_top1": 0.8, "pixels_probe_top1": 0.79,
            "random_bn_knn_top1": 0.7, "random_bn_probe_top1": 0.575, "random_knn_top1": 0.635,
            "random_probe_top1": 0.6, "test_count": 200, "train_count": 500}
    rows = [{**base, "checkpoint": "demo/checkpoints/step-000000016/backbone.pt", "images_seen": 512,
             "checkpoint_time": "2026-12-05T14:34:00.383000+00:00", "knn_top1": 0.655, "probe_top1": 0.54,
             "loss": 4.75, "step": 16},
            {**base, "checkpoint": "demo/checkpoints/step-000000008/backbone.pt", "images_seen": 256,
             "checkpoint_time": "2026-12-05T14:33:56.923000+00:00", "knn_top1": 0.66, "probe_top1": 0.515,
             "loss": 4.89, "step": 8}]
    summary = {"dataset": "Fashion-MNIST (runs/fmnist), 28 px: 3,012 train samples", "rows": []}
    latest = {"step": 16, "images_seen": 512, "final": True,
              "config": {"train": {"batch_size": 32, "image_budget": 512, "time_budget_s": 60.0}}}
    figures = proof.demo_figures(rows, summary, latest)
    assert figures == {
        "checkpoints_evaluated": 2, "minutes": 1.0, "image_budget": 512, "batch_size": 32,
        "knn_top1_last": 0.655, "knn_top1_best": 0.66, "best_at_images": 256, "images_seen": 512, "steps": 16,
        "pixels_knn_top1": 0.8, "random_knn_top1": 0.635, "random_bn_knn_top1": 0.7, "probe_top1_last": 0.54,
        "pixels_probe_top1": 0.79, "random_probe_top1": 0.6, "eval_split": "500/200", "beats_random_init": True,
        "beats_pixels": False, "train_images_per_s": round(256 / 3.46, 1), "dataset": summary["dataset"]}
    verdict = proof.targets({"mode": "gpu", "steps": {"demo": {"figures": {**figures, "eval_split": "60000/10000",
                                                                           "knn_top1_last": 0.86}}}})
    assert verdict["demo_knn_top1"]["met"] is True and verdict["applies"] is True

    # collect_demo: the three files into $OUT under the names the kit promises, then the same figures.
    demo_out, out = tmp_path / "demo", tmp_path / "out"
    (demo_out / "eval").mkdir(parents=True)
    (demo_out / "checkpoints").mkdir()
    out.mkdir()
    (demo_out / "eval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    (demo_out / "eval" / "summary.json").write_text(json.dumps(summary))
    (demo_out / "eval" / "accuracy.png").write_bytes(b"\x89PNG")
    (demo_out / "checkpoints" / "latest.json").write_text(json.dumps(latest))
    assert proof.collect_demo(demo_out, out) == figures
    assert sorted(p.name for p in out.iterdir()) == ["demo_accuracy.png", "demo_results.jsonl", "demo_summary.json"]
    assert proof.demo_figures([], None, None) == {"checkpoints_evaluated": 0}


def test_tests_figures_come_from_pytests_junit_report(proof, tmp_path):
    # Recorded: pytest --junitxml on a file with a pass, a failure, a fixture error and a skip.
    report = tmp_path / "pytest.xml"
    report.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="1" '
        'failures="1" skipped="1" tests="4" time="0.138" timestamp="2026-12-05T14:35:56.151249+00:00" hostname="vm">'
        '<testcase classname="test_mix" name="test_passes" time="0.001" />'
        '<testcase classname="test_mix" name="test_fails" time="0.001"><failure message="assert 1 == 2">'
        'def test_fails():\n&gt;       assert 1 == 2\nE       assert 1 == 2\n\ntest_mix.py:11: AssertionError'
        '</failure></testcase><testcase classname="test_mix" name="test_errors" time="0.001"><error message='
        '"failed on setup with &quot;RuntimeError: fixture broke&quot;">@pytest.fixture\n    def broken():\n'
        '&gt;       raise RuntimeError("fixture broke")\nE       RuntimeError: fixture broke\n\ntest_mix.py:5: '
        'RuntimeError</error></testcase><testcase classname="test_mix" name="test_skips" time="0.001"><skipped '
        'type="pytest.skip" message="needs CUDA">/tmp/test_mix.py:17: needs CUDA</skipped></testcase></testsuite>'
        '</testsuites>')
    assert proof.tests_figures(report) == {
        "counts": {"passed": 1, "failed": 1, "errors": 1, "skipped": 1},
        "failed": ["test_mix::test_fails", "test_mix::test_errors"], "passed": ["test_mix::test_passes"],
        "skipped": ["test_mix::test_skips: needs CUDA"]}
    assert proof.tests_figures(tmp_path / "absent.xml") == {}
