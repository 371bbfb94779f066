#!/usr/bin/env bash
# The GPU proof run: every GPU figure of this project from one command, in under nine minutes.
#
#   bash bench/gpu_proof.sh --pack      # here, before a GPU session: builds .gpuproof/ and reports sizes
#   bash bench/gpu_proof.sh             # on the GPU machine, with .gpuproof carried: results under $OUT
#   bash bench/gpu_proof.sh --dry-run   # the same steps on the CPU with tiny settings (~1.5 minutes)
#
# Steps (each under its own `timeout`; a step that fails or times out is recorded and the next
# one runs, and $OUT/summary.json is rewritten after every step):
#   setup        unpack .gpuproof (packages the GPU machine lacks, Fashion-MNIST) and check imports
#   demo-shards  background: the demo's Fashion-MNIST shards (the demo finds them done)
#   e2e-shards   background: Fashion-MNIST upscaled to 256 px JPEG shards for the e2e step
#   learner      bench/learner.py: our learner step vs a classic SwAV step, ResNet-50, batch 64 and 256
#   families     bench/learner.py --families regnet,vit: our step for the RegNetY (SEER-style) and
#                ViT-S/16 deploy recipes at their crops and batch, eager bf16
#   e2e          `stream-swav train` with deploy/configs/resnet50-gpu.yaml on local Ray: decode actors
#                on the CPUs feed one GPU learner; img/s, input wait and GPU utilisation
#   demo         `stream-swav demo`: full ResNet-18, batch 256, 4 min of training, kNN on 60k/10k
#   tests        the CUDA tests (pytest -m cuda), alongside the demo's start (before it in a dry run)
#
# $OUT receives at most 8 files: summary.json, gpu_proof.log, learner.json, e2e_metrics.jsonl,
# demo_summary.json, demo_accuracy.png, demo_results.jsonl, pytest.txt.
# Exit status: 0 when every step ended ok, 1 otherwise (the summary says which and why).
#
# Environment: OUT (default runs/gpu-proof-<mode>), GPU_PROOF_PYTHON (default: .venv/bin/python for
# a dry run when present, else python3), GPU_PROOF_WORK (scratch folder; default a fresh /tmp folder,
# removed at the end unless GPU_PROOF_KEEP=1), GPU_PROOF_BUDGET_S (the deadline), GPU_PROOF_FAIL_STEP
# (a step name: that step fails on purpose, to check that the others go on),
# GPU_PROOF_E2E_COMPILE (true: torch.compile in the e2e learner; default false, as the deploy config).
set -u

MODE=gpu
case "${1:-}" in
    "") ;;
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
HELPER=("$PY" "$REPO/bench/gpu_proof.py")

if [[ $MODE == pack ]]; then
    grep -qx '/.gpuproof/' .gitignore || { echo "ERROR: /.gpuproof/ is not in .gitignore" >&2; exit 1; }
    exec "${HELPER[@]}" pack --out .gpuproof
fi

# ------------------------------------------------------------------------------------------ budgets
# Seconds unless named _MIN. A cap is the most a step may take; every cap is also cut to the time
# left before the deadline, so the whole run ends in time even when a step hangs.
if [[ $MODE == gpu ]]; then
    TOTAL_S=${GPU_PROOF_BUDGET_S:-530}   # 8 min 50 s: inside the 9 minutes, with the summary written
    SETUP_S=90
    DEMO_SHARDS_S=240; DEMO_SHARD_ARGS=(--eval-train 60000 --eval-test 10000)
    E2E_SHARDS_S=150;  E2E_DATA_ARGS=(--count 40000 --size 256 --per-shard 1000 --workers 4)
    # torch.compile warms up once per batch size (a minute or more for ResNet-50), so 3 warm-up + 15
    # timed steps; 256 first, so that a cut-off at the cap loses batch 64, not the headline figure.
    LEARNER_S=200;     LEARNER_ARGS=(--batch-sizes 256,64 --warmup 3 --steps 15)
    # Eager: compiling two more networks would take minutes; 3 warm-up steps cover cuDNN's autotuning.
    FAMILIES_S=75;     FAMILIES_ARGS=(--families regnet,vit --compile off --warmup 3 --steps 10)
    # The train budget includes Ray's start (~6 s here); ~30 s of it are steady state.
    E2E_S=100;         E2E_BUDGET=(--set train.time_budget_s=45)
    E2E_SETS=(--set train.cpus_per_learner=2)
    # Reserve: start-up, final checkpoint, kNN of ~5 checkpoints on 60k/10k. Too little would cut the
    # evaluation of the last checkpoint, which runs last: cheaper to train a few seconds less.
    DEMO_MAX_MIN=4; DEMO_MIN_MIN=1; DEMO_RESERVE_S=60
    DEMO_ARGS=(--set metrics.port=0)
    TESTS_S=120;       TESTS_WITH_DEMO=1
