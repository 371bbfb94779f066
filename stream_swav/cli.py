"""stream-swav: self-supervised visual features (SwAV) from an endless stream of images, on Ray.

Subcommands: train, demo, config, make-shards, eval, gallery, follow, export. Each app is imported
only when its subcommand runs, so `--help` and `--version` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from stream_swav import logs
from stream_swav.apps import DEMO_DATASETS, DEMO_GPU_IMAGES, DEMO_GPU_MINUTES, DEMO_IMAGES, DEMO_MINUTES, \
    FOLLOW_INTERVAL_S, FOLLOW_PORT, KNN_K, KNN_TEMPERATURE, REENCODE_EXT
from stream_swav.config import Config, ConfigError, UsageError
from stream_swav.provenance import package_version


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with configuration sections (see README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value; repeatable")


def _endpoint_url(text: str) -> str:
    """--endpoint-url, checked as storage.endpoint_url is (botocore refuses others with a traceback)."""
    from stream_swav.config import ENDPOINT_URL

    if not ENDPOINT_URL.accepts(text):
        raise argparse.ArgumentTypeError(f"{ENDPOINT_URL.message}, got {text!r}")
    return text


def _endpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", default="", metavar="URL", type=_endpoint_url,
                        help="S3 endpoint (MinIO, Ceph, R2...); default: from the environment (AWS_ENDPOINT_URL)")


def _embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the kNN evaluation shared by `eval` and `follow`."""
    parser.add_argument("--k", type=int, default=KNN_K, help=f"neighbours that vote (default {KNN_K})")
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE,
                        help=f"vote weight exp(similarity / T) (default {KNN_TEMPERATURE})")
    parser.add_argument("--image-size", type=int, default=0,
                        help="evaluation size in px (default: the checkpoint's crops.global_size)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per embedding batch (default 256)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--max-train", type=int, default=0, help="use at most this many index images (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="use at most this many query images (0: all)")
    _endpoint_argument(parser)


def _train(args: argparse.Namespace) -> int:
    from stream_swav.config import load_config
    from stream_swav.runtime.driver import train

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.shards:
        raise ConfigError("data.shards: no shard spec given (a brace pattern, folder/prefix or .txt of URLs); "
                          "`stream-swav demo` makes and uses demo shards")
    return train(cfg)


def _check_paths_for_job(cfg: Config) -> None:
    """Refuse data.shards or checkpoint.dir that a Ray job cannot use as they are meant.

    A job runs in a throwaway copy of the submitted working dir on the cluster, so a relative local
    path points there: shards that were never uploaded, checkpoints lost with the job."""
    if not cfg.data.shards:
        raise ConfigError("data.shards: no shard spec given; a Ray job needs an absolute path on storage every "
                          "node mounts, or s3://")
    for key, value in (("data.shards", cfg.data.shards), ("checkpoint.dir", cfg.checkpoint.dir)):
        scheme, separator, rest = value.partition("://")
        if separator and scheme.lower() != "file":
            continue
        path = rest if separator else value
        if path.startswith("~"):
            raise ConfigError(f"{key}: {value!r} starts with ~, which a Ray job does not expand (it would be a "
                              f"folder named ~ in its temporary working dir); write the absolute path")
        if not path.startswith("/"):
            raise ConfigError(f"{key}: {value!r} is relative, so a Ray job would resolve it inside its temporary "
                              f"working dir on the cluster; use an absolute path on storage every node mounts, "
                              f"or s3://")


def _config(args: argparse.Namespace) -> int:
    import yaml

    from stream_swav.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.for_job:
        _check_paths_for_job(cfg)
    for warning in cfg.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _app(module: str) -> Callable[[argparse.Namespace], int]:
    """The `run` of stream_swav.apps.<module>, imported when the subcommand runs."""
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"stream_swav.apps.{module}").run(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-swav", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="debug logging, and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run streaming SwAV (joins RAY_ADDRESS or starts a local Ray)")
    _config_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="make demo shards, train on local Ray, evaluate, print the results")
    _config_arguments(p)
    p.add_argument("--out", default="runs/demo", help="folder for shards, checkpoints and results")
    p.add_argument("--images", type=int, default=0,
                   help=f"training images (default: {DEMO_IMAGES:,} on CPU, {DEMO_GPU_IMAGES:,} on GPU)")
    p.add_argument("--minutes", type=float, default=0.0,
                   help=f"cap on the training time, whatever --images says (default: {DEMO_MINUTES:g} on CPU, "
                        f"{DEMO_GPU_MINUTES:g} on GPU)")
    p.add_argument("--fresh", action="store_true", help="delete checkpoints and results of an earlier demo")
    p.add_argument("--eval-train", type=int, default=0,
                   help="labelled training images in the kNN index and probe training set (default: all 60,000)")
    p.add_argument("--eval-test", type=int, default=0,
                   help="labelled test images scored (default: all 10,000)")
    p.add_argument("--dataset", default="auto", choices=DEMO_DATASETS,
                   help="demo images: Fashion-MNIST when found (auto), or the procedural 10-class set")
    p.add_argument("--prepare-only", action="store_true", help="only make the demo shards (kept for the next run)")
    p.set_defaults(func=_app("demo"))

    p = sub.add_parser("config", help="print the effective configuration as YAML")
    _config_arguments(p)
    p.add_argument("--for-job", action="store_true",
                   help="also refuse what a Ray job cannot use: no data.shards, or a relative local path in "
                        "data.shards or checkpoint.dir (deploy/submit.sh checks with this)")
    p.set_defaults(func=_config)

    p = sub.add_parser("make-shards", help="images (folder, tar, Fashion-MNIST) -> WebDataset shards")
    p.add_argument("src", help="image folder (recursive), tar file, or folder with Fashion-MNIST IDX files")
    p.add_argument("dest", help="output folder or s3:// prefix")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most (default 10000)")
    p.add_argument("--max-bytes", type=float, default=256e6, help="bytes per shard at most (default 256e6)")
    p.add_argument("--reencode", choices=sorted(REENCODE_EXT), help="re-encode every image to this format")
    p.add_argument("--max-side", type=int, default=0,
                   help="shrink images whose longer side exceeds this many pixels (re-encodes them)")
    p.add_argument("--class-dirs", action="store_true",
                   help="folder SRC: label = index of the first-level sub-folder in sorted order")
    p.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split")
    p.add_argument("--size", type=int, default=0, help="Fashion-MNIST: resize to SIZE px (default: 28)")
    _endpoint_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_app("make_shards"))

    p = sub.add_parser("eval", help="kNN and linear-probe accuracy of a checkpoint's backbone")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (uses latest.json), step folder, or backbone.pt; local or s3://")
    p.add_argument("--train", required=True, help="labelled shards for the kNN index and probe training")
    p.add_argument("--test", required=True, help="labelled shards to score")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--no-references", action="store_true", help="skip the raw-pixel and random-init rows")
    p.add_argument("--json-out", metavar="FILE", help="also write the result as JSON to this file")
    _embedding_arguments(p)
    p.set_defaults(func=_app("evaluate"))

    p = sub.add_parser("gallery", help="PNG of the images a checkpoint's prototypes hold, and of what dedup drops")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (uses latest.json) or step folder of a training run; local or s3://")
    p.add_argument("--shards", required=True, help="shards to draw images from (labels not needed)")
    p.add_argument("--out", default="gallery.png", help="PNG to write, local or s3:// (default gallery.png)")
    p.add_argument("--max-images", type=int, default=20_000,
                   help="read at most this many images, in shard order (default 20000; 0: all)")
    p.add_argument("--prototypes", type=int, default=6,
                   help="rows for this many most used and as many least used prototypes (default 6)")
    p.add_argument("--per-row", type=int, default=12, help="images per row, and repeats shown (default 12)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    _endpoint_argument(p)
    p.set_defaults(func=_app("gallery"))

    p = sub.add_parser("follow", help="evaluate each new checkpoint as it appears")
    p.add_argument("--checkpoints", required=True, help="checkpoint folder (local or s3://) to follow")
    p.add_argument("--train", required=True, help="labelled shards for the kNN index")
    p.add_argument("--test", required=True, help="labelled shards to score")
    p.add_argument("--out", required=True, help="folder for results.jsonl, results.csv and accuracy.png")
    p.add_argument("--interval-s", type=float, default=FOLLOW_INTERVAL_S,
                   help=f"seconds between polls (default {FOLLOW_INTERVAL_S:g})")
    p.add_argument("--once", action="store_true", help="poll once (evaluate latest if new), then exit; no metrics server")
    p.add_argument("--all", action="store_true",
                   help="also evaluate every retained step folder without a result, not only the latest")
    p.add_argument("--host", default="127.0.0.1", help="metrics server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=FOLLOW_PORT,
                   help=f"metrics server port (default {FOLLOW_PORT}; 0: any free port)")
    p.add_argument("--probe", action="store_true", help="also fit a linear probe per checkpoint")
    p.add_argument("--references", action="store_true", help="also record raw-pixel and random-init kNN (computed once)")
    _embedding_arguments(p)
    p.set_defaults(func=_app("follow"))

    p = sub.add_parser("export", help="backbone weights for torchvision, optionally a torch.export program")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder (uses latest.json), step folder, or backbone.pt; local or s3://")
    p.add_argument("--out", required=True, help="state_dict file to write (local or s3://), e.g. resnet50.pt")
    p.add_argument("--pt2", action="store_true",
                   help="also write <out stem>.pt2: the feature extractor as a torch.export program (any batch "
                        "size, --image-size square images), checked against eager on a dummy batch; loads with "
                        "torch.export.load(path).module(), no stream-swav needed")
    p.add_argument("--image-size", type=int, default=0,
                   help="input size of the .pt2 program in px (default: the training crop size)")
    _endpoint_argument(p)
    p.set_defaults(func=_app("export"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose or args.debug else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        if args.debug:
            raise
        kind = "configuration error" if isinstance(err, ConfigError) else "error"
        print(f"stream-swav: {kind}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
