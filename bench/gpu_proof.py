"""The Python half of bench/gpu_proof.sh: packing and unpacking what travels to the GPU machine,
data for the end-to-end step, the incremental summary, metric scraping and each step's figures.

The shell script orchestrates; everything that parses, computes or writes JSON lives here, so a
step that fails or times out still leaves a readable summary. Standard library only, except
`jpeg-shards` (numpy, Pillow and this repository's shard writer).

    python bench/gpu_proof.py pack --out .gpuproof          # here, before a GPU session
    python3 bench/gpu_proof.py unpack --bundle .gpuproof ... # on the GPU machine (called by the script)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import importlib.util
import json
import lzma
import math
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Steps in the order the summary lists them: setup, background data, then the four measurements.
STEPS = ("setup", "demo-shards", "e2e-shards", "learner", "families", "e2e", "demo", "tests")
OUT_FILE_LIMIT = 8
OUT_FILE_BYTES = 16 * 2**20
TRAVEL_LIMIT = 64 * 2**20

# ---------------------------------------------------------------------------------------------- pack

# What the GPU machine lacks and the proof needs (ray for the runtime; webdataset and braceexpand
# for the shard sources; botocore for storage.py's error types; s3fs and its stack for s3:// URLs).
REQUIRED_DISTS = ("ray", "webdataset", "braceexpand", "s3fs", "aiobotocore", "botocore", "jmespath", "aioitertools")
# Dependencies of those that a Python machine with torch, pytest and aiohttp usually has already.
# They travel too but are unpacked only where `import` cannot find them, so they never shadow
# the machine's own copies. Distribution -> the import names that show it is present.
FALLBACK_DISTS = {
    "click": ("click",), "filelock": ("filelock",), "packaging": ("packaging",), "protobuf": ("google.protobuf",),
    "requests": ("requests",), "idna": ("idna",), "certifi": ("certifi",),
    "charset-normalizer": ("charset_normalizer",), "jsonschema": ("jsonschema",),
    "jsonschema-specifications": ("jsonschema_specifications",), "referencing": ("referencing",),
    "rpds-py": ("rpds",),
}
# Ray parts a local, headless run never imports: Java jars, the dashboard's web client and the
# libraries on top of core Ray (the driver starts Ray with include_dashboard=False).
RAY_DROP = ("jars", "dashboard/client", "rllib", "serve", "llm", "tune", "train", "data", "air")
# botocore/data holds a model for every AWS service (~29 MB); storage needs S3 (STS for role credentials).
BOTOCORE_SERVICES = ("s3", "sts")
RAY_BINARIES = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64", "any")
FMNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def pinned(dist: str) -> str:
    """`dist==version` of the copy installed here (the one the tests pass with), else plain `dist`."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return dist


def check_packing_interpreter() -> None:
    """The bundle takes its versions from this interpreter, so it must be the project's environment:
    an interpreter without ray would pin nothing, and a stray botocore would not match aiobotocore."""
    missing = []
    for dist in REQUIRED_DISTS:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        raise SystemExit(f"pack: {sys.executable} lacks {', '.join(missing)}; run the pack with the project's "
                         f"virtualenv (GPU_PROOF_PYTHON=.venv/bin/python bash bench/gpu_proof.sh --pack), whose "
                         f"versions the tests pass with")


def download_wheels(dists: list[str], dest: Path, python_version: str) -> list[Path]:
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest),
               *[pinned(d) for d in dists]]
    print(f"pip download (versions of {sys.executable}):", " ".join(pinned(d) for d in dists), flush=True)
    subprocess.run(command, check=True)
    return sorted(dest.glob("*.whl"))


def wheel_dist(path: Path) -> str:
    """Distribution name of a wheel file, normalised as in FALLBACK_DISTS (dashes, lower case)."""
    return path.name.split("-")[0].replace("_", "-").lower()


def extract_wheel(path: Path, dest: Path) -> None:
    """Unzip a wheel keeping the file modes it records (raylet and gcs_server must stay executable)."""
    with zipfile.ZipFile(path) as wheel:
        for info in wheel.infolist():
            target = Path(wheel.extract(info, dest))
            mode = (info.external_attr >> 16) & 0o777
            if mode and target.is_file():
                target.chmod(mode | 0o600)


def trim_site(site: Path) -> None:
    for part in RAY_DROP:
        shutil.rmtree(site / "ray" / part, ignore_errors=True)
    data = site / "botocore" / "data"
    if data.is_dir():
        for entry in data.iterdir():
            if entry.is_dir() and entry.name not in BOTOCORE_SERVICES:
                shutil.rmtree(entry)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    strip = shutil.which("strip")
    for name in RAY_BINARIES:
        binary = site / name
        if binary.is_file():
            if strip:
                # Debug symbols are most of these files and nothing here reads them.
                subprocess.run([strip, "--strip-unneeded", str(binary)], check=False)
            if not name.endswith(".so"):
                binary.chmod(0o755)


