"""The ``sdpo`` command line.

This package is the application layer above the three libraries (``scorers``, ``partitioner``,
``trainer_plugin``): it imports them, they never import it. Each subcommand is a module with
``add_arguments(options)`` and ``run(values) -> int``; the modules import their libraries' heavy parts (torch,
transformers, TRL) inside those functions only, so ``sdpo --help``, ``sdpo verify`` and ``sdpo stats`` never load
them. Flags come from the commands' config dataclasses (:mod:`sdpo_cli.options`), as does ``--config file.yaml``.

Errors raised for the user (:class:`sdpo_core.errors.UserError`, and the operating system's answers about the user's
paths: no such file, no permission, no space left, ...) are printed as one line of bounded length,
``sdpo: error: ...``, with exit status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from sdpo_core.errors import UserError

from . import crossfit, inspect, partition, run, score, stats, train, truthfulqa, verify
from .options import Options

# subcommand -> (module, one-line help)
COMMANDS = {
    "inspect": (inspect, "load and validate preference data; print formats, counts and rejects"),
    "score": (score, "score pairs with a reference model (resumable)"),
    "partition": (partition, "order and chunk preference data into Arrow or Parquet shards + dataset card + "
                             "manifest (scoring first if needed)"),
    "stats": (stats, "per-chunk statistics of a partition, or per-step ones of a training run"),
    "verify": (verify, "check a partition's checksums, row accounting and schema"),
    "crossfit": (crossfit, "SelectiveDPO: cross-fitted held-out DPO loss of scored pairs, then the easiest share "
                           "partitioned"),
    "train": (train, "stepwise DPO over a partition's chunks with TRL"),
    "run": (run, "the whole job: load, score, partition (defaults: bundled data and model)"),
    "truthfulqa": (truthfulqa, "TruthfulQA MC1/MC2 of a model, as lm-eval-harness scores it"),
}
MAX_ERROR_CHARS = 300
# The operating system's answers about a path the user gave: shown as one line, not as a bug.
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.ELOOP, errno.EROFS, errno.ENAMETOOLONG, errno.EEXIST}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``sdpo: error: ...`` (exit 2), like every other error."""

    def error(self, message):
        _print_error(f"{message} (see {self.prog} --help)")
        raise SystemExit(2)


def _print_error(message: str) -> None:
    line = " ".join(str(message).split()) or "error"
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    print(f"sdpo: error: {line}", file=sys.stderr)


def _top_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdpo", description="Stepwise DPO (sDPO) curriculum toolkit",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items())
                     + "\n\n'sdpo COMMAND --help' lists a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    try:
        ns = top.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if ns.command is None:
        top.print_help()
        return 2
    module, help_ = COMMANDS[ns.command]
    try:
        parser = _Parser(prog=f"sdpo {ns.command}", description=help_)
        parser.add_argument("--config", metavar="YAML", help="YAML file of options (command-line flags win)")
        options = Options(parser)
        module.add_arguments(options)
        try:
            args = parser.parse_args(options.normalise_argv(ns.args))
        except SystemExit as e:
            return int(e.code or 0)
        return int(module.run(options.values(args, args.config)) or 0)
    except UserError as e:
        _print_error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        _print_error(f"{e.strerror}: {e.filename}" if e.filename else str(e))
        return 2
    except KeyboardInterrupt:
        print("sdpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
