"""``sdpo partition INPUT... -o PART``: order scored pairs easy -> hard and cut them into Arrow shards + manifest.

INPUT is a scored folder (``sdpo score``), or the loader's inputs (files / globs / name=path): those are loaded
and, for the score-based orders (easy_to_hard, hard_to_easy, by_source), scored first into ``--scored-dir``
(default ``PART.scored``) with ``--model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scorers.errors import ConfigError

from ..data.loading import LoadConfig
from ..partition.config import SCORE_ORDERS, PartitionConfig
from .options import build


@dataclass
class PartitionCommand:
    output_dir: str | None = field(default=None, metadata={"help": "The partition folder."})
    model: str = field(default="bundled", metadata={"help": "Reference model when INPUT must be scored first."})
    max_length: int = field(default=1024, metadata={"help": "DPOConfig.max_length when scoring first."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first N loaded rows (scoring first)."})
    scored_dir: str | None = field(default=None, metadata={
        "help": "Where loader inputs are scored (default: PART.scored)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


def add_arguments(options) -> None:
    options.add_positional("inputs", "a scored folder, or data files for the loader", many=True, metavar="INPUT")
    options.add("output_dir", str | None, "the partition folder", short="-o")
    options.add_dataclass(PartitionConfig, "partition")
    options.add_dataclass(PartitionCommand, "scoring first (loader inputs)")
    options.add_dataclass(LoadConfig, "loading")


def run(values: dict) -> int:
    from ..partition.folder import read_manifest
    from ..partition.job import partition_preferences
    from ..scoring.folder import is_scored_folder

    cmd = build(PartitionCommand, values)
    inputs = values.get("inputs") or []
    if not inputs:
        raise ConfigError("give an INPUT: a scored folder or data files")
    if not cmd.output_dir:
        raise ConfigError("give the partition folder with --output-dir/-o")
    config = build(PartitionConfig, values)
    load = build(LoadConfig, values).as_kwargs()
    rejects = None
    if len(inputs) == 1 and is_scored_folder(inputs[0]):
        data = inputs[0]
    elif config.order in SCORE_ORDERS:
        from ..scoring.config import ScoringConfig
        from ..scoring.job import score_preferences

        data = cmd.scored_dir or f"{str(cmd.output_dir).rstrip('/')}.scored"
        score_preferences(list(inputs), data, ScoringConfig(model=cmd.model, max_length=cmd.max_length,
                                                            limit=cmd.limit, progress=cmd.progress,
                                                            load_options=load))
    else:
        from ..data.loading import load_preferences_with_rejects

        data, report = load_preferences_with_rejects(list(inputs), **load)
        rejects = report.rejects_table()
    out = partition_preferences(data, cmd.output_dir, config, rejects=rejects, progress=cmd.progress)
    m = read_manifest(out)
    sizes = ", ".join(str(c["rows"]) for c in m["chunks"])
    print(f"partitioned {m['rows_kept']} of {m['rows_in']} rows into {len(m['chunks'])} chunks ({sizes}) in {out}"
          f" ({m['rows_rejected']} rejected); order {m['ordering']['order']}")
    return 0