else
    TOTAL_S=${GPU_PROOF_BUDGET_S:-330}
    SETUP_S=60
    DEMO_SHARDS_S=120; DEMO_SHARD_ARGS=(--eval-train 500 --eval-test 200)
    E2E_SHARDS_S=60;   E2E_DATA_ARGS=(--count 1200 --size 64 --per-shard 300 --workers 2)
    LEARNER_S=120;     LEARNER_ARGS=(--tiny)
    FAMILIES_S=60;     FAMILIES_ARGS=(--families regnet,vit --tiny)
    # Image budgets, not time budgets: on a loaded 2-core machine Ray's start alone can take 30 s of a
    # time budget, whose clock starts before it, and leave no step trained.
    E2E_S=150;         E2E_BUDGET=(--set train.image_budget=160 --set train.time_budget_s=0)
    E2E_SETS=(--set train.device=cpu --set train.cpus_per_learner=1 --set data.decode_actors=1
              --set data.shuffle_buffer=64 --set model.arch=resnet18 --set model.small_stem=true
              --set model.hidden_dim=64 --set model.output_dim=32 --set model.prototypes=32
              --set crops.global_size=32 --set crops.local_size=16 --set crops.local_count=2
              --set train.batch_size=16)
    DEMO_MAX_MIN=1; DEMO_MIN_MIN=0.5; DEMO_RESERVE_S=40   # the image budget below ends it sooner
    DEMO_ARGS=(--eval-train 500 --eval-test 200 --set metrics.port=0 --set train.batch_size=32
               --set train.image_budget=3072 --set checkpoint.every_seconds=10)
    # Two cores: pytest's start beside the demo's can push Ray's start past its fixed 30 s wait.
    TESTS_S=90;        TESTS_WITH_DEMO=0
fi
KILL_GRACE_S=10      # after the TERM of a timeout, KILL
MIN_STEP_S=10        # a step with less time than this left is skipped, not started
E2E_COMPILE=${GPU_PROOF_E2E_COMPILE:-false}
FAIL_STEP=${GPU_PROOF_FAIL_STEP:-}

START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
OUT=${OUT:-$REPO/runs/gpu-proof-$MODE}
mkdir -p "$OUT"
if [[ -n "${GPU_PROOF_WORK:-}" ]]; then
    WORK=$GPU_PROOF_WORK; OWN_WORK=0; mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/gpuproof.XXXXXX); OWN_WORK=1
fi
LOG=$OUT/gpu_proof.log
SUMMARY=$OUT/summary.json
LOCK=$WORK/summary.lock
# A rerun into the same folder must not mix an earlier run's files into this one's figures.
rm -f "$OUT"/{summary.json,gpu_proof.log,learner.json,e2e_metrics.jsonl,demo_summary.json,demo_accuracy.png} \
    "$OUT"/{demo_results.jsonl,pytest.txt}
: > "$LOG"

