"""The command line as a new user meets it: fast help, a version, and mistakes answered in one line.

Each mistake must end with exit status 2 and one line on stderr naming the key or resource and
what to do, before any Ray is started, with the traceback available under --debug.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import colour_samples, free_port, image_bytes, start_moto, tar_bytes, use_fake_credentials
from runtime_helpers import write_config

from stream_swav import cli
from stream_swav.config import UsageError

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI in this process; it must return 2 with exactly one line on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stream-swav: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_help_is_fast_and_every_option_explains_itself():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "stream_swav", "--help"], capture_output=True, text=True,
                          cwd=REPO, check=True)
    # Building the parser imports no torch (the apps are imported when their command runs).
    probe = subprocess.run([sys.executable, "-c", "import sys; from stream_swav import cli; cli.build_parser(); "
                            "print('torch' in sys.modules, 'ray' in sys.modules)"],
                           capture_output=True, text=True, cwd=REPO, check=True)
    assert probe.stdout.split() == ["False", "False"]
    assert "train" in done.stdout and time.monotonic() - started < 60
    version = subprocess.run([sys.executable, "-m", "stream_swav", "--version"], capture_output=True, text=True,
                             cwd=REPO, check=True)
    assert version.stdout.startswith("stream-swav ")
    parser = cli.build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            if option.dest not in ("help",):
                assert option.help, f"{action.prog}: {option.option_strings or option.dest} has no help text"


def test_configuration_mistakes_are_one_line(capsys):
    err = one_line_error(capsys, ["config", "--set", "data.shards={000..009.tar"])
    assert "data.shards: has unbalanced braces" in err
    err = one_line_error(capsys, ["config", "--set", "optim.base_lr=-1"])
    assert "optim.base_lr: must be > 0" in err
    # What a Ray job could not use: a home-relative path is not expanded on the cluster.
    err = one_line_error(capsys, ["config", "--for-job", "--set", "data.shards=~/shards",
                                  "--set", "checkpoint.dir=/mnt/ckpt"])
    assert "data.shards: '~/shards' starts with ~" in err and "absolute path" in err
    # The traceback is there for whoever asks.
    with pytest.raises(UsageError):
        cli.main(["--debug", "config", "--set", "optim.base_lr=-1"])


def test_config_prints_risky_settings_as_warnings_beside_the_yaml(capsys):
    assert cli.main(["config", "--set", "model.prototypes=30", "--set", "model.output_dim=64"]) == 0
    out, err = capsys.readouterr()
    assert "prototypes: 30" in out and "output_dim: 64" in out
    assert err.startswith("warning: model.prototypes: 30 prototypes span fewer directions than model.output_dim=64")
    assert cli.main(["config"]) == 0
    assert capsys.readouterr().err == ""


def test_train_refuses_missing_shards_and_a_missing_gpu_before_starting_ray(tmp_path, capsys):
    config = write_config(tmp_path / "train.yaml", {"data": {"shards": str(tmp_path / "nowhere")},
                                                    "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    started = time.monotonic()
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert f"data.shards: no shards at {tmp_path / 'nowhere'} (it does not exist)" in err
    assert time.monotonic() - started < 20  # no Ray was started for this

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(tar_bytes(colour_samples(2)))
    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path / "reference.yaml", {"data": {"shards": str(tmp_path / "shards")},
                                                        "checkpoint": {"dir": str(tmp_path / "ckpt")},
                                                        "curation": {"balance": 1.0, "balance_signal": "reference",
                                                                     "balance_reference": str(tmp_path / "empty")}})
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert f"curation.balance_reference: no shards at {tmp_path / 'empty'}" in err
    # Shards without one decodable image, and a brace pattern that does not expand, name the key too.
    (tmp_path / "empty" / "a.tar").write_bytes(tar_bytes([("bad-0", {"jpg": b"not a jpeg"})]))
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert f"curation.balance_reference: {tmp_path / 'empty'}: no images" in err
    config = write_config(tmp_path / "braces.yaml", {"data": {"shards": str(tmp_path / "shards")},
                                                     "checkpoint": {"dir": str(tmp_path / "ckpt")},
                                                     "curation": {"balance": 1.0, "balance_signal": "reference",
                                                                  "balance_reference": "/ref/{a,b"}})
    assert "curation.balance_reference: Unbalanced braces" in one_line_error(capsys, ["train", "--config", str(config)])
    # A checkpoint.dir that is a file (or lies under one) would let the run train for days saving nothing.
    (tmp_path / "a-file").write_text("not a folder")
    for where in ("a-file", "a-file/ckpt"):
        config = write_config(tmp_path / "file.yaml", {"data": {"shards": str(tmp_path / "shards")},
                                                       "checkpoint": {"dir": str(tmp_path / where)}})
        err = one_line_error(capsys, ["train", "--config", str(config)])
        assert "error: checkpoint.dir: " in err and "file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".write-probe")) == []
    config = write_config(tmp_path / "gpu.yaml", {"data": {"shards": str(tmp_path / "shards")},
                                                  "checkpoint": {"dir": str(tmp_path / "ckpt")},
                                                  "train": {"device": "cuda"}})
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert "train.device: cuda, but this machine has no usable CUDA GPU" in err


def test_s3_without_credentials_or_endpoint_is_one_line(tmp_path, capsys, monkeypatch, moto_endpoint):
    use_fake_credentials(monkeypatch, moto_endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    config = write_config(tmp_path / "s3.yaml", {"data": {"shards": "s3://bucket/shards/"},
                                                 "storage": {"retries": 0, "connect_timeout_s": 1},
                                                 "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert "data.shards: no S3 credentials to read s3://bucket/shards/" in err and "AWS_ACCESS_KEY_ID" in err

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    closed = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "down.yaml", {"data": {"shards": "s3://bucket/shards/"},
                                                   "storage": {"endpoint_url": closed, "retries": 0,
                                                               "connect_timeout_s": 1, "read_timeout_s": 2},
                                                   "checkpoint": {"dir": str(tmp_path / "ckpt")}})
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert f"data.shards: cannot reach the S3 endpoint {closed}" in err and "storage.endpoint_url" in err


def test_the_downstream_commands_meet_storage_failures_in_one_line(tmp_path, capsys, monkeypatch, moto_endpoint):
    """eval, export, follow and make-shards printed 70-120 lines of botocore traceback for an S3
    store without credentials or out of reach, and accepted an endpoint botocore refuses."""
    use_fake_credentials(monkeypatch, moto_endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(tar_bytes(colour_samples(4)))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(image_bytes((10, 20, 30), "JPEG"))
    shards = str(tmp_path / "shards")
    for argv, option in ((["eval", "--checkpoint", "s3://bucket/ckpt", "--train", shards, "--test", shards],
                          "--checkpoint"),
                         (["export", "--checkpoint", "s3://bucket/ckpt", "--out", str(tmp_path / "x.pt")],
                          "--checkpoint / --out"),
                         (["follow", "--checkpoints", "s3://bucket/ckpt", "--train", shards, "--test", shards,
                           "--out", str(tmp_path / "follow"), "--once"], "--checkpoints"),
                         (["make-shards", str(tmp_path / "images"), "s3://bucket/out"], "dest")):
        err = one_line_error(capsys, argv)
        assert f"error: {option}: no S3 credentials" in err, err
    # Evaluation shards that are not there: refused at once, not at every poll of a follower.
    err = one_line_error(capsys, ["follow", "--checkpoints", str(tmp_path / "ckpt"), "--train",
                                  str(tmp_path / "nowhere"), "--test", shards, "--out", str(tmp_path / "f")])
    assert "error: --train: no shards at" in err
    err = one_line_error(capsys, ["follow", "--checkpoints", str(tmp_path / "typo"), "--train", shards, "--test",
                                  shards, "--out", str(tmp_path / "f"), "--once"])
    assert f"error: --checkpoints: {tmp_path / 'typo'} does not exist" in err
    # Flags that failed with a traceback, one of them only after the whole evaluation.
    eval_argv = ["eval", "--checkpoint", "x", "--train", shards, "--test", shards]
    assert "error: --device: 'gpu0' is not a device" in one_line_error(capsys, [*eval_argv, "--device", "gpu0"])
    assert "error: --json-out: " in one_line_error(capsys, [*eval_argv, "--json-out", str(tmp_path)])
    with pytest.raises(SystemExit) as refused:
        cli.main(["eval", "--checkpoint", "x", "--train", shards, "--test", shards, "--endpoint-url", "minio:9000"])
    assert refused.value.code == 2
    assert "--endpoint-url: must be empty or an http(s)://host[:port] URL" in capsys.readouterr().err


def test_demo_refuses_its_mistakes_before_writing_any_shard(tmp_path, capsys):
    """It wrote 210 MB of shards first, then refused the config file; a negative budget was blamed
    on optim.cosine_images."""
    out = tmp_path / "demo"
    err = one_line_error(capsys, ["demo", "--out", str(out), "--dataset", "procedural", "--config",
                                  str(tmp_path / "typo.yaml")])
    assert "typo.yaml: cannot read the config file" in err
    err = one_line_error(capsys, ["demo", "--out", str(out), "--dataset", "procedural", "--images", "-5"])
    assert "error: --images and --minutes must be >= 0" in err
    assert not out.exists()


def test_a_metrics_address_that_is_not_this_machines_is_blamed_on_the_host(tmp_path, capsys, monkeypatch):
    """It was blamed on metrics.port ("choose another port"), whatever the port."""
    from stream_swav.runtime import driver
    # The refusal comes before any actor starts: the private Ray `train` would start first (and stop
    # again) is nothing this test checks, and costs it most of its time.
    monkeypatch.setattr(driver, "init_ray", lambda: "no Ray started for this test")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(tar_bytes(colour_samples(2)))
    config = write_config(tmp_path / "host.yaml", {"data": {"shards": str(tmp_path / "shards")},
                                                   "checkpoint": {"dir": str(tmp_path / "ckpt")},
                                                   "metrics": {"host": "192.0.2.1", "port": 0}})
    err = one_line_error(capsys, ["train", "--config", str(config)])
    assert "configuration error: metrics.host: cannot serve metrics on 192.0.2.1:0" in err
