#!/usr/bin/env bash
# The GPU proof run: every GPU figure of this project from one command, in under nine minutes.
#
#   bash bench/gpu_proof.sh --pack      # here, before a GPU session: builds .gpuproof/ and reports sizes
#   bash bench/gpu_proof.sh             # on the GPU machine, with .gpuproof carried: results under $OUT
#   bash bench/gpu_proof.sh --dry-run   # the same steps on the CPU with tiny settings (about a minute)
#
# Steps (bench/gpu_proof.py's `plan`; each under its own time cap, cut to the time left before the
# deadline; a step that fails or times out is recorded and the others go on, and
# $OUT/summary.json is rewritten whenever a step starts or ends):
#   setup        unpack .gpuproof (packages the GPU machine lacks, Fashion-MNIST) and check imports
#   demo-shards  the demo's Fashion-MNIST shards, beside the learner step (the demo finds them done)
#   e2e-shards   Fashion-MNIST upscaled to 256 px JPEG shards for the e2e step, beside the learner step
#   learner      bench/learner.py: our learner step vs a classic SwAV step, ResNet-50, batch 64 and 256
#   families     bench/learner.py --families regnet,vit: our step for the RegNetY (SEER-style) and
#                ViT-S/16 deploy recipes at their crops and batch, eager bf16
#   e2e          `stream-swav train` with deploy/configs/resnet50-gpu.yaml on local Ray: decode actors
#                on the CPUs feed one GPU learner; img/s, input wait and GPU utilisation
#   tests        the CUDA tests (pytest -m cuda), alongside the demo's start
#   demo         `stream-swav demo`: full ResNet-18, batch 256, 4 min of training, kNN on 60k/10k
# The dry run overlaps more: learner, families, tests and e2e-shards start with the setup, and the
# e2e and demo steps run side by side.
#
# $OUT receives at most 8 files: summary.json, gpu_proof.log, learner.json, e2e_metrics.jsonl,
# demo_summary.json, demo_accuracy.png, demo_results.jsonl, pytest.txt.
# Exit status: 0 when every step ended ok, 1 otherwise (the summary says which and why).
#
# Environment: OUT (default runs/gpu-proof-<mode>), GPU_PROOF_PYTHON (default: .venv/bin/python for
# a dry run or a pack when present, else python3), GPU_PROOF_WORK (scratch folder; default a fresh
# /tmp folder, removed at the end unless GPU_PROOF_KEEP=1), GPU_PROOF_BUDGET_S (the deadline),
# GPU_PROOF_FAIL_STEP (a step name: that step fails on purpose, to check that the others go on),
# GPU_PROOF_E2E_COMPILE (true: torch.compile in the e2e learner; default false, as the deploy config).
set -u

case "${1:-}" in
    "") MODE=gpu ;;
    --dry-run) MODE=dry-run ;;
    --pack) MODE=pack ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed -e 's/^# \{0,1\}//' -e '$d'; exit 0 ;;
    *) echo "usage: bash bench/gpu_proof.sh [--dry-run | --pack]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

if [[ -n "${GPU_PROOF_PYTHON:-}" ]]; then
    PY=$GPU_PROOF_PYTHON
elif [[ $MODE != gpu && -x "$REPO/.venv/bin/python" ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi

if [[ $MODE == pack ]]; then
    grep -qx '/.gpuproof/' .gitignore || { echo "ERROR: /.gpuproof/ is not in .gitignore" >&2; exit 1; }
    exec "$PY" bench/gpu_pack.py pack --out .gpuproof
fi
# Every step runs with the runner's interpreter.
exec "$PY" bench/gpu_proof.py run --mode "$MODE"