def write_tar_xz(source: Path, dest: Path) -> int:
    """source/* as dest (tar, xz -9e), members in sorted order; returns the size in bytes."""
    with tarfile.open(dest, "w:xz", preset=XZ_PRESET) as tar:
        for entry in sorted(source.iterdir()):
            tar.add(entry, arcname=entry.name)
    return dest.stat().st_size


def compress_idx(source: Path, dest: Path) -> int:
    """A Fashion-MNIST IDX file (gzipped or plain) recompressed with xz -9e."""
    import gzip

    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rb") as f:
        data = f.read()
    dest.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, preset=XZ_PRESET))
    return dest.stat().st_size


def find_fmnist_source(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("STREAM_SWAV_FMNIST"):
        candidates.append(Path(os.environ["STREAM_SWAV_FMNIST"]))
    candidates += [REPO.parent / "shared" / "data" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    for folder in candidates:
        if all(any((folder / f"{stem}{ext}").is_file() for ext in (".gz", "")) for stem in FMNIST_STEMS):
            return folder
    raise SystemExit(f"pack: no Fashion-MNIST IDX files in {', '.join(map(str, candidates))}")


def idx_file(folder: Path, stem: str) -> Path:
    return folder / f"{stem}.gz" if (folder / f"{stem}.gz").is_file() else folder / stem


def git_files(*args: str) -> list[Path]:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", *args], check=True,
                            capture_output=True).stdout.decode().split("\0")
    return [REPO / name for name in listed if name]


def git_commit() -> str:
    """HEAD, with "+changes" when the working tree differs from it; "" without git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+changes" if dirty else "")


def travelling_size(carried: list[Path]) -> dict[str, Any]:
    """What a device run copies: tracked files, untracked files git does not ignore, and the
    carried (ignored) folders."""
    def size_of(paths: list[Path]) -> int:
        return sum(p.lstat().st_size for p in paths if p.is_file() or p.is_symlink())

    tracked = git_files()
    untracked = git_files("--others", "--exclude-standard")
    groups = {"tracked files": (len(tracked), size_of(tracked)),
              "untracked, not ignored": (len(untracked), size_of(untracked))}
    for folder in carried:
        files = [p for p in folder.rglob("*") if p.is_file()]
        groups[f"carried {folder.name}/"] = (len(files), size_of(files))
    total = sum(size for _, size in groups.values())
    return {"groups": groups, "total": total, "limit": TRAVEL_LIMIT}


def print_size_report(report: dict[str, Any], carried: Path) -> None:
    print("\nWhat travels with `run` (carry: [\".gpuproof\"]):")
    for name, (count, size) in report["groups"].items():
        print(f"  {name:<26} {count:>6} files {size / 2**20:>8.2f} MiB")
    for path in sorted(carried.rglob("*")):
        if path.is_file():
            print(f"    {path.relative_to(REPO)}  {path.stat().st_size / 2**20:.2f} MiB")
    total, limit = report["total"], report["limit"]
    print(f"  {'total':<26} {'':>12} {total / 2**20:>8.2f} MiB of {limit / 2**20:.0f} MiB "
          f"({limit - total:+,} bytes left)")


def cmd_pack(args: argparse.Namespace) -> int:
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    check_packing_interpreter()
    fmnist = find_fmnist_source(args.fmnist)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpuproof-pack-") as tmp:
        work = Path(tmp)
        wheels = download_wheels(list(REQUIRED_DISTS) + list(FALLBACK_DISTS), work / "wheels", args.python_version)
        site, fallback = work / "site", work / "fallback"
        versions = {}
        for wheel in wheels:
            dist = wheel_dist(wheel)
            versions[dist] = wheel.name.split("-")[1]
            extract_wheel(wheel, fallback / dist if dist in FALLBACK_DISTS else site)
        missing = [d for d in list(REQUIRED_DISTS) + list(FALLBACK_DISTS) if d not in versions]
        if missing:
            raise SystemExit(f"pack: no wheel downloaded for {', '.join(missing)}")
        trim_site(site)
        staging = work / "bundle"
        (staging / "fmnist").mkdir(parents=True)
        # The two big archives and the four IDX files compress in parallel: xz -9e is single-threaded.
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            jobs = {"site.tar.xz": pool.submit(write_tar_xz, site, staging / "site.tar.xz"),
                    "fallback.tar.xz": pool.submit(write_tar_xz, fallback, staging / "fallback.tar.xz")}
            for stem in FMNIST_STEMS:
                jobs[f"fmnist/{stem}.xz"] = pool.submit(compress_idx, idx_file(fmnist, stem),
                                                        staging / "fmnist" / f"{stem}.xz")
            sizes = {name: job.result() for name, job in jobs.items()}
        manifest = {
            "made": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            # The copy on the GPU machine may come without .git: this names the code it was packed with.
            "commit": git_commit(),
            "python_version": args.python_version, "platforms": list(WHEEL_PLATFORMS),
            "required": {d: versions[d] for d in REQUIRED_DISTS},
            "fallback": {d: {"version": versions[d], "imports": list(FALLBACK_DISTS[d])} for d in FALLBACK_DISTS},
            "ray_dropped": list(RAY_DROP), "botocore_services": list(BOTOCORE_SERVICES),
            "fmnist_source": str(fmnist), "sizes": sizes,
        }
        (staging / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), str(out))
    print(f"packed {out} in {time.monotonic() - started:.0f} s")
    for name, size in sizes.items():
        print(f"  {name:<36} {size / 2**20:8.2f} MiB")
    report = travelling_size([out])
    print_size_report(report, out)
    if report["total"] > TRAVEL_LIMIT:
        print(f"\nERROR: the travelling tree is {report['total'] / 2**20:.2f} MiB, over the "
              f"{TRAVEL_LIMIT / 2**20:.0f} MiB a device run carries. Trim the bundle or remove untracked files.",
              file=sys.stderr)
        return 1
    return 0


def cmd_size(args: argparse.Namespace) -> int:
    carried = [REPO / c for c in args.carried]
    report = travelling_size([c for c in carried if c.is_dir()])
    print_size_report(report, carried[0] if carried else REPO / ".gpuproof")
    return 1 if report["total"] > TRAVEL_LIMIT else 0


# -------------------------------------------------------------------------------------------- unpack

def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def decompress_to(source: Path, dest: Path) -> int:
    with lzma.open(source) as f_in, open(dest, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 22)
    return dest.stat().st_size


def extract_all(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)


def cmd_unpack(args: argparse.Namespace) -> int:
    """On the GPU machine: the bundle into --site, fallbacks only where missing, Fashion-MNIST as
    plain IDX files into --fmnist; then check that everything imports with the new path."""
    bundle, site, fmnist = Path(args.bundle), Path(args.site), Path(args.fmnist)
    started = time.monotonic()
    manifest = json.loads((bundle / "pack.json").read_text())
    # A second run on a warm machine starts from an empty folder: fallbacks are moved, not merged.
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    fmnist.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        # lzma releases the GIL while it decompresses, so threads are enough.
        idx_jobs = [pool.submit(decompress_to, bundle / "fmnist" / f"{stem}.xz", fmnist / stem)
                    for stem in FMNIST_STEMS]
        site_job = pool.submit(extract_all, bundle / "site.tar.xz", site)
        with tempfile.TemporaryDirectory(prefix="gpuproof-fallback-") as tmp:
            extract_all(bundle / "fallback.tar.xz", Path(tmp))
            used = []
            for dist, info in manifest["fallback"].items():
                if all(importable(name) for name in info["imports"]):
                    continue
                used.append(dist)
                for entry in (Path(tmp) / dist).iterdir():
                    shutil.move(str(entry), str(site / entry.name))
        site_job.result()
        idx_bytes = sum(job.result() for job in idx_jobs)
    print(f"unpacked {bundle} into {site} and {idx_bytes / 2**20:.1f} MiB of Fashion-MNIST into {fmnist} "
          f"in {time.monotonic() - started:.1f} s; fallbacks unpacked because missing here: "
          f"{', '.join(used) or 'none'}", flush=True)
    figures = {"required": manifest["required"], "fallbacks_used": used,
               "unpack_seconds": round(time.monotonic() - started, 1)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    check = subprocess.run([sys.executable, "-c", IMPORT_CHECK], env=env, capture_output=True, text=True)
    print(check.stdout + check.stderr, end="", flush=True)
    if args.json:
        figures["imports"] = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else {}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return check.returncode


IMPORT_CHECK = """
import importlib, json, sys
import braceexpand, botocore, ray, s3fs, webdataset
import stream_swav.runtime.driver, stream_swav.apps.demo, stream_swav.apps.follow
names = ("ray", "s3fs", "botocore", "webdataset", "torch", "torchvision", "numpy", "PIL", "aiohttp", "fsspec")
print(json.dumps({n: getattr(importlib.import_module(n), "__version__", "?") for n in names}))
"""


def cmd_fmnist_subset(args: argparse.Namespace) -> int:
    """The first --train / --test images of Fashion-MNIST (found as the demo finds it) as plain IDX
    files in --fmnist: the dry run's stand-in for the unpacked copy, small enough for two cores.
    Without Fashion-MNIST it writes nothing and the demo uses its procedural images."""
    from stream_swav.apps import datasets as fashion_mnist

    folder = fashion_mnist.find_fashion_mnist()
    if folder is None:
        print("Fashion-MNIST not found: the demo and the e2e data use the procedural image set")
        return 0
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.train), ("test", args.test)):
        images, labels = fashion_mnist.load_split(folder, split)
        for stem, array in zip(fashion_mnist.SPLIT_FILES[split], (images[:count], labels[:count])):
            header = bytes([0, 0, fashion_mnist.IDX_UBYTE, array.ndim])
            header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (dest / stem).write_bytes(header + array.astype("uint8").tobytes())
    print(f"Fashion-MNIST subset from {folder}: {args.train} train and {args.test} test images in {dest}")
    return 0


def cmd_dry_setup(args: argparse.Namespace) -> int:
    """The dry run's setup: the Fashion-MNIST subset, then the same import check as on the GPU machine."""
    cmd_fmnist_subset(args)
    check = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True)
    print(check.stdout + check.stderr, end="", flush=True)
    if args.json and check.returncode == 0:
        Path(args.json).write_text(json.dumps({"imports": json.loads(check.stdout.strip().splitlines()[-1])}))
    return check.returncode


