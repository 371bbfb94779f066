import json
import subprocess

from stream_swav import checkpoint
from stream_swav.provenance import code_provenance, package_version, provenance_of
from test_checkpoint import save


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_a_checkout_gives_its_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert provenance_of(repo) == {"version": package_version(), "revision": head, "modified": False}
    (repo / "untracked.txt").write_text("not code\n")
    assert provenance_of(repo)["modified"] is False
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert provenance_of(repo) == {"version": package_version(), "revision": head, "modified": True}
    # A folder inside some other checkout (a wheel unpacked in a repository) is not that commit.
    assert provenance_of(repo / "pkg") == {"version": package_version(), "revision": None, "modified": None}
    assert provenance_of(tmp_path) == {"version": package_version(), "revision": None, "modified": None}


def test_every_checkpoint_records_the_code_that_wrote_it(tmp_path):
    save(tmp_path, 10)
    record = json.loads((tmp_path / "latest.json").read_text())
    assert record["code"] == code_provenance() and record["code"]["version"] == package_version()
    assert checkpoint.read_latest(str(tmp_path), checkpoint.StorageConfig())["code"] == record["code"]
