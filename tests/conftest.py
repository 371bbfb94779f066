"""Shared fixtures: a real S3 server (moto) on 127.0.0.1 and real tar shards of real image bytes."""
from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from PIL import Image

from stream_swav import storage
from stream_swav.config import StorageConfig

# A Ray started by a test (in this process, a `Cluster`'s raylets, a driver subprocess) starts no idle
# workers ahead of demand: a test starts its actors and tasks when it needs them either way, and those
# prestarted workers cost each Ray ~0.8 CPU-s at its start (measured on 2 cores: 3.2 against 4.0 CPU-s
# in a local Ray's first 8 s), some 30 Rays a suite on a CPU-bound box.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

FAKE_KEY_ID = "testing-key-id"
FAKE_SECRET = "testing-secret-key"

# (member key, {extension: bytes}) — one WebDataset sample.
ShardSample = tuple[str, dict[str, bytes]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server for the whole session; its objects live in this process's memory."""
    # Werkzeug logs every request at INFO; keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = start_moto(free_port())
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3Bucket:
    endpoint: str
    name: str
    # Storage options naming the endpoint explicitly (the environment names it too).
    storage: StorageConfig

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"


def use_fake_credentials(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # Keep botocore away from real config files and instance metadata.
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh, empty bucket on the session's moto server, with fake credentials in the environment.

    AWS_ENDPOINT_URL points at moto, so default StorageConfig() reaches it too.
    """
    use_fake_credentials(monkeypatch, moto_endpoint)
    cfg = StorageConfig(endpoint_url=moto_endpoint, retries=1, connect_timeout_s=2.0, read_timeout_s=5.0)
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem_for(f"s3://{name}", cfg)
    fs.mkdir(name)
    yield S3Bucket(endpoint=moto_endpoint, name=name, storage=cfg)


def image_bytes(colour: tuple[int, int, int], fmt: str = "JPEG", size: tuple[int, int] = (40, 32)) -> bytes:
    """A flat-colour image encoded as `fmt`; the colour tells which sample a crop came from."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def tar_bytes(samples: list[ShardSample]) -> bytes:
    """A tar archive holding each sample's members as ``<key>.<ext>``, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def colour_of(index: int) -> tuple[int, int, int]:
    """Distinct, JPEG-robust colours: 6 levels per channel, far apart."""
    return (index % 6 * 51, index // 6 % 6 * 51, index // 36 % 6 * 51)


def colour_samples(count: int, prefix: str = "img", start: int = 0, label: bool = True) -> list[ShardSample]:
    """`count` samples ``<prefix>-<n>`` with a flat-colour JPEG (PNG for odd n) and a .cls of n."""
    samples = []
    for n in range(start, start + count):
        fmt, ext = ("PNG", "png") if n % 2 else ("JPEG", "jpg")
        members = {ext: image_bytes(colour_of(n), fmt)}
        if label:
            members["cls"] = str(n).encode()
        samples.append((f"{prefix}-{n:05d}", members))
    return samples


@pytest.fixture
def make_shard() -> Callable[..., str]:
    """``make_shard(path_or_url, samples, storage_cfg=None) -> url``: write a real tar shard there."""

    def write(path_or_url: str, samples: list[ShardSample], storage_cfg: StorageConfig | None = None) -> str:
        storage.write_bytes_atomic(str(path_or_url), tar_bytes(samples), storage_cfg or StorageConfig())
        return str(path_or_url)

    return write
