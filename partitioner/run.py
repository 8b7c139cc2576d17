"""The whole offline job: load, score with the reference model, partition, statistics (``sdpo run``).

With no inputs it runs on the embedded default: the bundled real data (``partitioner/bundled``: orca_dpo_pairs
and LLaMA-Factory's dpo_en_demo, one source each; shipped in the wheel) and the bundled SmolLM2-135M-Instruct,
ordered *by source* as in the sDPO paper (each source one chunk, sources sorted by the reference model's reward
accuracy on them).

Output (``output_dir``): ``scored/`` (the scored folder), ``partition/`` (chunks + manifest), ``stats.json``
(per-chunk statistics) and ``stats.png`` (their plot). Scoring is resumable: rerunning a killed job continues from
its finished parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scorers.columns import DTYPES
from scorers.errors import check_ranges

from .partition.config import CHUNKINGS, ORDERS

BUNDLED_DATA = Path(__file__).resolve().parent / "bundled"
BUNDLED_INPUTS = [
    f"orca={BUNDLED_DATA / 'orca_dpo_pairs.jsonl'}",
    f"llamafactory_en={BUNDLED_DATA / 'llamafactory_dpo_en_demo.json'}",
]


@dataclass
class RunConfig:
    """Settings of the whole job (the scorer's and partitioner's most used options; defaults: the paper's setup)."""

    output_dir: str = field(default="out/run", metadata={"help": "The job folder."})
    model: str = field(default="bundled", metadata={
        "help": "Reference model M0: path, hub id or 'bundled' (SmolLM2-135M-Instruct)."})
    dtype: str = field(default="float32", metadata={"help": "float32 (TRL-exact) or bfloat16.", "choices": DTYPES})
    max_length: int = field(default=1024, metadata={"min": 1, "help": "DPOConfig.max_length."})
    signals: list[str] = field(default_factory=lambda: ["ref_margin", "ref_margin_per_token", "length_gap"],
                               metadata={"help": "Difficulty signals to compute (comma-separated)."})
    difficulty_signal: str | None = field(default=None, metadata={"help": "Signal used as `difficulty`."})
    limit: int | None = field(default=None, metadata={"min": 1, "help": "Score only the first N loaded rows."})
    order: str = field(default="by_source", metadata={"help": "Curriculum order.", "choices": ORDERS})
    chunking: str = field(default="auto", metadata={"help": "How to cut the order.", "choices": CHUNKINGS})
    chunks: int = field(default=3, metadata={"min": 1, "help": "Equal chunks for the score orders."})
    seed: int = field(default=0, metadata={"min": 0, "help": "Seed of the random order and signal."})
    overwrite: bool = field(default=False, metadata={"help": "Start scoring over if the settings changed."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        check_ranges(self)


def run_job(inputs, config: RunConfig | None = None, load_options: dict | None = None) -> dict:
    """Load, score, partition and summarise ``inputs`` (default: the bundled data) into ``config.output_dir``.

    Returns:
        ``{"scored": path, "partition": path, "stats": polars DataFrame}``.

    Raises:
        UserError subclasses: see ``score_preferences`` and ``partition_preferences``.
    """
    import json

    from .partition.config import PartitionConfig
    from .partition.job import partition_preferences
    from .partition.stats import partition_stats, plot_partition
    from .scoring.config import ScoringConfig
    from .scoring.job import score_preferences

    config = config or RunConfig()
    out = Path(config.output_dir)
    scored = score_preferences(
        list(inputs) or BUNDLED_INPUTS,
        out / "scored",
        ScoringConfig(model=config.model, dtype=config.dtype, max_length=config.max_length, signals=config.signals,
                      difficulty_signal=config.difficulty_signal, limit=config.limit, seed=config.seed,
                      overwrite=config.overwrite, progress=config.progress, load_options=load_options or {}),
    )
    part = partition_preferences(
        scored, out / "partition",
        PartitionConfig(order=config.order, chunking=config.chunking, chunks=config.chunks, seed=config.seed),
        progress=config.progress,
    )
    stats = partition_stats(part)
    (out / "stats.json").write_text(json.dumps(stats.to_dicts(), indent=2, default=str))
    plot_partition(part, out / "stats.png")
    return {"scored": scored, "partition": part, "stats": stats}