# ----------------------------------------------------------------------------------------- e2e data

_SPLIT: tuple[Any, Any] | None = None  # (images, labels), shared with forked workers


def _write_part(dest: str, indices: list[int], size: int, per_shard: int) -> dict[str, Any]:
    from stream_swav.apps.make_shards import array_samples, write_shards

    images, labels = _SPLIT
    samples = array_samples(images, labels, size=size, image_format="jpeg", indices=indices)
    return write_shards(samples, dest, per_shard, 1 << 40,
                        settings={"source": "gpu-proof", "size": size, "first": indices[0]}).to_dict()


def cmd_jpeg_shards(args: argparse.Namespace) -> int:
    """`--count` images upscaled to `--size` px JPEG (quality 90) in shards of `--per-shard`,
    written by `--workers` processes into dest/part-NN/ (the e2e step reads the whole folder)."""
    global _SPLIT
    import numpy as np

    from stream_swav.apps import datasets as fashion_mnist

    started = time.monotonic()
    folder = fashion_mnist.find_fashion_mnist()
    if folder is not None:
        images, labels = fashion_mnist.load_split(folder, "train")
        source = f"Fashion-MNIST train split ({folder})"
    else:
        images, labels = fashion_mnist.procedural_dataset(args.count, seed=0)
        source = "procedural 10-class shapes (Fashion-MNIST not found)"
    count = min(args.count, len(images))
    _SPLIT = (images, labels)
    parts = [chunk.tolist() for chunk in np.array_split(np.arange(count), args.workers) if len(chunk)]
    dest = Path(args.dest)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(parts), mp_context=context) as pool:
        summaries = list(pool.map(_write_part, [str(dest / f"part-{n:02d}") for n in range(len(parts))], parts,
                                  [args.size] * len(parts), [args.per_shard] * len(parts)))
    shards = sum(s["shards_written"] + s["shards_kept"] for s in summaries)
    total_bytes = sum(s["bytes"] for s in summaries)
    print(f"{count:,} images of {source} as {args.size} px JPEG in {shards} shards "
          f"({total_bytes / 1e6:.0f} MB, {total_bytes / max(count, 1) / 1e3:.1f} kB per sample) under {dest} "
          f"in {time.monotonic() - started:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"images": count, "source": source, "size": args.size,
                                               "shards": shards, "bytes": total_bytes}))
    return 0