BACKGROUND=()
cleanup() {
    local pid
    for pid in "${BACKGROUND[@]+"${BACKGROUND[@]}"}"; do
        kill "$pid" 2>/dev/null
    done
    if [[ $OWN_WORK == 1 && "${GPU_PROOF_KEEP:-0}" != 1 ]]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------ helpers
stamp() {  # prefix each line with the time and the step's name
    local tag=$1 line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '%(%H:%M:%S)T %-11s %s\n' -1 "$tag" "$line"
    done
}

say() {  # the script's own lines: to the console and the log
    printf '%(%H:%M:%S)T %-11s %s\n' -1 gpu-proof "$*" | tee -a "$LOG"
}

summary() {
    "${HELPER[@]}" "$1" --summary "$SUMMARY" --lock "$LOCK" "${@:2}" 2>&1 | stamp gpu-proof >> "$LOG"
}

elapsed_since() {  # seconds since a `date +%s.%N` value, one decimal
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# run_step NAME CAP COMMAND...: run under `timeout` for min(CAP, time left), output to the log
# (and to $WORK/NAME.out), record the outcome in the summary. Sets STEP_RC (125: skipped).
run_step() {
    local name=$1 cap=$2 left budget started seconds rc status note=""
    shift 2
    left=$((DEADLINE - $(date +%s)))
    budget=$((cap < left ? cap : left))
    if ((budget < MIN_STEP_S)); then
        say "$name: skipped, ${left}s left before the deadline"
        summary step --name "$name" --status skipped --note "not started: ${left}s left before the deadline"
        STEP_RC=125
        return
    fi
    local command=("$@")
    if [[ $FAIL_STEP == "$name" ]]; then
        command=(bash -c 'echo "failing on purpose: GPU_PROOF_FAIL_STEP names this step"; exit 3')
        note="forced failure (GPU_PROOF_FAIL_STEP)"
    fi
    say "$name: start, budget ${budget}s: ${command[*]}"
    started=$(date +%s.%N)
    summary step --name "$name" --status running --budget-s "$budget" --started "$started" \
        --command "${command[*]}"
    timeout -k "$KILL_GRACE_S" "$budget" "${command[@]}" < /dev/null 2>&1 \
        | tee "$WORK/$name.out" | stamp "$name" >> "$LOG"
    rc=${PIPESTATUS[0]}
    seconds=$(elapsed_since "$started")
    if [[ $rc == 0 ]]; then
        status=ok
    elif [[ $rc == 124 || $rc == 137 ]] && awk -v s="$seconds" -v b="$budget" 'BEGIN { exit !(s >= b - 1) }'; then
        status=timeout
    else
        status=failed
    fi
    summary step --name "$name" --status "$status" --rc "$rc" --seconds "$seconds" ${note:+--note "$note"}
    say "$name: $status (rc $rc) after ${seconds}s"
    STEP_RC=$rc
}

# ------------------------------------------------------------------------------------------ start
summary init --mode "$MODE" --budget-s "$TOTAL_S"
say "GPU proof run ($MODE), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown (no git)")," \
    "python $PY; results in $OUT, scratch in $WORK"
say "budget: all done within ${TOTAL_S}s; setup <=${SETUP_S}s; learner <=${LEARNER_S}s;" \
    "families <=${FAMILIES_S}s;" \
    "e2e <=${E2E_S}s (${E2E_BUDGET[*]}); demo ${DEMO_MAX_MIN} min of training + ~${DEMO_RESERVE_S}s" \
    "(fewer minutes, not under ${DEMO_MIN_MIN}, when behind);" \
    "tests <=${TESTS_S}s $([[ $TESTS_WITH_DEMO == 1 ]] && echo alongside || echo before) the demo;" \
    "shards made in the background (demo <=${DEMO_SHARDS_S}s, e2e <=${E2E_SHARDS_S}s)"

export PYTHONUNBUFFERED=1
# Offline machine: no usage-statistics upload attempts from Ray.
export RAY_USAGE_STATS_ENABLED=0

GPU_CSV=""
if [[ $MODE == gpu ]] && command -v nvidia-smi > /dev/null; then
    GPU_CSV=$WORK/gpu.csv
    nvidia-smi -i 0 --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
        > "$GPU_CSV" 2>/dev/null &
    BACKGROUND+=($!)
fi

# ------------------------------------------------------------------------------------------ setup
if [[ $MODE == gpu ]]; then
    SITE=/tmp/gpuproof-site
    run_step setup "$SETUP_S" "$PY" bench/gpu_proof.py unpack --bundle .gpuproof --site "$SITE" \
        --fmnist "$WORK/fmnist" --json "$WORK/setup.json"
    # Ray workers inherit this environment: the repository and the bundle, no pip install needed.
    export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
    export STREAM_SWAV_FMNIST=$WORK/fmnist
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    # The unpacked copy's stand-in: a few thousand Fashion-MNIST images, read through the same variable.
    run_step setup "$SETUP_S" "$PY" bench/gpu_proof.py dry-setup --fmnist "$WORK/fmnist" --json "$WORK/setup.json"
    [[ -e $WORK/fmnist/train-images-idx3-ubyte ]] && export STREAM_SWAV_FMNIST=$WORK/fmnist
fi
summary step --name setup --figures "$WORK/setup.json"

# Data for the demo and the e2e step, on the CPUs while the GPU runs the learner benchmark.
run_step demo-shards "$DEMO_SHARDS_S" "$PY" -m stream_swav demo --out "$WORK/demo" --prepare-only \
    "${DEMO_SHARD_ARGS[@]}" &
DEMO_SHARDS_PID=$!
BACKGROUND+=("$DEMO_SHARDS_PID")
run_step e2e-shards "$E2E_SHARDS_S" "$PY" bench/gpu_proof.py jpeg-shards --dest "$WORK/e2e-shards" \
    "${E2E_DATA_ARGS[@]}" --json "$WORK/e2e-data.json" &
E2E_SHARDS_PID=$!
BACKGROUND+=("$E2E_SHARDS_PID")

# ------------------------------------------------------------------------------------------ b. learner
run_step learner "$LEARNER_S" "$PY" bench/learner.py "${LEARNER_ARGS[@]}" --json-out "$OUT/learner.json"
if [[ -s $OUT/learner.json ]]; then
    "${HELPER[@]}" learner-figures --learner-json "$OUT/learner.json" --json "$WORK/learner-figures.json"
    summary step --name learner --figures "$WORK/learner-figures.json"
fi

# ------------------------------------------------------------------------------------------ b2. families
# Its JSON stays in $WORK ($OUT holds 8 files already): the summary carries its figures.
run_step families "$FAMILIES_S" "$PY" bench/learner.py "${FAMILIES_ARGS[@]}" --json-out "$WORK/families.json"
if [[ -s $WORK/families.json ]]; then
    "${HELPER[@]}" families-figures --families-json "$WORK/families.json" --json "$WORK/families-figures.json"
    summary step --name families --figures "$WORK/families-figures.json"
fi

# ------------------------------------------------------------------------------------------ c. e2e
wait "$E2E_SHARDS_PID"
summary step --name e2e-shards --figures "$WORK/e2e-data.json"
PORT=$("${HELPER[@]}" free-port)
: > "$OUT/e2e_metrics.jsonl"
"${HELPER[@]}" scrape --url "http://127.0.0.1:$PORT/metrics" --out "$OUT/e2e_metrics.jsonl" \
    --stop-file "$WORK/e2e.done" --max-s "$((E2E_S + KILL_GRACE_S))" &
SCRAPER_PID=$!
BACKGROUND+=("$SCRAPER_PID")
run_step e2e "$E2E_S" "$PY" -m stream_swav train --config deploy/configs/resnet50-gpu.yaml \
    --set data.shards="$WORK/e2e-shards" --set data.follow=false --set train.learners=1 \
    "${E2E_BUDGET[@]}" --set train.log_interval_s=5 --set train.compile="$E2E_COMPILE" \
    --set checkpoint.dir="$WORK/e2e-checkpoints" --set checkpoint.keep_last=1 \
    --set metrics.host=127.0.0.1 --set metrics.port="$PORT" "${E2E_SETS[@]}"
touch "$WORK/e2e.done"
wait "$SCRAPER_PID"
"${HELPER[@]}" e2e-figures --metrics "$OUT/e2e_metrics.jsonl" --log "$WORK/e2e.out" \
    --json "$WORK/e2e-figures.json" --data-json "$WORK/e2e-data.json" ${GPU_CSV:+--gpu-csv "$GPU_CSV"} \
    2>&1 | stamp gpu-proof >> "$LOG"
summary step --name e2e --figures "$WORK/e2e-figures.json"

# ------------------------------------------------------------------------------------------ a. tests + d. demo
wait "$DEMO_SHARDS_PID"
# Only the files that hold CUDA tests: the others import what the GPU machine lacks (moto).
mapfile -t CUDA_TEST_FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
run_tests() {
    if ((${#CUDA_TEST_FILES[@]})); then
        run_step tests "$TESTS_S" "$PY" -m pytest -m cuda -rA -p no:cacheprovider --timeout 120 "${CUDA_TEST_FILES[@]}"
    else
        summary step --name tests --status failed --note "no test file marks a test with pytest.mark.cuda"
    fi
}
TESTS_PID=""
if [[ $TESTS_WITH_DEMO == 1 ]]; then
    # The CUDA tests are small: they share the GPU with the demo's first minute (Ray start-up and the
    # first steps) instead of taking time of their own; that only makes the demo's figures conservative.
    run_tests &
    TESTS_PID=$!
    BACKGROUND+=("$TESTS_PID")
else
    run_tests
fi

DEMO_MINUTES=$("${HELPER[@]}" demo-minutes --deadline "$DEADLINE" --reserve-s "$DEMO_RESERVE_S" \
    --max "$DEMO_MAX_MIN" --min "$DEMO_MIN_MIN")
say "demo: ${DEMO_MINUTES} min of training ($(( DEADLINE - $(date +%s) ))s left)"
run_step demo "$((DEADLINE - $(date +%s)))" "$PY" -m stream_swav demo --out "$WORK/demo" --fresh \
    --minutes "$DEMO_MINUTES" "${DEMO_ARGS[@]}"
DEMO_RC=$STEP_RC
cp "$WORK/demo/eval/summary.json" "$OUT/demo_summary.json" 2>/dev/null
cp "$WORK/demo/eval/accuracy.png" "$OUT/demo_accuracy.png" 2>/dev/null
cp "$WORK/demo/eval/results.jsonl" "$OUT/demo_results.jsonl" 2>/dev/null
"${HELPER[@]}" demo-figures --eval-dir "$WORK/demo/eval" --json "$WORK/demo-figures.json" \
    --log "$WORK/demo.out" --minutes "$DEMO_MINUTES"
summary step --name demo --figures "$WORK/demo-figures.json"
if [[ $DEMO_RC == 1 && -s $OUT/demo_summary.json ]]; then
    # The demo's exit status 1 is its verdict (learned features not above random init), not a failure
    # to measure: the figures are all there.
    summary step --name demo --status ok --note "demo exit 1: its verdict, learned features did not beat random init"
    say "demo: counted ok: exit status 1 is the demo's verdict (not above random init), the figures are complete"
fi

[[ -n $TESTS_PID ]] && wait "$TESTS_PID"
cp "$WORK/tests.out" "$OUT/pytest.txt" 2>/dev/null
"${HELPER[@]}" tests-figures --pytest-output "$OUT/pytest.txt" --json "$WORK/tests-figures.json"
summary step --name tests --figures "$WORK/tests-figures.json"

# ------------------------------------------------------------------------------------------ finish
WALL_S=$(( $(date +%s) - START ))
say "done in ${WALL_S}s"
"${HELPER[@]}" cap-file "$LOG"
"${HELPER[@]}" finish --summary "$SUMMARY" --lock "$LOCK" --out "$OUT" --wall-s "$WALL_S" \
    ${GPU_CSV:+--gpu-csv "$GPU_CSV"} | tee -a "$LOG"
"${HELPER[@]}" check-out --out "$OUT" 2>&1 | tee -a "$LOG"
OUT_OK=${PIPESTATUS[0]}
FAILED=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["failed_steps"]))' "$SUMMARY" 2>/dev/null || echo 1)
[[ $FAILED == 0 && $OUT_OK == 0 ]]
