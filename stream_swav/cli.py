"""`stream-swav`: train, demo, make-shards, eval, follow, export, config."""
from __future__ import annotations

import argparse
import logging
import sys

from stream_swav.config import ConfigError, load_config


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with configuration sections (see README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value; repeatable")


def _train(args: argparse.Namespace) -> int:
    from stream_swav.runtime.driver import train

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.shards:
        raise ConfigError("data.shards: no shard spec given (a brace pattern, folder/prefix or .txt of URLs); "
                          "`stream-swav demo` makes and uses demo shards")
    return train(cfg)


def _demo(args: argparse.Namespace) -> int:
    from stream_swav.demo import run_demo

    return run_demo(args)


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    import yaml

    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipelines import evaluate, export, follow, make_shards
    from stream_swav import demo

    parser = argparse.ArgumentParser(prog="stream-swav", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run streaming SwAV (joins RAY_ADDRESS or starts a local Ray)")
    _add_config_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="make demo shards, train on local Ray, evaluate, print the results")
    _add_config_arguments(p)
    demo.add_arguments(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser("config", help="print the effective configuration as YAML")
    _add_config_arguments(p)
    p.set_defaults(func=_config)

    for name, module, help_text in (
            ("make-shards", make_shards, "images (folder, tar, Fashion-MNIST) -> WebDataset shards"),
            ("eval", evaluate, "kNN and linear-probe accuracy of a checkpoint's backbone"),
            ("follow", follow, "evaluate each new checkpoint as it appears"),
            ("export", export, "backbone weights for torchvision, optionally TorchScript")):
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"stream-swav: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

