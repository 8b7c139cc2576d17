"""``sdpo stats``: per-chunk statistics of a partition (table, ``--json``, ``--plot out.png``).

Given a training run's folder (``sdpo train``'s ``output_dir``, holding ``steps.json``), it shows the per-step
quantities the sDPO paper tracks instead: mean γ_ref and reward accuracy of the reference M(t-1) on chunk t and
on the held-out set, and TRL's reward metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("partition", nargs="?", metavar="OUT",
                        help="a partition folder (sdpo partition -o OUT), or a training run folder (steps.json)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON (one object per chunk)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw the difficulty/source plot here")


def run(args) -> int:
    import polars as pl

    from .stats import partition_stats, plot_partition

    if not args.partition:
        raise ValueError("give a partition folder")
    if (Path(args.partition) / "steps.json").exists():
        df = steps_frame(Path(args.partition) / "steps.json")
        if args.plot:
            raise ValueError("--plot draws a partition; this folder is a training run (steps.json)")
    else:
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


def steps_frame(path: Path):
    """One row per stepwise-DPO step from ``steps.json``: γ_ref and reward accuracy of M(t-1), TRL metrics."""
    import polars as pl

    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for s in data.get("steps", []):
        ref = s.get("reference") or {}
        row = {"step": s["step"], "rows": s.get("rows"), "ref_mode": s.get("ref_mode"),
               "optimizer_steps": s.get("optimizer_steps"), "train_loss": s.get("train_loss")}
        for where in ("chunk", "held_out"):
            row[f"gamma_ref_{where}"] = (ref.get(where) or {}).get("mean_margin")
            row[f"ref_reward_accuracy_{where}"] = (ref.get(where) or {}).get("reward_accuracy")
        for key, value in (s.get("trl") or {}).items():
            if key.startswith("rewards/") and isinstance(value, (int, float)):
                row[key] = value
        rows.append(row)
    final = (data.get("final") or {}).get("held_out")
    if final:
        rows.append({"step": None, "gamma_ref_held_out": final.get("mean_margin"),
                     "ref_reward_accuracy_held_out": final.get("reward_accuracy"), "ref_mode": "final M(T)"})
    return pl.DataFrame(rows)
