import errno
import json
import os
import signal
import subprocess
import sys
import time
import textwrap

import pytest
import torch

from stream_swav.config import CheckpointConfig, ModelConfig, StorageConfig
from stream_swav import checkpoint, storage
from stream_swav.model import BackboneSpec, SwAVModel
from stream_swav.runtime.checkpointing import CheckpointPolicy
from stream_swav.checkpoint import (
    list_step_dirs,
    load_backbone_state,
    load_checkpoint,
    load_resolved_backbone,
    mark_final,
    prune_checkpoints,
    read_latest,
    resolve_checkpoint,
    retained_steps,
    save_checkpoint,
)

STORAGE = StorageConfig()
INFO = {"arch": "resnet18", "small_stem": True, "metrics": {"loss": 7.9, "perplexity": float("nan")}}


def tiny_state(seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "queue": torch.randn(2, 6, 3),
        "rng": {"torch": torch.get_rng_state(), "numpy_seed_sequence": [1, 2, 3]},
        "cursor": {"shard-0": 17, "shard-1": 3},
        "images_seen": 320 * seed,
        "config": {"model": {"arch": "resnet18"}},
    }
    backbone = {"fc.weight": model[0].weight.detach().clone(), "fc.bias": model[0].bias.detach().clone()}
    return state, backbone


def save(root, step: int, **kwargs):
    state, backbone = tiny_state(step)
    return save_checkpoint(str(root), step, step * 64, state, backbone, INFO, STORAGE, **kwargs)


def test_a_save_whose_commit_is_refused_leaves_latest_and_the_older_steps_as_they_were(tmp_path):
    """The run's lease checked before latest.json moves (another run may have taken the folder over
    while this save uploaded): refused, nothing of the save stays and retention deletes nothing."""
    save(tmp_path, 1, keep_last=1)

    def taken_over() -> None:
        raise ValueError("another run holds the folder now")

    with pytest.raises(ValueError, match="another run holds the folder now"):
        save(tmp_path, 2, keep_last=1, before_commit=taken_over)
    assert read_latest(str(tmp_path), STORAGE)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000001"]
    calls = []
    save(tmp_path, 3, keep_last=1, before_commit=lambda: calls.append("confirmed"))
    assert calls == ["confirmed"] * 3  # before the step folder, before latest.json, before retention
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000000003"]


def test_round_trip_through_every_kind_of_url(tmp_path):
    state, backbone = tiny_state(100)
    info = save_checkpoint(str(tmp_path), 100, 6_400, state, backbone, INFO, STORAGE)

    step_dir = tmp_path / "step-000000100"
    assert sorted(p.name for p in step_dir.iterdir()) == ["backbone.pt", "meta.json", "state.pt"]
    assert info.step_url == str(tmp_path / "step-000000100")
    assert info.state_url == str(step_dir / "state.pt")
    assert info.bytes_written > (step_dir / "state.pt").stat().st_size

    latest = read_latest(str(tmp_path), STORAGE)
    assert latest == json.loads((step_dir / "meta.json").read_text())
    assert latest["step"] == 100 and latest["images_seen"] == 6_400
    assert latest["state"] == "step-000000100/state.pt"
    assert latest["backbone_url"] == str(step_dir / "backbone.pt")
    assert latest["arch"] == "resnet18" and latest["small_stem"] is True
    # JSON has no NaN: non-finite metrics are written as null.
    assert latest["metrics"] == {"loss": 7.9, "perplexity": None}
    assert latest["wall_time"] == info.wall_time and latest["time"].startswith("20")

    for url in (str(tmp_path), str(step_dir), str(step_dir / "state.pt")):
        loaded = load_checkpoint(url, STORAGE)
        assert loaded["cursor"] == {"shard-0": 17, "shard-1": 3}
        assert torch.equal(loaded["queue"], state["queue"])
        assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
        assert torch.equal(loaded["model"]["1.running_mean"], state["model"]["1.running_mean"])
        assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for url in (str(tmp_path), str(step_dir), str(step_dir / "backbone.pt")):
        loaded = load_backbone_state(url, STORAGE)
        assert loaded.keys() == backbone.keys()
        assert torch.equal(loaded["fc.weight"], backbone["fc.weight"])

    # The saved optimizer state resumes a fresh optimizer.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.load_state_dict(load_checkpoint(str(tmp_path), STORAGE)["model"], strict=True)
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(state["optimizer"])


