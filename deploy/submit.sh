#!/usr/bin/env bash
# Submit a stream-swav training run to a running Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://ray-head:8265 deploy/submit.sh [options] [-- stream-swav train arguments]
#
#   --config FILE   training config (default: deploy/configs/resnet50-gpu.yaml)
#   --ship-wheel    also install stream-swav on the nodes from a wheel built here (for a cluster
#                   image without stream-swav; see deploy/README.md for what that costs)
#   --no-wait       return after submitting instead of following the logs
#
# Everything after `--` goes to `stream-swav train`, e.g. `-- --set train.learners=4`.
# SUBMISSION_ID overrides the generated job id. Before uploading anything it refuses (exit 2) a
# config whose data.shards or checkpoint.dir is a relative local path, and a cluster that requires
# its auth token when none is here; against such a cluster it sets RAY_AUTH_MODE=token, which the
# stop command it prints needs as well:
#   [RAY_AUTH_MODE=token] ray job stop --address "$RAY_ADDRESS" <submission id>
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

config=deploy/configs/resnet50-gpu.yaml
ship_wheel=0
# A word, not an array: an empty array under `set -u` is an error in bash before 4.4 (macOS's 3.2).
wait_flag=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) [[ $# -ge 2 ]] || { echo "submit.sh: --config needs a file" >&2; exit 2; }
                  config=$2; shift 2 ;;
        --ship-wheel) ship_wheel=1; shift ;;
        --no-wait) wait_flag=--no-wait; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "submit.sh: unknown option $1 (stream-swav arguments go after --)" >&2; exit 2 ;;
    esac
done

# The dashboard address (http://HOST:8265), not the GCS one: job submission goes through the dashboard.
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard, e.g. http://ray-head:8265}"
[[ -f "$config" ]] || { echo "submit.sh: no config file $config" >&2; exit 2; }
# The path is resolved on the cluster inside the uploaded working dir, so it must be relative, lead
# nowhere outside the repository, and not be left out of the upload (it honours .gitignore: runs/).
[[ "$config" != /* ]] || { echo "submit.sh: give the config relative to the repository root" >&2; exit 2; }
case "$(cd "$(dirname "$config")" && pwd -P)/" in
    "$(pwd -P)"/*) ;;
    *) echo "submit.sh: $config is outside the repository; the job only sees what is uploaded from it" >&2; exit 2 ;;
esac
if git -C "$repo_root" check-ignore -q -- "$config" 2>/dev/null; then
    echo "submit.sh: $config is ignored by git, so it is not uploaded; put the config under deploy/configs/" >&2
    exit 2
fi

# Check the configuration the job will run with, here rather than after the upload and the cluster's
# start-up: a typo, or a relative local path in data.shards or checkpoint.dir, which the job would
# resolve inside its throwaway copy of the working dir (shards not there, checkpoints lost with it).
# This checkout's own stream_swav does it: the job runs this checkout's code (runtime_env.yaml).
python3 -m stream_swav config --for-job --config "$config" "$@" >/dev/null

# Token authentication (Ray 2.60): a cluster started while a token exists (~/.ray/auth_token, which
# the first local ray.init() creates) refuses requests without it, but the job CLI sends it only
# under RAY_AUTH_MODE=token. The dashboard tells its mode without a token; a Ray without token
# authentication has no such endpoint (an HTTP error), and needs none.
dashboard=$RAY_ADDRESS
[[ $dashboard == *://* ]] || dashboard=http://$dashboard
auth_mode=$(python3 - "$dashboard" <<'PY'
import json
import sys
import urllib.error
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/authentication_mode", timeout=30) as reply:
        print(json.load(reply).get("authentication_mode", "disabled"))
except urllib.error.HTTPError:
    print("disabled")
except (urllib.error.URLError, OSError) as error:
    sys.exit(f"submit.sh: no Ray dashboard answers at {sys.argv[1]} ({getattr(error, 'reason', error)}); "
             "RAY_ADDRESS must be the dashboard, e.g. http://ray-head:8265")
PY
) || exit 2
ray_auth=
if [[ $auth_mode == token ]]; then
    # Where Ray looks, in its order: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    # ~/.ray/auth_token.
    if [[ -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
        echo "submit.sh: the cluster at $RAY_ADDRESS requires its auth token: put the output of" \
            "\`ray get-auth-token\` on its head into ~/.ray/auth_token here, or into RAY_AUTH_TOKEN" >&2
        exit 2
    fi
    export RAY_AUTH_MODE=token
    ray_auth="RAY_AUTH_MODE=token "
fi

runtime_env=deploy/runtime_env.yaml
working_dir=.
if [[ $ship_wheel == 1 ]]; then
    # Upload a staging folder instead of the checkout: the wheel (code + console script) and the
    # config, at the same relative path, so nothing shadows the installed package.
    working_dir=$(mktemp -d)
    trap 'rm -rf "$working_dir"' EXIT
    mkdir -p "$working_dir/deploy/wheels" "$working_dir/$(dirname "$config")"
    cp "$config" "$working_dir/$config"
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$working_dir/deploy/wheels" .
    wheel=$(basename "$working_dir"/deploy/wheels/stream_swav-*.whl)
    runtime_env=$working_dir/runtime_env.yaml
    # Ray expands ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR} on each node to where it unpacked the
    # working dir, the only place the uploaded wheel can be found.
    python3 - "$wheel" "$runtime_env" <<'PY'
import sys

import yaml

wheel, out = sys.argv[1], sys.argv[2]
with open("deploy/runtime_env.yaml") as f:
    env = yaml.safe_load(f)
env["pip"] = ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/deploy/wheels/" + wheel]
with open(out, "w") as f:
    yaml.safe_dump(env, f, sort_keys=False)
PY
fi

submission_id=${SUBMISSION_ID:-stream-swav-$(date -u +%Y%m%d-%H%M%S)}
echo "submitting $submission_id ($config) to $RAY_ADDRESS"
echo "stop it cleanly with: ${ray_auth}ray job stop --address $RAY_ADDRESS $submission_id"

ray job submit \
    --address "$RAY_ADDRESS" \
    --submission-id "$submission_id" \
    --working-dir "$working_dir" \
    --runtime-env "$runtime_env" \
    ${wait_flag:+"$wait_flag"} \
    -- stream-swav train --config "$config" "$@"