# ------------------------------------------------------------------------------------------ summary

@contextlib.contextmanager
def locked(lock: Path) -> Iterator[None]:
    """Background steps update the summary while the foreground does: one writer at a time."""
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finite_json(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them (Python's NaN is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite_json(value), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def machine_info() -> dict[str, Any]:
    """What the figures depend on, without importing torch (this runs before every step)."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    for dist in ("torch", "torchvision", "numpy", "pillow", "ray"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(OSError):
        meminfo = Path("/proc/meminfo").read_text()
        info["memory_gib"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["cpu_model"] = model[1].strip() if model else "?"
    with contextlib.suppress(OSError):
        shm = os.statvfs("/dev/shm")
        # Ray's object store lives in /dev/shm when it is big enough, else in /tmp (slower).
        info["dev_shm_gib"] = round(shm.f_frsize * shm.f_blocks / 2**30, 1)
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True)
        info["gpus"] = [line.strip() for line in query.stdout.splitlines() if line.strip()]
    return info


def cmd_init(args: argparse.Namespace) -> int:
    pack = read_json(REPO / ".gpuproof" / "pack.json") if args.mode == "gpu" else None
    summary = {
        "mode": args.mode,
        "started": now_iso(),
        "budget_s": args.budget_s,
        "commit": git_commit() or "unknown (no git in this copy)",
        "pack": {k: pack.get(k) for k in ("made", "commit", "required")} if pack else None,
        "machine": machine_info(),
        "steps": {name: {"status": "pending"} for name in STEPS},
        "targets": {},
    }
    with locked(Path(args.lock)):
        write_json_atomic(Path(args.summary), summary)
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {}
    for key in ("status", "note", "command"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    for key in ("rc", "budget_s"):
        if getattr(args, key) is not None:
            fields[key] = int(getattr(args, key))
    if args.seconds is not None:
        fields["seconds"] = round(float(args.seconds), 1)
    if args.started is not None:
        fields["started_unix"] = float(args.started)
    figures = {}
    for path in args.figures or []:
        loaded = read_json(Path(path))
        if isinstance(loaded, dict):
            figures.update(loaded)
    with locked(Path(args.lock)):
        summary = read_json(Path(args.summary)) or {"steps": {}}
        step = summary["steps"].setdefault(args.name, {})
        step.update(fields)
        if figures:
            step.setdefault("figures", {}).update(figures)
        write_json_atomic(Path(args.summary), summary)
    return 0


def gpu_samples(path: Path) -> list[tuple[float, float, float]]:
    """(unix time, utilisation %, memory used MiB) rows of `nvidia-smi --query-gpu=timestamp,...`."""
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 3:
                continue
            try:
                stamp = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((stamp, float(parts[1]), float(parts[2])))
            except ValueError:
                continue
    return rows


def gpu_window(samples: list[tuple[float, float, float]], start: float, end: float) -> dict[str, Any] | None:
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None
    return {"gpu_util_mean_pct": round(statistics.fmean(s[1] for s in inside), 1),
            "gpu_memory_max_mib": max(s[2] for s in inside), "gpu_samples": len(inside)}


def cmd_finish(args: argparse.Namespace) -> int:
    out = Path(args.out)
    with locked(Path(args.lock)):
        summary = read_json(Path(args.summary)) or {"steps": {}}
        samples = gpu_samples(Path(args.gpu_csv)) if args.gpu_csv else []
        for step in summary["steps"].values():
            if samples and "started_unix" in step and "seconds" in step:
                window = gpu_window(samples, step["started_unix"], step["started_unix"] + step["seconds"])
                if window:
                    step["gpu"] = window
        summary["finished"] = now_iso()
        summary["wall_s"] = round(float(args.wall_s), 1)
        summary["targets"] = targets(summary)
        summary["failed_steps"] = [n for n, s in summary["steps"].items() if s.get("status") not in ("ok",)]
        files = sorted(p for p in out.rglob("*") if p.is_file())
        summary["files"] = sorted({str(p.relative_to(out)) for p in files} | {Path(args.summary).name})
        write_json_atomic(Path(args.summary), summary)
    print_verdicts(summary)
    return 0


def figure(summary: dict[str, Any], step: str, *keys: str) -> Any:
    value: Any = summary["steps"].get(step, {}).get("figures", {})
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The proof's three targets, each with the measured value and whether it was met (None: no figure).
    A dry run's figures come from tiny CPU settings: the verdicts say nothing there."""
    ratio = figure(summary, "learner", "ours_vs_classic", "256")
    knn = figure(summary, "demo", "knn_top1_last")
    best = figure(summary, "demo", "knn_top1_best")
    split = figure(summary, "demo", "eval_split")
    pixels = figure(summary, "demo", "pixels_knn_top1")
    wait, wait_source = figure(summary, "e2e", "input_wait_ratio_steady"), "steady window"
    if wait is None:
        wait, wait_source = figure(summary, "e2e", "input_wait_ratio_whole_run"), "whole run"

    def verdict(value: Any, ok: bool) -> bool | None:
        return None if value is None else bool(ok)

    return {
        "applies": summary.get("mode") == "gpu",
        "learner_ours_vs_classic_at_256": {"value": ratio, "target": ">= 2.0",
                                           "met": verdict(ratio, ratio is not None and ratio >= 2.0)},
        "demo_knn_top1": {"value": knn, "best": best, "split": split,
                          "pixels": pixels, "target": "> raw pixels (the same run's weighted kNN, full 60k/10k split)",
                          "met": verdict(knn, knn is not None and pixels is not None and knn > pixels
                                         and split == "60000/10000")},
        "e2e_input_wait": {"value": wait, "source": wait_source, "target": "< 0.05",
                           "met": verdict(wait, wait is not None and wait < 0.05)},
    }


def print_verdicts(summary: dict[str, Any]) -> None:
    print(f"\nGPU proof ({summary.get('mode')}): {summary.get('wall_s')} s of {summary.get('budget_s')} s budget")
    for name, step in summary["steps"].items():
        extra = f" rc {step['rc']}" if "rc" in step else ""
        note = f"  [{step['note']}]" if step.get("note") else ""
        print(f"  {name:<12} {step.get('status', '?'):<8} {step.get('seconds', 0):>6} s{extra}{note}")
    applies = summary["targets"].get("applies")
    for name, target in summary["targets"].items():
        if name == "applies":
            continue
        met = {True: "MET", False: "NOT MET", None: "no figure"}[target["met"]]
        print(f"  target {name}: {target['value']} (target {target['target']}): "
              f"{met if applies else met + ' (dry run: tiny CPU settings, not a verdict)'}")


# ------------------------------------------------------------------------------------------ figures

def cmd_tests_figures(args: argparse.Namespace) -> int:
    text = Path(args.pytest_output).read_text(errors="replace") if Path(args.pytest_output).exists() else ""
    counts: dict[str, int] = {}
    summary_lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    if summary_lines:
        for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                                       summary_lines[-1]):
            counts["errors" if word.startswith("error") else word] = int(number)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)))
    passed = sorted(set(re.findall(r"^PASSED (\S+)", text, flags=re.M)))
    skipped = sorted(set(re.findall(r"^SKIPPED \[\d+\] (\S+)", text, flags=re.M)))
    write_json_atomic(Path(args.json), {"counts": counts, "failed": failed, "passed": passed,
                                        "skipped_where": skipped})
    return 0