def test_backbones_of_the_current_and_the_old_format_both_load(tmp_path):
    """backbone.pt records its spec and has no fc entries; files written before that carry zero fc
    placeholders and leave the spec to meta.json. Consumers load both, and a bare backbone file
    (an export) by the spec it records."""
    spec = BackboneSpec("resnet10", small_stem=True, stem_stride=2, width=4)
    torch.manual_seed(0)
    model = SwAVModel(ModelConfig(arch="resnet10", small_stem=True, stem_stride=2, width=4, hidden_dim=8,
                                  output_dim=4, prototypes=3)).eval()
    current = model.backbone_state_dict()
    old = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    old.update({"fc.weight": torch.zeros(1000, 32), "fc.bias": torch.zeros(1000)})
    save_checkpoint(str(tmp_path / "current"), 1, 64, {}, current, spec.to_record(), STORAGE)
    save_checkpoint(str(tmp_path / "old"), 1, 64, {}, old, spec.to_record(), STORAGE)
    bare = tmp_path / "export" / "narrow.pt"
    bare.parent.mkdir()
    torch.save(current, bare)

    images = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        expected = model.embed(images)
        for url in (tmp_path / "current", tmp_path / "old", bare):
            resolved = resolve_checkpoint(str(url))
            assert resolved.spec == spec
            torch.testing.assert_close(load_resolved_backbone(resolved)(images), expected)
    torch.save(old, bare)
    with pytest.raises(ValueError, match="records no backbone spec"):
        resolve_checkpoint(str(bare))


