"""``sdpo stats``: per-chunk statistics of a partition (table, ``--json``, ``--plot out.png``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("partition", nargs="?", metavar="OUT", help="a partition folder (sdpo partition -o OUT)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON (one object per chunk)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw the difficulty/source plot here")


def run(args) -> int:
    import polars as pl

    from .stats import partition_stats, plot_partition

    if not args.partition:
        raise ValueError("give a partition folder")
    df = partition_stats(args.partition)
    if args.json:
        print(json.dumps(df.to_dicts(), indent=2))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=3, fmt_str_lengths=80,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            print(df)
    if args.plot:
        plot_partition(args.partition, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