def cmd_learner_figures(args: argparse.Namespace) -> int:
    report = read_json(Path(args.learner_json)) or {}
    rows = report.get("results", [])
    by_batch: dict[str, dict[str, Any]] = {}
    for row in rows:
        path = "ours" if row["name"].startswith("ours") else "classic"
        by_batch.setdefault(str(row["batch"]), {})[path] = {
            k: row.get(k) for k in ("images_per_s", "step_ms", "peak_gib", "mfu", "warmup_s", "nonfinite_steps",
                                    "error") if row.get(k) not in (None, "")}
    ratios = {}
    for batch, paths in by_batch.items():
        ours, classic = paths.get("ours", {}).get("images_per_s"), paths.get("classic", {}).get("images_per_s")
        if ours and classic:
            ratios[batch] = round(ours / classic, 3)
    match = report.get("loss_match") or {}
    figures = {
        "environment": report.get("environment"),
        "batches": by_batch,
        "ours_vs_classic": ratios,
        "loss_match": {k: match.get(k) for k in ("batch", "losses", "ours_vs_classic", "ours_vs_fp32",
                                                 "classic_vs_fp32", "ours_precision", "classic_precision")}
        if match else None,
        "host_syncs_per_step": {path: len(where) for path, where in (report.get("syncs_per_step") or {}).items()},
        "host_sync_sites": report.get("syncs_per_step"),
        "flops_per_image": report.get("flops_per_image"),
    }
    write_json_atomic(Path(args.json), figures)
    return 0


