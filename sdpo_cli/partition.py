"""``sdpo partition INPUT... -o PART``: order preference pairs easy -> hard and cut them into shards (Arrow or
Parquet, ``--shard-format``) + a dataset card (``README.md``: ``datasets.load_dataset(PART)``) + manifest.

INPUT is a scored folder (``sdpo score``), or the loader's inputs (files / globs / name=path): those are loaded
and, for the score-based orders (easy_to_hard, hard_to_easy, by_source), scored first into ``--scored-dir``
(default ``PART.scored``) with every scoring option ``sdpo score`` takes (``partitioner.run.score_and_partition``,
the path ``sdpo run`` takes too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from partitioner.data.loading import LoadConfig
from partitioner.partition.config import PartitionConfig
from partitioner.scoring.config import ScoringConfig
from sdpo_core.config import section
from sdpo_core.errors import ConfigError

from .options import build


@dataclass
class PartitionCommand:
    """``sdpo partition``: the output folders and the components' configs."""

    output_dir: str | None = field(default=None, metadata={"help": "The partition folder."})
    scored_dir: str | None = field(default=None, metadata={
        "help": "Where loader inputs are scored first (default: PART.scored)."})
    load: LoadConfig = section(LoadConfig)
    scoring: ScoringConfig = section(ScoringConfig)
    partition: PartitionConfig = section(PartitionConfig)


def add_arguments(options) -> None:
    options.add_positional("inputs", "a scored folder, or data files for the loader", many=True, metavar="INPUT")
    options.add("output_dir", str | None, "the partition folder", short="-o")
    options.add_dataclass(PartitionCommand, "output")


def run(values: dict) -> int:
    from partitioner.partition.folder import read_manifest
    from partitioner.run import score_and_partition

    cmd = build(PartitionCommand, values)
    inputs = values.get("inputs") or []
    if not inputs:
        raise ConfigError("give an INPUT: a scored folder or data files")
    if not cmd.output_dir:
        raise ConfigError("give the partition folder with --output-dir/-o")
    out = score_and_partition(list(inputs), cmd.output_dir, load=cmd.load, scoring=cmd.scoring,
                              partition=cmd.partition, scored_dir=cmd.scored_dir)["partition"]
    m = read_manifest(out)
    sizes = ", ".join(str(c["rows"]) for c in m["chunks"])
    print(f"partitioned {m['rows_kept']} of {m['rows_in']} rows into {len(m['chunks'])} chunks ({sizes}) in {out}"
          f" ({m['rows_rejected']} rejected); order {m['ordering']['order']}; a dataset repository: "
          f"datasets.load_dataset({str(out)!r}) reads the chunks as splits")
    return 0
