"""The ``sdpo`` command line.

Each subcommand lives beside the code it drives, as a module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up and handles ``--config file.yaml`` (any option, with
dashes or underscores, as a YAML mapping; command-line flags win over the file).

Errors the user can fix (bad input, missing files, wrong settings) are printed as one line,
``sdpo: error: ...``, with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "inspect": ("partitioner.inspect_cli", "load and validate preference data; print formats, counts and rejects"),
    "score": ("scorers.cli", "score pairs with a reference model (resumable)"),
    "partition": ("partitioner.partition_cli", "order and chunk scored data into Arrow shards + manifest"),
    "stats": ("partitioner.stats_cli", "per-chunk statistics of a partition (table, --json, --plot)"),
    "verify": ("partitioner.verify_cli", "check a partition's checksums, row accounting and schema"),
    "train": ("trainer_plugin.cli", "stepwise DPO over a partition's chunks with TRL"),
    "run": ("partitioner.run_cli", "the whole job: load, score, partition (defaults: bundled data and model)"),
}

# Exceptions that carry a user-facing one-line message.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError, KeyError)


def _load_config(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise FileNotFoundError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo", description="Stepwise DPO (sDPO) curriculum toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", help="YAML file of options (command-line flags take precedence)")
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand whose module is not built yet
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"sdpo: error: '{args.command}' is not available in this version", file=sys.stderr)
        return 2
    try:
        if args.config:
            sub = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
            known = {a.dest for a in sub._actions}  # noqa: SLF001
            cfg = _load_config(args.config)
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
            sub.set_defaults(**cfg)
            args = parser.parse_args(argv)
        return int(importlib.import_module(args._module).run(args) or 0)
    except USER_ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sdpo: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
