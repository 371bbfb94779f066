"""The deployment files under deploy/ are usable as shipped.

They parse; every metric they mention is one the code exports, under the name
PromQL sees; they launch the real entrypoint with config files that exist and
load; the Ray runtime_env is one Ray accepts and one the driver's own ray.init
can be merged with; the KubeRay manifest has the cluster shape the configs assume.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stream_swav.config import load_config
from stream_swav.runtime.metrics import METRIC_NAMES, EvalMetrics, Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
GPU_CONFIG = DEPLOY / "configs" / "resnet50-gpu.yaml"
DASHBOARD = DEPLOY / "grafana" / "stream-swav.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_SINGLE_HOST = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_KUBERNETES = DEPLOY / "prometheus" / "prometheus-kubernetes.yml"
CONSTRAINTS = DEPLOY / "constraints.txt"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
RUNTIME_ENV = DEPLOY / "runtime_env.yaml"
ENTRYPOINT = "stream-swav train"

METRIC_IDENTIFIER = re.compile(r"\bstream_swav_[A-Za-z0-9_:]+")
CONFIG_PATH = re.compile(r"deploy/configs/[\w.-]+\.ya?ml")
# Sample-name suffixes prometheus_client adds per family type, besides the family name itself.
SUFFIXES_BY_TYPE = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def load_documents(path: Path) -> list[Any]:
    return list(yaml.safe_load_all(path.read_text()))


def exposed_series_names() -> dict[str, str]:
    """Every sample name the trainer's and the evaluator's registries can expose -> family type.

    Taken from the registries' families rather than from scraped text, because a labelled
    family (decode errors by reason) has no sample until its first increment."""
    names: dict[str, str] = {}
    for registry in (Metrics().registry, EvalMetrics().registry):
        for family in registry.collect():
            for suffix in SUFFIXES_BY_TYPE[family.type]:
                names[family.name + suffix] = family.type
    return names


def allowed_metric_names() -> set[str]:
    """METRIC_NAMES, plus _bucket/_sum/_count series of families that really are histograms or summaries."""
    exposed = exposed_series_names()
    return set(METRIC_NAMES) | {name for name, kind in exposed.items()
                                if kind in ("histogram", "gaugehistogram", "summary")}


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
        for inner in panel.get("panels", []):
            exprs += [target["expr"] for target in inner.get("targets", [])]
    exprs += [var["query"] for var in dashboard["templating"]["list"] if var["type"] == "query"]
    return exprs


def alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def rayjob_documents() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = load_documents(RAYJOB)
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    return jobs[0], [d for d in docs if d["kind"] != "RayJob"]


def ray_container(pod_template: dict[str, Any]) -> dict[str, Any]:
    # KubeRay runs Ray in the first container of each pod.
    return pod_template["spec"]["containers"][0]


def resource_quantity(value: Any) -> int:
    return int(str(value))


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_documents(path)
    assert docs and all(doc is not None for doc in docs), f"{path} has an empty document"


def test_dashboard_is_json_with_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


# ------------------------------------------------------------------------------------------ metrics


def test_metric_names_are_what_prometheus_client_exposes() -> None:
    # The basis of the checks below: METRIC_NAMES promises "names as PromQL sees them".
    assert set(METRIC_NAMES) <= set(exposed_series_names())


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_metric_mentioned_in_deploy_is_exported(path: Path) -> None:
    allowed = allowed_metric_names()
    unknown = sorted(set(METRIC_IDENTIFIER.findall(path.read_text())) - allowed)
    assert not unknown, f"{path.relative_to(REPO)} names metrics the code does not export: {unknown}"


def test_dashboard_and_alert_expressions_use_only_exported_metrics() -> None:
    allowed = allowed_metric_names()
    exprs = dashboard_expressions(json.loads(DASHBOARD.read_text())) + alert_expressions()
    used = {name for expr in exprs for name in METRIC_IDENTIFIER.findall(expr)}
    assert used and used <= allowed, sorted(used - allowed)


def test_dashboard_covers_the_runs_vital_signs() -> None:
    used = {name for expr in dashboard_expressions(json.loads(DASHBOARD.read_text()))
            for name in METRIC_IDENTIFIER.findall(expr)}
    wanted = {"stream_swav_" + n for n in (
        "images_per_second", "images_trained_total", "loss", "learning_rate", "prototype_perplexity",
        "prototypes_unused", "sinkhorn_marginal_error", "queue_fill_ratio", "input_wait_seconds_total",
        "decode_errors_total", "shards_completed_total", "bytes_read_total", "object_store_batches_in_flight",
        "checkpoint_age_seconds", "checkpoint_duration_seconds", "last_checkpoint_step", "nonfinite_loss_total",
        "gpu_memory_allocated_bytes", "eval_knn_top1_ratio")}
    assert wanted <= used, sorted(wanted - used)


def test_counters_are_only_read_as_rates_in_the_dashboard() -> None:
    # A raw counter restarts at 0 with every trainer restart; only rate()/increase() survive that.
    counters = {n for n in METRIC_NAMES if n.endswith("_total")}
    for expr in dashboard_expressions(json.loads(DASHBOARD.read_text())):
        for match in METRIC_IDENTIFIER.finditer(expr):
            if match.group() in counters:
                opened = expr[:match.start()]
                assert re.search(r"\b(rate|increase)\($", opened.rstrip()), expr


def test_alerts_cover_the_required_conditions() -> None:
    used = {name for expr in alert_expressions() for name in METRIC_IDENTIFIER.findall(expr)}
    for name in ("collapse_alarm", "checkpoint_age_seconds", "input_wait_seconds_total", "decode_errors_total",
                 "nonfinite_loss_total"):
        assert "stream_swav_" + name in used


def test_alert_tests_expect_the_rules_own_annotations() -> None:
    """What promtool would compare, checked without it (it is not installed everywhere: the
    Stalled test's description had gone stale unnoticed): each expected annotation without a
    template is the rule's own. (InputBound, DecodeActorRestarts and the two evaluation rules have no case.)"""
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    tested = set()
    for case in yaml.safe_load((ALERTS.parent / "alerts.test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            tested.add(check["alertname"])
            for alert in check.get("exp_alerts", []):
                for key, expected in alert.get("exp_annotations", {}).items():
                    own = rules[check["alertname"]]["annotations"][key]
                    if "{{" not in own:
                        assert expected == own, (check["alertname"], key)
    assert tested and tested <= set(rules)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run([promtool, *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
@pytest.mark.parametrize("config", [PROMETHEUS_SINGLE_HOST, PROMETHEUS_KUBERNETES], ids=lambda p: p.name)
def test_prometheus_configs_pass_promtool(config: Path) -> None:
    done = subprocess.run([shutil.which("promtool"), "check", "config", config.name], cwd=config.parent,
                          capture_output=True, text=True, timeout=120)
    if config == PROMETHEUS_KUBERNETES and "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert done.returncode == 0, done.stdout + done.stderr


def test_single_host_prometheus_scrapes_trainer_and_follower_and_loads_the_alerts() -> None:
    config = yaml.safe_load(PROMETHEUS_SINGLE_HOST.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    for job in config["scrape_configs"]:
        assert "static_configs" in job and not any(key.endswith("_sd_configs") for key in job), job["job_name"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    ports = {int(t.rsplit(":", 1)[1]) for t in targets}
    assert {load_config(GPU_CONFIG).metrics.port, 9401} <= ports


def test_kubernetes_prometheus_keeps_the_rayjob_head_pod_and_loads_the_alerts() -> None:
    config = yaml.safe_load(PROMETHEUS_KUBERNETES.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    job_doc, _ = rayjob_documents()
    head = job_doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]
    # What Prometheus sees of the head pod, as __meta_kubernetes_pod_* labels.
    meta = {"__meta_kubernetes_pod_phase": "Running"}
    for prefix, values in (("annotation", head["annotations"]), ("label", head["labels"])):
        meta.update({f"__meta_kubernetes_pod_{prefix}_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}": value
                     for key, value in values.items()})
    keeps = [rule for rule in job["relabel_configs"] if rule.get("action") == "keep"]
    assert keeps
    for rule in keeps:
        value = ";".join(meta.get(label, "") for label in rule["source_labels"])
        assert re.fullmatch(rule["regex"], value), rule


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", sorted((DEPLOY / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_load_and_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.shards, "train refuses to start without data.shards"


def test_gpu_config_is_the_resnet50_recipe() -> None:
    cfg = load_config(GPU_CONFIG)
    assert cfg.model.arch == "resnet50" and cfg.model.prototypes == 3000
    crops = cfg.crops
    assert (crops.global_count, crops.global_size, crops.local_count, crops.local_size) == (2, 224, 6, 96)
    assert cfg.crops.global_scale == (0.14, 1.0) and cfg.crops.local_scale == (0.05, 0.14)
    assert cfg.swav.queue_length == 3840
    assert cfg.swav.queue_start_images == pytest.approx(15 * 1_281_167, rel=0.05)
    assert (cfg.optim.optimizer, cfg.optim.base_lr, cfg.optim.final_lr) == ("lars", 0.6, 0.0006)
    assert cfg.train.precision in ("auto", "bf16") and cfg.train.channels_last
    assert cfg.train.batch_size in (64, 256) and cfg.train.learners > 1
    assert cfg.data.shards.startswith("s3://") and "{" in cfg.data.shards and cfg.data.follow
    assert cfg.checkpoint.dir.startswith("s3://")
    assert (cfg.metrics.host, cfg.metrics.port) == ("0.0.0.0", 9400)


def test_cpu_smoke_config_runs_on_cpu_from_local_shards() -> None:
    cfg = load_config(DEPLOY / "configs" / "cpu-smoke.yaml")
    assert cfg.train.device == "cpu" and cfg.train.gpus_per_learner == 0
    assert "://" not in cfg.data.shards and "://" not in cfg.checkpoint.dir
    assert cfg.train.image_budget or cfg.train.time_budget_s


# ------------------------------------------------------------------------------------------ entrypoint


def test_console_script_and_train_subcommand_exist() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["stream-swav"] == "stream_swav.cli:main"
    from stream_swav import cli

    args = cli.build_parser().parse_args(shlex.split(ENTRYPOINT)[1:] + ["--config", str(GPU_CONFIG),
                                                                         "--set", "train.learners=2"])
    assert args.func is cli._train and args.overrides == ["train.learners=2"]


@pytest.mark.parametrize("name", ["README.md", "submit.sh", "Dockerfile"])
def test_recipes_name_only_config_files_that_exist(name: str) -> None:
    text = (DEPLOY / name).read_text()
    paths = set(CONFIG_PATH.findall(text))
    assert paths, f"{name} names no config file"
    assert all((REPO / p).is_file() for p in paths), sorted(p for p in paths if not (REPO / p).is_file())


def test_submit_script_launches_the_real_entrypoint() -> None:
    text = (DEPLOY / "submit.sh").read_text()
    assert re.search(r"^ray job submit \\$", text, re.MULTILINE)
    assert f'-- {ENTRYPOINT} --config "$config" "$@"' in text
    assert "--runtime-env" in text and (REPO / re.search(r"^runtime_env=(\S+)$", text, re.MULTILINE).group(1)).is_file()


def test_readme_gives_the_ray_job_submit_command() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert ("ray job submit --address $RAY_ADDRESS --working-dir . --runtime-env deploy/runtime_env.yaml \\\n"
            "    -- stream-swav train --config deploy/configs/resnet50-gpu.yaml") in text
    assert "ray job stop" in text and "SIGTERM" in text


def test_dockerfile_default_command_and_port() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))
    assert " ".join(cmd[:2]) == ENTRYPOINT and cmd[2] == "--config" and (REPO / cmd[3]).is_file()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert "py311" in base and not base.endswith(":latest")
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.MULTILINE)
    exposed = {int(p) for p in re.findall(r"^EXPOSE (\d+)$", text, re.MULTILINE)}
    assert load_config(GPU_CONFIG).metrics.port in exposed
    assert re.search(r"^RUN pip install -c deploy/constraints\.txt \.", text, re.MULTILINE)


def pinned_versions() -> dict[str, str]:
    """deploy/constraints.txt as {canonical name: version}; every entry must be an exact pin."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", entry)
            assert match, f"deploy/constraints.txt: not an exact pin: {line}"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_constraints_pin_every_runtime_dependency_within_its_range() -> None:
    pins = pinned_versions()
    for declared in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(declared)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {declared}"


def test_dockerfile_installs_everything_under_the_constraints() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"\bpip install\b[^\n]*", instructions)
    assert installs and all(" -c deploy/constraints.txt " in install for install in installs), installs
    assert (instructions.index("COPY --chown=ray:users deploy/constraints.txt ./deploy/constraints.txt")
            < instructions.index("pip install"))
    # The image's Ray is the one the constraints pin (pip would otherwise replace it).
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", text, re.MULTILINE).group(1)
    assert pinned_versions()["ray"] == base


def submit(*args: str, ray_address: str, home: Path) -> subprocess.CompletedProcess:
    """deploy/submit.sh with the venv's python3 (which checks the configuration) and no Ray token."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin", "HOME": str(home),
           "RAY_ADDRESS": ray_address}
    return subprocess.run(["bash", str(DEPLOY / "submit.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("overrides, key", [
    ([], "data.shards"),  # the smoke config as it is: runs/... is relative
    (["--set", "data.shards=/mnt/shards", "--set", "checkpoint.dir=file://runs/ckpt"], "checkpoint.dir"),
], ids=["smoke-config", "set-after-dashdash"])
def test_submit_refuses_relative_local_paths_before_contacting_the_cluster(overrides: list[str], key: str,
                                                                           tmp_path: Path) -> None:
    # Nothing listens at RAY_ADDRESS: reaching the cluster would fail with another message.
    done = submit("--config", "deploy/configs/cpu-smoke.yaml", "--", *overrides,
                  ray_address=f"http://127.0.0.1:{free_port()}", home=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"stream-swav: configuration error: {key}: ") and "absolute path" in line and "s3://" in line


def test_submit_checks_the_dashboard_once_the_paths_are_usable(tmp_path: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    done = submit("--config", "deploy/configs/cpu-smoke.yaml", "--", "--set", "data.shards=/mnt/shards",
                  "--set", "checkpoint.dir=s3://bucket/ckpt", ray_address=address, home=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"submit.sh: no Ray dashboard answers at {address} ")


def test_submit_refuses_a_token_cluster_without_its_token_before_uploading(tmp_path: Path) -> None:
    """A head with token authentication answers /api/authentication_mode without a token (as Ray
    2.60's dashboard does, see tests/test_job.py) and refuses everything else without one."""
    requests = []

    class TokenDashboard(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            if self.path == "/api/authentication_mode":
                body = json.dumps({"authentication_mode": "token"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(401, "Unauthorized: Missing authentication token")

        do_POST = do_PUT = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenDashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = submit("--config", "deploy/configs/cpu-smoke.yaml", "--", "--set", "data.shards=/mnt/shards",
                      "--set", "checkpoint.dir=/mnt/ckpt", ray_address=f"127.0.0.1:{server.server_port}",
                      home=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert "requires its auth token" in line and "ray get-auth-token" in line and "RAY_AUTH_TOKEN" in line
    assert requests == ["/api/authentication_mode"]


def test_submit_refuses_a_config_the_upload_would_leave_behind(tmp_path: Path) -> None:
    """The job runs `--config PATH` inside the uploaded working dir: a path out of the repository,
    or in a git-ignored folder (runs/), is not there, which was found only after the upload."""
    address = f"http://127.0.0.1:{free_port()}"
    outside = tmp_path / "mine.yaml"
    outside.write_text((DEPLOY / "configs" / "cpu-smoke.yaml").read_text())
    relative = os.path.relpath(outside, REPO)
    ignored = REPO / "runs" / f"submit-test-{os.getpid()}.yaml"
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text(outside.read_text())
    try:
        for config, says in ((relative, "is outside the repository"),
                             (str(ignored.relative_to(REPO)), "is ignored by git, so it is not uploaded")):
            done = submit("--config", config, ray_address=address, home=tmp_path)
            assert done.returncode == 2, done.stdout + done.stderr
            (line,) = done.stderr.splitlines()
            assert line.startswith("submit.sh: ") and says in line
    finally:
        ignored.unlink()
    done = submit("--config", ray_address=address, home=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "submit.sh: --config needs a file"


def test_submit_script_is_valid_bash_and_refuses_without_an_address() -> None:
    script = DEPLOY / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "RAY_ADDRESS" in done.stderr
    done = subprocess.run(["bash", str(script), "--config", "deploy/configs/missing.yaml"],
                          env={**env, "RAY_ADDRESS": "http://127.0.0.1:8265"}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "no config file" in done.stderr


# ------------------------------------------------------------------------------------------ ray runtime_env


def submitted_runtime_env() -> dict[str, Any]:
    # The same parsing `ray job submit --runtime-env ... --working-dir .` does.
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=".")


def test_runtime_env_is_accepted_by_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    env = submitted_runtime_env()
    assert set(env) <= set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)  # raises on wrongly typed fields, e.g. a non-string env var
    assert "pip" not in env, "the package comes from the image; see deploy/README.md"
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60


def test_runtime_env_merges_with_the_drivers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the job the driver calls ray.init(runtime_env=...) again. Ray merges that with the
    job's runtime_env the way ray.init does below, and refuses to start the driver on a conflict."""
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from stream_swav.runtime import cluster

    job_env = submitted_runtime_env()
    # Ray applies the job's env_vars to the driver's process, and the driver forwards some of them.
    for name, value in job_env["env_vars"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    passed: dict[str, Any] = {}
    # Only to read what init_ray hands to Ray; starting a cluster is not what is tested here.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: passed.update(kwargs))
    cluster.init_ray()

    driver_env = passed["runtime_env"]
    merged = _merge_runtime_env(job_env, driver_env, override=os.environ.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1")
    assert merged is not None, "deploy/runtime_env.yaml conflicts with the driver's ray.init runtime_env"
    # Actors see the job's settings and the driver's, and none of the job's values was replaced.
    assert merged["env_vars"].items() >= job_env["env_vars"].items()
    assert merged["env_vars"].keys() >= driver_env["env_vars"].keys()
    assert merged["working_dir"] == job_env["working_dir"]


# ------------------------------------------------------------------------------------------ kuberay


def test_rayjob_runs_the_entrypoint_with_the_mounted_config() -> None:
    job, _ = rayjob_documents()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert " ".join(entry[:2]) == ENTRYPOINT and entry[2] == "--config"
    mount_dir, config_name = entry[3].rsplit("/", 1)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    mounts = {m["mountPath"]: m["name"] for m in ray_container(head)["volumeMounts"]}
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    config_map_name = volumes[mounts[mount_dir]]["configMap"]["name"]

    config_map = load_documents(DEPLOY / "kuberay" / "configmap.yaml")[0]
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == config_map_name
    # The ConfigMap carries the config file verbatim, so the two cannot drift apart.
    assert config_map["data"][config_name] == (DEPLOY / "configs" / config_name).read_text()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("HTTPMode", "K8sJobMode")


def test_rayjob_has_a_cpu_decode_group_and_a_gpu_learner_group() -> None:
    job, _ = rayjob_documents()
    cfg = load_config(GPU_CONFIG)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]

    def gpus(group: dict[str, Any]) -> int:
        resources = ray_container(group["template"])["resources"]
        return max(resource_quantity(part.get("nvidia.com/gpu", 0)) for part in resources.values())

    def asks_for_any_gpu(group: dict[str, Any]) -> bool:
        resources = ray_container(group["template"])["resources"]
        return any("gpu" in key for part in resources.values() for key in part)

    cpu_groups = [g for g in groups if not asks_for_any_gpu(g)]
    gpu_groups = [g for g in groups if gpus(g) >= 1]
    assert cpu_groups and gpu_groups
    assert all(resource_quantity(ray_container(g["template"])["resources"]["limits"]["cpu"]) >= 8 for g in cpu_groups)

    (learners,) = gpu_groups
    limits = ray_container(learners["template"])["resources"]["limits"]
    assert resource_quantity(limits["nvidia.com/gpu"]) == cfg.train.gpus_per_learner
    # One learner per pod, as many pods as learners, and no room left for a decode actor beside it.
    assert learners["replicas"] == learners["minReplicas"] == learners["maxReplicas"] == cfg.train.learners
    assert float(learners["rayStartParams"]["num-cpus"]) == cfg.train.cpus_per_learner
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_driver_stays_on_the_head_and_its_metrics_port_is_reachable() -> None:
    job, others = rayjob_documents()
    spec = job["spec"]
    # Entrypoint resources would let Ray schedule the driver (and so /metrics) on any worker.
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & set(spec)
    port = load_config(GPU_CONFIG).metrics.port
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    ports = {p["containerPort"]: p["name"] for p in ray_container(head).get("ports", [])}
    name = ports[port]
    assert name != "metrics" and len(name) <= 15  # "metrics" is KubeRay's name for Ray's own exporter
    assert head["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert head["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    (service,) = [d for d in others if d["kind"] == "Service"]
    selector = service["spec"]["selector"]
    assert selector.items() <= head["metadata"]["labels"].items()
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert not selector.items() <= group["template"]["metadata"]["labels"].items(), group["groupName"]
    assert any(p["port"] == port and p["targetPort"] in (name, port) for p in service["spec"]["ports"])


def test_rayjob_pods_get_s3_credentials_and_time_for_a_final_checkpoint() -> None:
    job, _ = rayjob_documents()
    secret = load_documents(DEPLOY / "kuberay" / "secret.example.yaml")[0]
    assert secret["kind"] == "Secret"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(secret["stringData"])
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]
    head_env = {e["name"]: e.get("value") for e in ray_container(head).get("env", [])}
    stop_wait = int(head_env["RAY_JOB_STOP_WAIT_TIME_S"])
    images = set()
    for template in [head] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        container = ray_container(template)
        refs = [src["secretRef"]["name"] for src in container.get("envFrom", []) if "secretRef" in src]
        assert secret["metadata"]["name"] in refs
        assert template["spec"]["terminationGracePeriodSeconds"] > stop_wait
        assert job["spec"]["jobId"] in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        images.add(container["image"])
    assert len(images) == 1