def test_latest_moves_to_the_newest_save(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    assert read_latest(str(tmp_path), STORAGE)["step"] == 200
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 200
    assert load_checkpoint(str(tmp_path / "step-000000100"), STORAGE)["images_seen"] == 320 * 100


def test_a_stop_right_after_a_periodic_save_marks_that_checkpoint_final(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    assert not mark_final(str(tmp_path), 100, STORAGE)  # not the latest: nothing is rewritten
    assert read_latest(str(tmp_path), STORAGE).get("final") is None
    before = (tmp_path / "latest.json").read_bytes()

    def taken_over() -> None:
        raise ValueError("another run holds the folder now")

    with pytest.raises(ValueError, match="another run holds the folder now"):
        mark_final(str(tmp_path), 200, STORAGE, before_commit=taken_over)
    assert (tmp_path / "latest.json").read_bytes() == before
    assert json.loads((tmp_path / "step-000000200" / "meta.json").read_text()).get("final") is not True
    assert mark_final(str(tmp_path), 200, STORAGE)
    latest = read_latest(str(tmp_path), STORAGE)
    assert latest["final"] is True and latest["step"] == 200 and latest["metrics"]["loss"] == 7.9
    assert json.loads((tmp_path / "step-000000200" / "meta.json").read_text()) == latest
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 200


def test_empty_or_missing_folder(tmp_path):
    assert read_latest(str(tmp_path / "nothing"), STORAGE) is None
    assert list_step_dirs(str(tmp_path / "nothing"), STORAGE) == {}
    with pytest.raises(FileNotFoundError, match="latest.json"):
        load_checkpoint(str(tmp_path), STORAGE)


def test_files_are_written_in_order_with_latest_last(tmp_path, monkeypatch):
    written = []
    real = checkpoint.storage.write_bytes_atomic

    def recording(url, data, cfg):
        written.append(url.removeprefix(str(tmp_path)))
        real(url, data, cfg)

    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", recording)
    save(tmp_path, 7)
    assert written == ["/step-000000007/state.pt", "/step-000000007/backbone.pt", "/step-000000007/meta.json",
                       "/latest.json"]


def test_a_failed_save_leaves_nothing_and_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 100)
    before = (tmp_path / "latest.json").read_bytes()
    real = checkpoint.storage.write_bytes_atomic

    def failing(url, data, cfg):
        if url.endswith("backbone.pt"):
            raise OSError("the storage went away")
        real(url, data, cfg)

    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", failing)
    with pytest.raises(OSError, match="went away"):
        save(tmp_path, 200)
    assert (tmp_path / "latest.json").read_bytes() == before
    # What the failed save wrote (state.pt) is gone with its folder.
    assert not (tmp_path / "step-000000200").exists()
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 100

    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", real)
    save(tmp_path, 300, keep_last=3)
    assert sorted(list_step_dirs(str(tmp_path), STORAGE)) == [100, 300]


def test_a_full_disk_makes_room_from_older_checkpoints_but_never_the_latest(tmp_path, monkeypatch):
    """ENOSPC while saving: older checkpoints go, oldest first, until the save fits; the one
    latest.json names is never deleted."""
    for step in (100, 200, 300):
        save(tmp_path, step, keep_last=5)
    real = checkpoint.storage.write_bytes_atomic
    disk = {"folders": 3}  # a disk with room for this many checkpoints

    def full_disk(url, data, cfg):
        if url.endswith("state.pt") and len(list_step_dirs(str(tmp_path), STORAGE)) >= disk["folders"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(url, data, cfg)

    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", full_disk)
    save(tmp_path, 400, keep_last=5)
    assert sorted(list_step_dirs(str(tmp_path), STORAGE)) == [200, 300, 400]
    assert read_latest(str(tmp_path), STORAGE)["step"] == 400

    # Nothing can make room: only the latest (400) is left besides the one being written.
    disk["folders"] = 1
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, 500, keep_last=5)
    assert sorted(list_step_dirs(str(tmp_path), STORAGE)) == [400]
    assert read_latest(str(tmp_path), STORAGE)["step"] == 400
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 400


def test_state_that_would_not_load_safely_is_refused_before_writing(tmp_path):
    save(tmp_path, 100)
    before = (tmp_path / "latest.json").read_bytes()
    state, backbone = tiny_state(200)
    state["schedule"] = CheckpointPolicy(1, 0.0)  # arbitrary class: weights_only loading rejects it
    with pytest.raises(ValueError, match="weights_only"):
        save_checkpoint(str(tmp_path), 200, 0, state, backbone, INFO, STORAGE)
    with pytest.raises(ValueError, match="small_stem"):
        save_checkpoint(str(tmp_path), 200, 0, *tiny_state(200), {"arch": "resnet18"}, STORAGE)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(str(tmp_path), 200, 0, *tiny_state(200), {**INFO, "step": 5}, STORAGE)
    with pytest.raises(TypeError, match="metrics"):
        save_checkpoint(str(tmp_path), 200, 0, *tiny_state(200), {**INFO, "metrics": {"x": object()}}, STORAGE)
    assert sorted(list_step_dirs(str(tmp_path), STORAGE)) == [100]
    assert (tmp_path / "latest.json").read_bytes() == before


def test_the_checkpoint_latest_points_at_is_never_overwritten(tmp_path):
    save(tmp_path, 100)
    with pytest.raises(ValueError, match="latest.json points at"):
        save(tmp_path, 100)
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 100


def test_stale_folder_from_a_dead_run_is_replaced_not_mixed(tmp_path):
    save(tmp_path, 100)
    stale = tmp_path / "step-000000200"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half a file")
    (stale / "leftover.tmp").write_bytes(b"x")
    save(tmp_path, 200)
    assert sorted(p.name for p in stale.iterdir()) == ["backbone.pt", "meta.json", "state.pt"]
    assert load_checkpoint(str(stale), STORAGE)["images_seen"] == 320 * 200


def test_tampered_latest_json_is_rejected(tmp_path):
    save(tmp_path, 100)
    latest = tmp_path / "latest.json"
    record = json.loads(latest.read_text())
    latest.write_text(json.dumps({**record, "state": "../../elsewhere/state.pt"}))
    with pytest.raises(ValueError, match="state must be"):
        load_checkpoint(str(tmp_path), STORAGE)
    latest.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_latest(str(tmp_path), STORAGE)
    # A damaged latest.json does not block saving; the next save replaces it.
    save(tmp_path, 200)
    assert read_latest(str(tmp_path), STORAGE)["step"] == 200


def test_only_ascii_step_folders_are_checkpoints(tmp_path):
    """`\\d` took Arabic-Indic digits for a step: a folder so named hid the real step 10, and
    retention deleted it instead of a checkpoint."""
    save(tmp_path, 10)
    (tmp_path / "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661\u0660").mkdir()
    (tmp_path / "step-000000020\n").mkdir()
    assert sorted(checkpoint.list_step_dirs(str(tmp_path), STORAGE)) == [10]


def test_retention_keeps_newest_and_milestones(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for step in range(100, 1001, 100):
        info = save(tmp_path, step, keep_last=2, milestone_steps=300)
        # A partial folder older than the latest, as a killed save leaves it.
        if step == 400:
            (tmp_path / "step-000000450").mkdir()
            (tmp_path / "step-000000450" / "state.pt").write_bytes(b"partial")
    assert info.deleted == (str(tmp_path / "step-000000800"),)
    # Milestones: first checkpoint in [300, 600), [600, 900), [900, 1200); plus the newest two.
    assert sorted(list_step_dirs(str(tmp_path), STORAGE)) == [300, 600, 900, 1000]
    assert (tmp_path / "notes.txt").exists()

    # A folder newer than latest.json (a save that died) is left for a later save to replace.
    (tmp_path / "step-000002000").mkdir()
    assert prune_checkpoints(str(tmp_path), STORAGE, keep_last=1, milestone_steps=0) == [
        str(tmp_path / f"step-000000{s}") for s in (300, 600, 900)]
    assert sorted(list_step_dirs(str(tmp_path), STORAGE)) == [1000, 2000]
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 1000


def test_retention_removes_stale_temporaries_of_killed_latest_writes(tmp_path):
    save(tmp_path, 100, keep_last=1)
    stale = tmp_path / ".latest.json.tmp-0123abcd"
    fresh = tmp_path / ".latest.json.tmp-4567ef01"
    for leftover in (stale, fresh):
        leftover.write_bytes(b'{"step": ')
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    info = save(tmp_path, 200, keep_last=1)
    # A fresh one may belong to a writer that is about to rename it.
    assert str(stale) in info.deleted and not stale.exists() and fresh.exists()
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 200


def test_retention_deletion_failures_are_logged_not_raised(tmp_path, monkeypatch, caplog):
    for step in (100, 200):
        save(tmp_path, step, keep_last=1)

    def broken_rm(url, cfg):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(checkpoint.storage, "rm", broken_rm)
    info = save(tmp_path, 300, keep_last=1)
    assert info.deleted == ()
    assert read_latest(str(tmp_path), STORAGE)["step"] == 300
    assert "could not delete" in caplog.text


def test_retained_steps_are_stable_for_irregular_steps():
    # Time-triggered saves land on arbitrary steps; milestones are the first save per interval.
    steps = [130, 270, 410, 555, 690, 820, 1015]
    keep = retained_steps(steps, latest_step=1015, keep_last=2, milestone_steps=500)
    assert keep == {555, 820, 1015}
    # After a restart the already deleted steps are gone; the same milestones survive.
    assert retained_steps([555, 820, 1015, 1200], 1200, keep_last=2, milestone_steps=500) == {555, 1015, 1200}
    assert CheckpointConfig(every_steps=1000, milestone_every=10).milestone_steps == 10_000
    assert CheckpointConfig(every_steps=0, milestone_every=10).milestone_steps == 0


def test_policy():
    policy = CheckpointPolicy(every_steps=100, every_seconds=60.0)
    assert not policy.due(1, now=1_000.0)
    assert not policy.due(99, now=1_059.0)
    assert policy.due(100, now=1_010.0)
    policy.mark(100, now=1_010.0)
    assert not policy.due(100, now=2_000.0)  # never twice for the same step
    assert not policy.due(150, now=1_069.0)
    assert policy.due(150, now=1_070.0)
    policy.mark(150, now=1_070.0)
    # Step trigger stays aligned to multiples of every_steps after a time-triggered save.
    assert policy.due(200, now=1_071.0)

    time_only = CheckpointPolicy(every_steps=0, every_seconds=10.0, last_step=500)
    assert not time_only.due(501, now=5.0)
    assert not time_only.due(502, now=14.0)
    assert time_only.due(503, now=15.0)
    never = CheckpointPolicy(every_steps=0, every_seconds=0.0)
    assert not never.due(10**6, now=1e9)


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from stream_swav.config import StorageConfig
    from stream_swav import checkpoint

    real = checkpoint.storage.write_bytes_atomic

    def slow(url, data, cfg):
        if url.endswith("backbone.pt"):
            # Stand-in for a slow network write: part of the file is out, then the process dies.
            with open(url + ".partial", "wb") as f:
                f.write(data[: len(data) // 2])
            print("writing backbone", flush=True)
            time.sleep(600)
        real(url, data, cfg)

    checkpoint.storage.write_bytes_atomic = slow
    state = {"model": {"w": torch.randn(4_000_000)}, "images_seen": 2}
    checkpoint.save_checkpoint(sys.argv[1], 200, 2, state, {"w": torch.randn(4_000_000)},
                               {"arch": "resnet18", "small_stem": False}, StorageConfig())
""")


@pytest.mark.timeout(120)
def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    save(tmp_path, 100)
    before = (tmp_path / "latest.json").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing backbone", proc.stderr.read() if not line else line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    partial = tmp_path / "step-000000200"
    assert (partial / "state.pt").stat().st_size > 16_000_000
    assert not (partial / "meta.json").exists()
    assert (tmp_path / "latest.json").read_bytes() == before
    assert read_latest(str(tmp_path), STORAGE)["step"] == 100
    resumed = load_checkpoint(str(tmp_path), STORAGE)
    assert resumed["images_seen"] == 320 * 100
    assert load_backbone_state(str(tmp_path), STORAGE).keys() == {"fc.weight", "fc.bias"}

    # The restarted run reaches step 200 again: the dead run's folder is replaced, not mixed.
    save(tmp_path, 200)
    assert sorted(p.name for p in partial.iterdir()) == ["backbone.pt", "meta.json", "state.pt"]
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == 320 * 200


def test_s3_round_trip_retention_and_failed_write(s3_bucket, monkeypatch):
    cfg = s3_bucket.storage
    root = s3_bucket.url("runs/ckpt")
    for step in (100, 200, 300):
        state, backbone = tiny_state(step)
        info = save_checkpoint(root, step, step * 64, state, backbone, INFO, cfg, keep_last=2)
    assert info.state_url == f"{root}/step-000000300/state.pt"
    assert info.deleted == (f"{root}/step-000000100",)
    assert sorted(list_step_dirs(root, cfg)) == [200, 300]

    latest = read_latest(root, cfg)
    assert latest["step"] == 300 and latest["backbone_url"] == f"{root}/step-000000300/backbone.pt"
    loaded = load_checkpoint(root, cfg)
    assert torch.equal(loaded["queue"], state["queue"])
    assert torch.equal(load_backbone_state(f"{root}/step-000000200", cfg)["fc.bias"], tiny_state(200)[1]["fc.bias"])

    real = checkpoint.storage.write_bytes_atomic

    def failing(url, data, storage_cfg):
        if url.endswith("meta.json"):
            raise OSError("connection reset")
        real(url, data, storage_cfg)

    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", failing)
    with pytest.raises(OSError, match="connection reset"):
        save_checkpoint(root, 400, 0, *tiny_state(400), INFO, cfg)
    assert read_latest(root, cfg)["step"] == 300
    assert load_checkpoint(root, cfg)["images_seen"] == 320 * 300


def test_s3_retention_tells_complete_folders_from_one_listing_and_caches_no_listing(s3_bucket):
    """Milestones are kept for good, so retention must not look each folder up on every save (a
    request per milestone, while the learners wait): one recursive listing tells the complete
    folders (meta.json) from a killed save's partial one; and no listing is cached, where s3fs's
    cache kept an entry per folder ever listed."""
    cfg = s3_bucket.storage
    root = s3_bucket.url("runs/milestones")
    for step in range(100, 701, 100):
        save_checkpoint(root, step, step * 64, *tiny_state(step), INFO, cfg, keep_last=1, milestone_steps=300)
        if step == 300:  # a save killed after its state.pt: older than latest.json, not complete
            storage.write_bytes_atomic(f"{root}/step-000000350/state.pt", b"partial", cfg)
    # Milestones: the first complete checkpoint of [300, 600) and [600, 900); the newest; the partial one goes.
    assert sorted(list_step_dirs(root, cfg)) == [300, 600, 700]
    fs, _ = storage.filesystem_for(root, cfg)
    assert not list(fs.dircache)
    assert storage.find(root, cfg) == ["latest.json", *(f"step-000000{s}/{name}" for s in (300, 600, 700)
                                                        for name in ("backbone.pt", "meta.json", "state.pt"))]


def test_retention_aborts_the_unfinished_uploads_of_killed_s3_writes(s3_bucket):
    """A state.pt of 100 MiB or more goes up as a multipart upload; a writer killed before completing
    it leaves parts S3 bills and never lists. Retention aborts those under the checkpoint folder once
    they are old, and only those."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_bucket.endpoint, region_name="us-east-1")
    root = s3_bucket.url("runs/ckpt")

    def unfinished(key: str) -> str:
        upload = client.create_multipart_upload(Bucket=s3_bucket.name, Key=key)["UploadId"]
        client.upload_part(Bucket=s3_bucket.name, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1024)
        return upload

    def pending() -> set[str]:
        return {u["Key"] for u in client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])}

    killed = unfinished("runs/ckpt/step-000000400/state.pt")
    unfinished("runs/ckpt-other/step-000000400/state.pt")  # beside the folder, not in it
    unfinished("elsewhere/big.bin")
    # moto says every upload began on 2010-11-10, so "young" here means younger than 20 years: kept.
    assert checkpoint.storage.remove_stale_temporaries(root, s3_bucket.storage, 600.0, 20 * 365 * 86400.0) == []
    assert len(pending()) == 3

    info = save_checkpoint(root, 100, 6_400, *tiny_state(100), INFO, s3_bucket.storage)
    assert info.deleted == (f"{root}/step-000000400/state.pt (unfinished upload {killed})",)
    assert pending() == {"runs/ckpt-other/step-000000400/state.pt", "elsewhere/big.bin"}
    assert load_checkpoint(root, s3_bucket.storage)["images_seen"] == 320 * 100


def resumable_state(step: int) -> dict:
    from stream_swav.data.cursor import StreamCursor

    cursor = StreamCursor(0)
    cursor.add_shards(["a.tar", "b.tar"])
    state, _ = tiny_state(step)
    state["stream_cursor"] = cursor.state_dict()
    state["model"] = {"w": torch.ones(3)}
    return state


def test_resume_names_a_failure_without_a_message_and_does_not_skip_past_a_store_that_did_not_answer(
        tmp_path, monkeypatch):
    """A checkpoint whose read fails with an error without a message (a bare OSError) is skipped and
    named by the error's type, where taking the message's first line had crashed the resume with an
    IndexError. A read that timed out, or that S3 throttled, says nothing of the checkpoint: it is
    raised (the driver tries again), not taken for damage, which had fallen back to an older
    checkpoint and pointed latest.json at it."""
    for step in (100, 200):
        save(tmp_path, step, keep_last=2)
    real = checkpoint.storage.read_bytes
    failure: list[BaseException] = []

    def failing(url, cfg):
        if "step-000000200" in url and url.endswith("state.pt"):
            raise failure[0]
        return real(url, cfg)

    monkeypatch.setattr(checkpoint.storage, "read_bytes", failing)
    for unavailable in (TimeoutError(), OSError(errno.EBUSY, "Please reduce your request rate")):
        failure[:] = [unavailable]
        with pytest.raises(type(unavailable)):
            checkpoint.load_for_resume(str(tmp_path), STORAGE)
        assert read_latest(str(tmp_path), STORAGE)["step"] == 200
    failure[:] = [OSError()]
    point = checkpoint.load_for_resume(str(tmp_path), STORAGE)
    assert point.step == 100
    assert point.skipped == [(str(tmp_path / "step-000000200"), "OSError")]


def test_resume_skips_states_the_driver_cannot_resume_from_and_checkpoints_the_learners_refused(tmp_path):
    """A state without a stream cursor, with one that does not parse, or with weights that are not
    finite loads as a file but cannot be resumed from: skipped like a damaged one, as is one the
    learners refused before (`rejected`), and all of them named when none is left."""
    from stream_swav.runtime.driver import check_resume_state

    _, backbone = tiny_state(0)
    for step, spoil in ((5, None), (10, "no cursor"), (20, "bad cursor"), (30, "nan")):
        state = resumable_state(step)
        if spoil == "no cursor":
            del state["stream_cursor"]
        elif spoil == "bad cursor":
            state["stream_cursor"]["shards"] = b"not zlib"
        elif spoil == "nan":
            state["model"]["w"][1] = float("nan")
        save_checkpoint(str(tmp_path), step, step * 64, state, backbone, INFO, STORAGE, keep_last=4)
    point = checkpoint.load_for_resume(str(tmp_path), STORAGE, check=check_resume_state)
    assert point.step == 5
    reasons = dict(point.skipped)
    assert reasons[str(tmp_path / "step-000000030")] == "its model weight w is not finite"
    assert "malformed stream cursor state" in reasons[str(tmp_path / "step-000000020")]
    assert reasons[str(tmp_path / "step-000000010")] == "its state has no stream_cursor"
    # Without the driver's check the newest loads: the check is what skips them.
    assert checkpoint.load_for_resume(str(tmp_path), STORAGE).step == 30

    with pytest.raises(checkpoint.NoLoadableCheckpoint) as refused:
        checkpoint.load_for_resume(str(tmp_path), STORAGE, check=check_resume_state,
                                   rejected={point.url: "the learners refuse it: model.w: expected shape (4,)"})
    message = str(refused.value)
    assert "\n" not in message and message.count("step-0000000") == 4
    assert "the learners refuse it: model.w" in message and "resume with the configuration" in message


def test_a_resume_that_skipped_newer_checkpoints_points_latest_at_the_one_restored(tmp_path):
    """Otherwise readers of latest.json keep following one that does not load, and the run's save
    of that step is refused (a save never replaces the step latest.json names)."""
    from stream_swav.runtime.driver import check_resume_state

    _, backbone = tiny_state(0)
    for step in (2, 4):
        save_checkpoint(str(tmp_path), step, step * 64, resumable_state(step), backbone, INFO, STORAGE)
    (tmp_path / "step-000000004" / "state.pt").write_bytes(b"cut short")
    point = checkpoint.load_for_resume(str(tmp_path), STORAGE, check=check_resume_state)
    assert point.step == 2 and read_latest(str(tmp_path), STORAGE)["step"] == 4
    checkpoint.repoint_latest(str(tmp_path), point, STORAGE)
    assert read_latest(str(tmp_path), STORAGE) == json.loads((tmp_path / "step-000000002" / "meta.json").read_text())
    save_checkpoint(str(tmp_path), 4, 256, resumable_state(4), backbone, INFO, STORAGE)
    assert load_checkpoint(str(tmp_path), STORAGE)["images_seen"] == resumable_state(4)["images_seen"]


def test_a_checkpoint_file_with_compressed_entries_is_refused_before_it_inflates(tmp_path):
    """torch.load inflates deflated zip entries (weights_only or not), so a small hand-made file
    could load as a huge tensor; torch.save never compresses, so such a file is not ours."""
    import zipfile

    save(tmp_path, 10)
    state = tmp_path / "step-000000010" / "state.pt"
    stored = zipfile.ZipFile(state)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in stored.infolist():
            out.writestr(info.filename, stored.read(info))
    assert torch.load(packed, weights_only=True)["images_seen"] == tiny_state(10)[0]["images_seen"]  # torch takes it
    packed.replace(state)
    with pytest.raises(ValueError, match="is compressed, which torch.save never does"):
        load_checkpoint(str(tmp_path), STORAGE)


def test_a_file_torch_cannot_load_is_named_in_one_line(tmp_path):
    """torch's message runs to several lines, the later ones advising weights_only=False."""
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="random.pt: not a loadable checkpoint file") as refused:
        load_checkpoint(str(tmp_path / "random.pt"), STORAGE)
    assert "\n" not in str(refused.value) and "weights_only=False" not in str(refused.value)