def cmd_families_figures(args: argparse.Namespace) -> int:
    """Per backbone family (bench/learner.py --families): its recipe's network and our step's figures."""
    report = read_json(Path(args.families_json)) or {}
    flops = report.get("family_flops_per_image") or {}
    figures = {"environment": report.get("environment"), "families": {}}
    for row in report.get("families", []):
        family, _, recipe = row["name"].partition(": ")
        figures["families"][family] = {
            "recipe": recipe, "batch": row["batch"], "flops_per_image": flops.get(family),
            **{k: row.get(k) for k in ("images_per_s", "step_ms", "peak_gib", "mfu", "warmup_s", "nonfinite_steps",
                                       "error") if row.get(k) not in (None, "")}}
    write_json_atomic(Path(args.json), figures)
    return 0


METRIC_LINE = re.compile(r"^(stream_swav_[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """stream_swav_* samples of a Prometheus text page; labelled families are summed over labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line.strip())
        if match and not match[1].endswith("_created"):
            values[match[1]] = values.get(match[1], 0.0) + float(match[3])
    return values


def cmd_scrape(args: argparse.Namespace) -> int:
    """Scrape /metrics every --interval seconds, one JSON line per answered scrape, until
    --stop-file exists (one last scrape then) or --max-s have passed."""
    deadline = time.time() + args.max_s
    with open(args.out, "a") as out:
        while True:
            stopping = Path(args.stop_file).exists() or time.time() >= deadline
            try:
                with urllib.request.urlopen(args.url, timeout=2) as response:
                    values = parse_metrics(response.read().decode())
                out.write(json.dumps({"t": round(time.time(), 3), "values": values}) + "\n")
                out.flush()
            except OSError:
                pass
            if stopping:
                return 0
            time.sleep(args.interval)


def steps_of(scrape: dict[str, Any]) -> float:
    return scrape["values"].get("stream_swav_steps_total", 0.0)


