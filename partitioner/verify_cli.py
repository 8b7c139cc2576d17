"""``sdpo verify``: check a partition's checksums, row accounting and schema (exit status 1 on a mismatch)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("partition", nargs="?", metavar="OUT", help="a partition folder (sdpo partition -o OUT)")


def run(args) -> int:
    from .shards import PartitionError, verify_partition

    if not args.partition:
        raise ValueError("give a partition folder")
    try:
        m = verify_partition(args.partition)
    except PartitionError as e:
        print(f"sdpo: verify failed: {e}", file=sys.stderr)
        return 1
    print(f"ok: {len(m['chunks'])} chunks, {m['rows_kept']} rows kept + {m['rows_rejected']} rejected"
          f" = {m['rows_in']} rows in; checksums, row counts and schema match")
    return 0
