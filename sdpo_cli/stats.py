"""``sdpo stats``: per-chunk statistics of a partition (table, ``--json``, ``--plot out.png``).

Given a training run's folder (``sdpo train``'s ``output_dir``, holding ``steps.json``), it shows the per-step
quantities the sDPO paper tracks instead: mean γ_ref and reward accuracy of the reference M(t-1) on chunk t and
on the held-out set, and TRL's reward metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdpo_core.errors import ConfigError


@dataclass
class StatsCommand:
    json: bool = field(default=False, metadata={"help": "Print the statistics as JSON (one object per chunk)."})
    plot: str | None = field(default=None, metadata={"help": "Also draw the difficulty/source plot to this PNG."})


def add_arguments(options) -> None:
    options.add_positional("partition", "a partition folder (sdpo partition -o PART), or a training run folder "
                           "(steps.json)", many=False, metavar="PART")
    options.add_dataclass(StatsCommand, "output")


def run(values: dict) -> int:
    import polars as pl

    from partitioner.io import read_json
    from partitioner.partition.stats import partition_stats, plot_partition
    from trainer_plugin.training_record import STEPS_FILE, steps_frame

    partition = values.get("partition")
    plot, as_json = values.get("plot"), values.get("json", False)
    if not partition:
        raise ConfigError("give a partition folder: sdpo stats PART")
    if (Path(partition) / STEPS_FILE).exists():
        df = steps_frame(read_json(Path(partition) / STEPS_FILE, "training record"))
        if plot:
            raise ConfigError("--plot draws a partition; this folder is a training run (steps.json)")
    else:
        df = partition_stats(partition)
    if as_json:
        print(json.dumps(df.to_dicts(), indent=2))
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, float_precision=3, fmt_str_lengths=80,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            print(df)
    if plot:
        plot_partition(partition, plot)
        if not as_json:
            print(f"plot written to {plot}")
    return 0