def steady_window(scrapes: list[dict[str, Any]], skip_s: float) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """First and last scrapes of the steady part of a run: from `skip_s` after the first trained
    step was seen (cuDNN autotuning and the decoders' start behind us) to the first scrape that
    saw the final step (after it the driver only drains, checkpoints and stops)."""
    trained = [s for s in scrapes if steps_of(s) >= 1]
    if len(trained) < 2:
        return None
    end = next(s for s in trained if steps_of(s) == steps_of(trained[-1]))
    running = [s for s in trained if s["t"] <= end["t"]]
    window = [s for s in running if s["t"] >= trained[0]["t"] + skip_s]
    if len(window) < 2:
        # A short run (the dry run): its second half.
        window = running[len(running) // 2:]
    if len(window) < 2 or window[-1]["t"] <= window[0]["t"]:
        return None
    return window[0], window[-1]


def window_input_wait(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """The pacing learner's share of time waiting for batches between scrapes a and b, from the
    wait and busy counters the learners add to after every chunk (None when they did not move)."""
    wait, busy = (b["values"].get(name, 0.0) - a["values"].get(name, 0.0)
                  for name in ("stream_swav_input_wait_seconds_total", "stream_swav_learner_busy_seconds_total"))
    return round(wait / (wait + busy), 4) if wait + busy > 0 else None


def cmd_e2e_figures(args: argparse.Namespace) -> int:
    scrapes = []
    with contextlib.suppress(OSError):
        for line in Path(args.metrics).read_text().splitlines():
            with contextlib.suppress(ValueError):
                scrapes.append(json.loads(line))
    log = Path(args.log).read_text(errors="replace") if Path(args.log).exists() else ""
    figures: dict[str, Any] = {"scrapes": len(scrapes)}
    plan = re.findall(r"(\d+) learner\(s\) on ([^;]+); (\d+) decode actor\(s\)", log)
    if plan:
        figures.update(learners=int(plan[-1][0]), learner_device=plan[-1][1].strip(), decode_actors=int(plan[-1][2]))
    progress = re.findall(r"step (\d+) \| (\d+) images \| ([0-9.]+) img/s \| loss ([0-9.naN]+) .*?input-wait (\d+)%",
                          log)
    if progress:
        step, images, rate, loss, wait = progress[-1]
        figures["last_log_line"] = {"step": int(step), "images": int(images), "images_per_s": float(rate),
                                    "loss": float(loss), "input_wait_pct": int(wait)}
    if scrapes:
        last = scrapes[-1]["values"]
        figures.update(
            steps=int(last.get("stream_swav_steps_total", 0)),
            images_trained=int(last.get("stream_swav_images_trained_total", 0)),
            images_per_s_gauge=last.get("stream_swav_images_per_second"),
            input_wait_ratio_whole_run=window_input_wait({"values": {}}, scrapes[-1]),
            decode_errors=int(last.get("stream_swav_decode_errors_total", 0)),
            gpu_memory_reserved_gib=round(last.get("stream_swav_gpu_memory_reserved_bytes", 0) / 2**30, 2) or None,
        )
    window = steady_window(scrapes, args.skip_s)
    if window:
        a, b = window
        seconds = b["t"] - a["t"]
        images = b["values"]["stream_swav_images_trained_total"] - a["values"]["stream_swav_images_trained_total"]
        figures["steady"] = {"from_unix": a["t"], "to_unix": b["t"], "seconds": round(seconds, 1),
                             "steps": int(b["values"]["stream_swav_steps_total"] - a["values"]["stream_swav_steps_total"])}
        figures["images_per_s_steady"] = round(images / seconds, 1)
        figures["input_wait_ratio_steady"] = window_input_wait(a, b)
        in_flight = [s["values"].get("stream_swav_object_store_batches_in_flight") for s in scrapes
                     if a["t"] <= s["t"] <= b["t"]]
        in_flight = [v for v in in_flight if v is not None]
        if in_flight:
            figures["batches_in_flight_mean"] = round(statistics.fmean(in_flight), 1)
        samples = gpu_samples(Path(args.gpu_csv)) if args.gpu_csv else []
        gpu = gpu_window(samples, a["t"], b["t"])
        if gpu:
            figures["steady"].update(gpu)
    data = read_json(Path(args.data_json)) if args.data_json else None
    if data:
        figures["shards"] = data
    write_json_atomic(Path(args.json), figures)
    return 0


def cmd_demo_figures(args: argparse.Namespace) -> int:
    eval_dir = Path(args.eval_dir)
    rows = []
    with contextlib.suppress(OSError):
        for line in (eval_dir / "results.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    rows.sort(key=lambda r: r.get("step", 0))
    figures: dict[str, Any] = {"checkpoints_evaluated": len(rows), "minutes": args.minutes}
    if rows:
        last = rows[-1]
        best = max(rows, key=lambda r: r.get("knn_top1") or 0.0)
        figures.update(
            knn_top1_last=last.get("knn_top1"), knn_top1_best=best.get("knn_top1"),
            best_at_images=best.get("images_seen"), images_seen=last.get("images_seen"), steps=last.get("step"),
            pixels_knn_top1=last.get("pixels_knn_top1"), random_knn_top1=last.get("random_knn_top1"),
            random_bn_knn_top1=last.get("random_bn_knn_top1"), probe_top1_last=last.get("probe_top1"),
            pixels_probe_top1=last.get("pixels_probe_top1"), random_probe_top1=last.get("random_probe_top1"),
            eval_split=f"{last.get('train_count')}/{last.get('test_count')}",
            beats_random_init=bool((last.get("knn_top1") or 0) > (last.get("random_knn_top1") or 1)),
            beats_pixels=bool((last.get("knn_top1") or 0) > (last.get("pixels_knn_top1") or 1)),
        )
    summary = read_json(eval_dir / "summary.json")
    if summary:
        figures["dataset"] = summary.get("dataset")
    log = Path(args.log).read_text(errors="replace") if args.log and Path(args.log).exists() else ""
    rates = re.findall(r"\| ([0-9.]+) img/s \|", log)
    if rates:
        figures["train_images_per_s_last_log"] = float(rates[-1])
    write_json_atomic(Path(args.json), figures)
    return 0


# -------------------------------------------------------------------------------------------- misc

def cmd_free_port(args: argparse.Namespace) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        print(sock.getsockname()[1])
    return 0


def cmd_demo_minutes(args: argparse.Namespace) -> int:
    """Training minutes for the demo: `--max` when the time left allows it, less otherwise, never
    under `--min` (printed with one decimal, as `stream-swav demo --minutes` takes it)."""
    available = (args.deadline - time.time() - args.reserve_s) / 60.0
    print(f"{max(args.min, min(args.max, math.floor(available * 10) / 10)):.1f}")
    return 0


def cmd_check_out(args: argparse.Namespace) -> int:
    """Fail when $OUT breaks the device tool's limits (count, depth, size) and say which file."""
    out = Path(args.out)
    files = sorted(p for p in out.rglob("*") if p.is_file() or p.is_symlink())
    problems = []
    if len(files) > OUT_FILE_LIMIT:
        problems.append(f"{len(files)} files, the limit is {OUT_FILE_LIMIT}")
    for path in files:
        relative = path.relative_to(out)
        if len(relative.parts) > 3:
            problems.append(f"{relative}: deeper than $OUT/a/b/file")
        if path.is_symlink():
            problems.append(f"{relative}: a link does not come back")
        elif path.stat().st_size > OUT_FILE_BYTES:
            problems.append(f"{relative}: {path.stat().st_size:,} bytes, over 16 MiB")
    for problem in problems:
        print(f"OUT check: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_cap_file(args: argparse.Namespace) -> int:
    """Keep a log under the size that comes back: its head and tail, with a marker between."""
    path = Path(args.path)
    if not path.exists() or path.stat().st_size <= args.max_bytes:
        return 0
    data = path.read_bytes()
    keep = args.max_bytes // 2 - 1024
    marker = f"\n[... {len(data) - 2 * keep:,} bytes cut to stay under {args.max_bytes:,} ...]\n".encode()
    path.write_bytes(data[:keep] + marker + data[-keep:])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="build .gpuproof/: package bundle + Fashion-MNIST, and report the sizes")
    p.add_argument("--out", default=".gpuproof")
    p.add_argument("--fmnist", help="Fashion-MNIST folder (default: searched like the demo does)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (wheels are picked for it)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("size", help="report what a device run would carry")
    p.add_argument("carried", nargs="*", default=[".gpuproof"])
    p.set_defaults(func=cmd_size)

    p = sub.add_parser("unpack", help="on the GPU machine: bundle -> site folder, Fashion-MNIST -> IDX files")
    p.add_argument("--bundle", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--fmnist", required=True)
    p.add_argument("--json")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("dry-setup", help="dry run: a small Fashion-MNIST as plain IDX files, then the import check")
    p.add_argument("--fmnist", dest="dest", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--json")
    p.set_defaults(func=cmd_dry_setup)

    p = sub.add_parser("jpeg-shards", help="Fashion-MNIST upscaled to JPEG shards for the e2e step")
    p.add_argument("--dest", required=True)
    p.add_argument("--count", type=int, default=40_000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--json")
    p.set_defaults(func=cmd_jpeg_shards)

    for name, func in (("init", cmd_init), ("step", cmd_step), ("finish", cmd_finish)):
        p = sub.add_parser(name)
        p.add_argument("--summary", required=True)
        p.add_argument("--lock", required=True)
        p.set_defaults(func=func)
        if name == "init":
            p.add_argument("--mode", required=True, choices=("gpu", "dry-run"))
            p.add_argument("--budget-s", type=int, required=True)
        elif name == "step":
            p.add_argument("--name", required=True)
            p.add_argument("--status", choices=("pending", "running", "ok", "failed", "timeout", "skipped"))
            p.add_argument("--rc")
            p.add_argument("--seconds")
            p.add_argument("--started")
            p.add_argument("--budget-s")
            p.add_argument("--note")
            p.add_argument("--command")
            p.add_argument("--figures", action="append", help="JSON file whose keys join the step's figures")
        else:
            p.add_argument("--out", required=True)
            p.add_argument("--wall-s", required=True)
            p.add_argument("--gpu-csv")

    p = sub.add_parser("tests-figures")
    p.add_argument("--pytest-output", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_tests_figures)

    p = sub.add_parser("learner-figures")
    p.add_argument("--learner-json", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_learner_figures)

    p = sub.add_parser("families-figures")
    p.add_argument("--families-json", required=True)
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_families_figures)

    p = sub.add_parser("scrape")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--max-s", type=float, required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(func=cmd_scrape)

    p = sub.add_parser("e2e-figures")
    p.add_argument("--metrics", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--gpu-csv")
    p.add_argument("--data-json")
    p.add_argument("--skip-s", type=float, default=10.0, help="seconds after the first step left out of 'steady'")
    p.set_defaults(func=cmd_e2e_figures)

    p = sub.add_parser("demo-figures")
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--log")
    p.add_argument("--minutes", type=float)
    p.set_defaults(func=cmd_demo_figures)

    p = sub.add_parser("free-port")
    p.set_defaults(func=cmd_free_port)

    p = sub.add_parser("demo-minutes")
    p.add_argument("--deadline", type=float, required=True, help="unix time by which the demo must be done")
    p.add_argument("--reserve-s", type=float, required=True, help="the demo's time besides training")
    p.add_argument("--max", type=float, required=True)
    p.add_argument("--min", type=float, required=True)
    p.set_defaults(func=cmd_demo_minutes)

    p = sub.add_parser("check-out")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_check_out)

    p = sub.add_parser("cap-file")
    p.add_argument("path")
    p.add_argument("--max-bytes", type=int, default=15 * 2**20)
    p.set_defaults(func=cmd_cap_file)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
