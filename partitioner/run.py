"""The whole offline job: load, score with the reference model, partition, statistics (``sdpo run``).

With no inputs it runs on the embedded default: the bundled real data (``partitioner/bundled``: orca_dpo_pairs
and LLaMA-Factory's dpo_en_demo, one source each; shipped in the wheel) and the bundled SmolLM2-135M-Instruct,
ordered *by source* as in the sDPO paper (each source one chunk, sources sorted by the reference model's reward
accuracy on them).

Output (``output_dir``): ``scored/`` (the scored folder), ``partition/`` (chunks + manifest), ``stats.json``
(per-chunk statistics) and ``stats.png`` (their plot). Scoring is resumable: rerunning a killed job continues from
its finished parts.

:class:`RunConfig` is a composition: the job folder, and the loader's, scorer's and partitioner's own configs
(:class:`LoadConfig`, :class:`ScoringConfig`, :class:`PartitionConfig`), so each option is declared once, in the
component it configures. :func:`score_and_partition` is the one score-then-partition path, shared by ``sdpo run``
and ``sdpo partition``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sdpo_core.config import section

from .data.loading import LoadConfig
from .partition.config import PartitionConfig
from .partition.ordering import ORDERS
from .scoring.config import ScoringConfig

BUNDLED_DATA = Path(__file__).resolve().parent / "bundled"
BUNDLED_INPUTS = [
    f"orca={BUNDLED_DATA / 'orca_dpo_pairs.jsonl'}",
    f"llamafactory_en={BUNDLED_DATA / 'llamafactory_dpo_en_demo.json'}",
]


@dataclass
class RunConfig:
    """The whole job: its folder and the components' configs (defaults: the paper's by-source setup)."""

    output_dir: str = field(default="out/run", metadata={"help": "The job folder."})
    load: LoadConfig = section(LoadConfig)
    scoring: ScoringConfig = section(ScoringConfig, signals=["ref_margin", "ref_margin_per_token", "length_gap"])
    partition: PartitionConfig = section(PartitionConfig, order="by_source")


def score_and_partition(inputs, partition_dir, *, load: LoadConfig | None = None,
                        scoring: ScoringConfig | None = None, partition: PartitionConfig | None = None,
                        scored_dir=None, always_score: bool = False) -> dict:
    """Partition ``inputs`` into ``partition_dir``, scoring them first where the order needs scores.

    Args:
        inputs: one scored folder (``sdpo score``; partitioned as it is), or the loader's inputs (files, globs,
            ``name=path``, datasets, ...). Loader inputs are scored into ``scored_dir`` first when
            ``partition.order`` is a score order (or ``always_score``); otherwise they are loaded and partitioned
            directly, their loader rejects carried into the manifest.
        load, scoring, partition: the components' configs (defaults: their defaults).
        scored_dir: where loader inputs are scored (default: ``partition_dir`` + ``.scored``).

    Returns:
        ``{"scored": the scored folder or None, "partition": the partition folder}`` (Paths).

    Raises:
        UserError subclasses: see ``score_preferences`` and ``partition_preferences``.
    """
    from .partition.job import partition_preferences
    from .scoring.folder import is_scored_folder
    from .scoring.job import score_preferences

    scoring = scoring or ScoringConfig()
    partition = partition or PartitionConfig()
    single = inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else inputs
    rejects = scored = None
    if isinstance(single, (str, os.PathLike)) and is_scored_folder(single):
        data = scored = Path(single)
    elif always_score or ORDERS[partition.order].needs_scores:
        scored_dir = scored_dir or f"{str(partition_dir).rstrip('/')}.scored"
        data = scored = score_preferences(inputs, scored_dir, scoring, load=load)
    else:
        from .data.loading import load_preferences_with_rejects

        data, report = load_preferences_with_rejects(inputs, load)
        rejects = report.rejects_table()
    part = partition_preferences(data, partition_dir, partition, rejects=rejects, progress=scoring.progress)
    return {"scored": scored, "partition": Path(part)}


def run_job(inputs=None, config: RunConfig | None = None) -> dict:
    """Load, score, partition and summarise ``inputs`` (default: the bundled data) into ``config.output_dir``.

    Returns:
        ``{"scored": path, "partition": path, "stats": polars DataFrame}``.

    Raises:
        UserError subclasses: see ``score_preferences`` and ``partition_preferences``.
    """
    import json

    from .partition.stats import partition_stats, plot_partition

    config = config or RunConfig()
    out = Path(config.output_dir)
    if inputs is None or (isinstance(inputs, (list, tuple)) and not inputs):
        inputs = BUNDLED_INPUTS
    result = score_and_partition(inputs, out / "partition", load=config.load,
                                 scoring=config.scoring, partition=config.partition, scored_dir=out / "scored",
                                 always_score=True)
    stats = partition_stats(result["partition"])
    (out / "stats.json").write_text(json.dumps(stats.to_dicts(), indent=2, default=str))
    plot_partition(result["partition"], out / "stats.png")
    return {**result, "stats": stats}
