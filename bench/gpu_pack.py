"""What the GPU proof run brings to the GPU machine, and its setup step there and here.

The GPU machine has Python with torch but no ray, webdataset, braceexpand or s3fs, and no
network: `pack` builds `.gpuproof/` here (those packages' wheels, trimmed, and Fashion-MNIST, all
xz-compressed) and reports what a device run will carry; `unpack` is the run's setup step on the
GPU machine; `stand-in` is the dry run's setup step (a Fashion-MNIST subset instead of the bundle).
Both setup steps end by importing what every later step imports. Standard library only, except
`stand-in` (this repository's dataset reader).

    python bench/gpu_pack.py pack --out .gpuproof      # here, before a GPU session
    python bench/gpu_pack.py size                      # what a device run would carry now
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import gzip
import importlib
import importlib.metadata
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAVEL_LIMIT = 64 * 2**20

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

# What the later steps import (the bundle's packages, the runtime, the demo and its evaluation),
# and the modules whose versions the summary records.
STEP_IMPORTS = ("braceexpand", "botocore", "ray", "s3fs", "webdataset", "stream_swav.runtime.driver",
                "stream_swav.apps.demo", "stream_swav.apps.follow")
VERSIONED = ("ray", "s3fs", "botocore", "webdataset", "torch", "torchvision", "numpy", "PIL", "aiohttp", "fsspec")


# ---------------------------------------------------------------------------------------------- pack

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


# ----------------------------------------------------------------------------------- setup steps

def imported_versions() -> dict[str, str]:
    """Import what the later steps import (raising where one fails); the versions found."""
    for name in STEP_IMPORTS:
        importlib.import_module(name)
    return {name: getattr(importlib.import_module(name), "__version__", "?") for name in VERSIONED}


def cmd_check_imports(args: argparse.Namespace) -> int:
    print(json.dumps(imported_versions()))
    return 0


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
    figures: dict[str, Any] = {"required": manifest["required"], "fallbacks_used": used,
                               "unpack_seconds": round(time.monotonic() - started, 1)}
    # A fresh interpreter, as every later step is: this one looked for the fallbacks' modules before
    # they were in the site folder, and caches what it found.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    check = subprocess.run([sys.executable, str(Path(__file__).resolve()), "check-imports"], env=env,
                           capture_output=True, text=True)
    print(check.stdout + check.stderr, end="", flush=True)
    figures["imports"] = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else {}
    Path(args.json).write_text(json.dumps(figures, indent=2))
    return check.returncode


def write_fmnist_subset(dest: Path, train: int, test: int) -> dict[str, Any] | None:
    """The first `train` / `test` images of Fashion-MNIST (found as the demo finds it) as plain IDX
    files in `dest`; None, writing nothing, without Fashion-MNIST (the demo then uses its procedural
    images)."""
    from stream_swav.apps import datasets as fashion_mnist

    folder = fashion_mnist.find_fashion_mnist()
    if folder is None:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images, labels = fashion_mnist.load_split(folder, split)
        for stem, array in zip(fashion_mnist.SPLIT_FILES[split], (images[:count], labels[:count])):
            header = bytes([0, 0, fashion_mnist.IDX_UBYTE, array.ndim])
            header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (dest / stem).write_bytes(header + array.astype("uint8").tobytes())
    return {"source": str(folder), "train": train, "test": test}


def cmd_stand_in(args: argparse.Namespace) -> int:
    """The dry run's setup: a small Fashion-MNIST in place of the unpacked copy, then the import check
    (in this interpreter: the dry run has no bundle, so it sees what every later step sees)."""
    subset = write_fmnist_subset(Path(args.fmnist), args.train, args.test)
    if subset:
        print(f"Fashion-MNIST subset from {subset['source']}: {args.train} train and {args.test} test images "
              f"in {args.fmnist}", flush=True)
    else:
        print("Fashion-MNIST not found: the demo and the e2e data use procedural images", flush=True)
    figures: dict[str, Any] = {"fmnist_subset": subset}
    try:
        figures["imports"] = imported_versions()
    except ImportError as error:
        print(f"import check failed: {error!r}", flush=True)
        return 1
    finally:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures["imports"]), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- main

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

    p = sub.add_parser("unpack", help="the GPU run's setup: bundle -> site folder, Fashion-MNIST -> IDX files")
    p.add_argument("--bundle", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--fmnist", required=True)
    p.add_argument("--json", required=True, help="the step's figures")
    p.set_defaults(func=cmd_unpack)

    p = sub.add_parser("stand-in", help="the dry run's setup: a small Fashion-MNIST as IDX files, the import check")
    p.add_argument("--fmnist", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--json", required=True, help="the step's figures")
    p.set_defaults(func=cmd_stand_in)

    p = sub.add_parser("check-imports", help="import what the later steps import; print the versions as JSON")
    p.set_defaults(func=cmd_check_imports)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
