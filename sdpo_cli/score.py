"""``sdpo score INPUT... -o SCORED``: score preference pairs with a reference model into a resumable scored folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from partitioner.data.loading import LoadConfig
from partitioner.scoring.config import ScoringConfig
from partitioner.scoring.job import EXECUTORS
from partitioner.scoring.ray_executor import RayConfig
from sdpo_core.config import section
from sdpo_core.errors import ConfigError

from .options import build


@dataclass
class ScoreCommand:
    """``sdpo score``: the scored folder, where the work runs, and the components' configs."""

    output_dir: str | None = field(default=None, metadata={"help": "The scored folder (resumed when it exists)."})
    executor: str = field(default="local", metadata={
        "help": "Score in this process (local) or on a Ray cluster with Ray Data (ray; same output).",
        "choices": EXECUTORS})
    load: LoadConfig = section(LoadConfig)
    scoring: ScoringConfig = section(ScoringConfig)
    ray: RayConfig = section(RayConfig, prefix="ray_")


def add_arguments(options) -> None:
    options.add_positional("inputs", "data files / globs / name=path, or a save_to_disk folder", many=True,
                           metavar="INPUT")
    options.add("output_dir", str | None, "the scored folder (resumed when it exists)", short="-o")
    options.add_dataclass(ScoreCommand, "executor")


def run(values: dict) -> int:
    from partitioner.scoring.folder import scoring_summary
    from partitioner.scoring.job import score_preferences

    cmd = build(ScoreCommand, values)
    if not values.get("inputs"):
        raise ConfigError("give at least one INPUT (data files, globs, name=path or a saved dataset folder)")
    if not cmd.output_dir:
        raise ConfigError("give the scored folder with --output-dir/-o")
    out = score_preferences(values["inputs"], cmd.output_dir, cmd.scoring, load=cmd.load, executor=cmd.executor,
                            ray_config=cmd.ray if cmd.executor == "ray" else None)
    meta = scoring_summary(out)
    print(f"scored {meta['rows_scored']} of {meta['rows_in']} rows into {out} ({meta['rows_rejected']} rejected"
          f"{', ' + str(meta['reject_reasons']) if meta['reject_reasons'] else ''})")
    for src, s in meta["per_source"].items():
        print(f"  {src}: {s['pairs']} pairs, reward accuracy {s['reward_accuracy']:.3f}, "
              f"mean margin {s['mean_margin']:.2f}, median {s['median_margin']:.2f}")
    return 0
