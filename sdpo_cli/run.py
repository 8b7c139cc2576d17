"""``sdpo run [INPUT...]``: the whole offline job (load, score, partition, statistics); see ``partitioner.run``."""

from __future__ import annotations

from pathlib import Path

from partitioner.run import RunConfig

from .options import build


def add_arguments(options) -> None:
    options.add_positional("inputs", "data files / globs / name=path (default: the bundled real data)", many=True,
                           metavar="INPUT")
    options.add("output_dir", str, "the job folder (default out/run)", short="-o")
    options.add_dataclass(RunConfig, "job")


def run(values: dict) -> int:
    import polars as pl

    from partitioner.partition.folder import read_manifest
    from partitioner.run import run_job
    from partitioner.scoring.folder import scoring_summary

    config = build(RunConfig, values)
    result = run_job(values.get("inputs") or None, config)
    part, stats = result["partition"], result["stats"]
    manifest = read_manifest(part)
    scoring = scoring_summary(result["scored"])
    print("reference model:", scoring["model"].get("name_or_path"), "| dtype", scoring["dtype"])
    print("per source (reward accuracy = share of pairs with chosen_logps > rejected_logps):")
    for src, s in scoring.get("per_source", {}).items():
        print(f"  {src:<20} n={s['pairs']}  reward_accuracy={s['reward_accuracy']:.3f}  "
              f"mean_margin={s['mean_margin']:.2f}")
    shown = [c for c in ("chunk", "rows", "share", "difficulty_mean", "difficulty_min", "difficulty_max",
                         "reward_accuracy", "mean_gamma", "sources") if c in stats.columns]
    with pl.Config(tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=60, float_precision=3,
                   tbl_hide_dataframe_shape=True):
        print(stats.select(shown))
    print(f"{manifest['rows_in']} rows in = {manifest['rows_kept']} in {len(manifest['chunks'])} chunks + "
          f"{manifest['rows_rejected']} rejected {manifest.get('reject_reasons') or ''}")
    print(f"partition: {part}  (sdpo verify {part}; sdpo train {part} --model-name-or-path ...)  plot: "
          f"{Path(config.output_dir) / 'stats.png'}")
    return 0
