"""`bench/gpu_proof.sh --dry-run`: the GPU proof run's steps on the CPU with tiny settings.

Behaviour only (speed goals live in the benchmarks): every step is reported with a status, a step
that fails does not stop the ones after it, the promised files exist, and $OUT stays within what a
device run brings back (at most 8 files, none deeper than $OUT/a/b/file, 16 MiB each).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = {"setup", "demo-shards", "e2e-shards", "learner", "families", "e2e", "demo", "tests"}
PROMISED = {"summary.json", "gpu_proof.log", "learner.json", "e2e_metrics.jsonl", "demo_summary.json",
            "demo_accuracy.png", "demo_results.jsonl", "pytest.txt"}


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

    learner = steps["learner"]["figures"]
    assert learner["batches"]["8"]["ours"]["images_per_s"] > 0 and learner["batches"]["8"]["classic"]["images_per_s"] > 0
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
    assert "Fashion-MNIST" in demo["dataset"] or "procedural" in demo["dataset"]
    tests = steps["tests"]["figures"]
    assert not tests["failed"] and sum(tests["counts"].get(k, 0) for k in ("passed", "skipped")) >= 1
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


def load_gpu_proof():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_proof", REPO / "bench" / "gpu_proof.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_input_wait_is_the_steady_windows_own_share_from_the_counters(tmp_path):
    # Recorded scrapes: a start-up with a long wait (5 s waited, 1 s busy), then a steady window where
    # the learner waits 1 s in every 20. The per-chunk gauge jumps around and must not matter.
    p = "stream_swav_"
    scrapes = [{"t": 100.0, "values": {p + "steps_total": 0}}]
    for i in range(1, 8):
        scrapes.append({"t": 100.0 + 10 * i, "values": {
            p + "steps_total": 10 * i, p + "images_trained_total": 1280 * i,
            p + "input_wait_ratio": 0.9 if i % 2 else 0.0,
            p + "input_wait_seconds_total": 5.0 + 0.5 * (i - 1), p + "learner_busy_seconds_total": 1.0 + 9.5 * (i - 1)}})
    scrapes.append({"t": 180.0, "values": dict(scrapes[-1]["values"])})  # drained: no new step
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(s) + "\n" for s in scrapes))
    figures_path = tmp_path / "e2e.json"
    proof = load_gpu_proof()
    args = proof.argparse.Namespace(metrics=str(metrics), log=str(tmp_path / "absent.log"), json=str(figures_path),
                                    gpu_csv=None, data_json=None, skip_s=15.0)
    assert proof.cmd_e2e_figures(args) == 0
    figures = json.loads(figures_path.read_text())

    assert figures["steady"]["from_unix"] == 130.0 and figures["steady"]["to_unix"] == 170.0
    assert figures["input_wait_ratio_steady"] == 0.05
    assert figures["input_wait_ratio_whole_run"] == round(8.0 / (8.0 + 58.0), 4)
    assert figures["images_per_s_steady"] == 128.0
    verdict = proof.targets({"mode": "gpu", "steps": {"e2e": {"figures": figures}}})["e2e_input_wait"]
    assert verdict["source"] == "steady window" and verdict["met"] is False  # 5% is not under 5%


def test_family_figures_come_from_the_benchmarks_rows_and_keep_a_failed_family(tmp_path):
    # A recorded `bench/learner.py --families` report: the RegNetY measured, the ViT out of memory.
    report = {"environment": {"device": "NVIDIA H100"}, "family_flops_per_image": {"regnet": 4.1e10},
              "families": [
                  {"name": "regnet: regnet_y_32gf, 2x160 + 4x96, lars", "batch": 64, "images_per_s": 812.5,
                   "step_ms": 78.8, "peak_gib": 41.2, "mfu": 0.21, "warmup_s": 9.0, "nonfinite_steps": 0, "error": ""},
                  {"name": "vit: vit_s_16, 2x224 + 8x96, adamw", "batch": 128, "images_per_s": None, "step_ms": None,
                   "peak_gib": None, "mfu": None, "warmup_s": None, "nonfinite_steps": 0,
                   "error": "OutOfMemoryError: CUDA out of memory"}]}
    source, figures_path = tmp_path / "families.json", tmp_path / "figures.json"
    source.write_text(json.dumps(report))
    proof = load_gpu_proof()
    assert proof.cmd_families_figures(proof.argparse.Namespace(families_json=str(source), json=str(figures_path))) == 0
    figures = json.loads(figures_path.read_text())
    assert figures["families"]["regnet"] == {
        "recipe": "regnet_y_32gf, 2x160 + 4x96, lars", "batch": 64, "flops_per_image": 4.1e10, "images_per_s": 812.5,
        "step_ms": 78.8, "peak_gib": 41.2, "mfu": 0.21, "warmup_s": 9.0, "nonfinite_steps": 0}
    assert figures["families"]["vit"]["error"].startswith("OutOfMemoryError")
    assert "images_per_s" not in figures["families"]["vit"] and figures["environment"]["device"] == "NVIDIA H100"
