"""``PartitionConfig``: how rows are ordered, chunked and written (checks in ``__post_init__``).

Orderings (``order``):
  ``easy_to_hard``  by the difficulty signal, easiest first (default; ``difficulty`` column, higher = harder)
  ``hard_to_easy``  the reverse
  ``random``        seeded permutation (the paper's ablation)
  ``by_source``     each source together, sources sorted by the reference model's reward accuracy on them
                    (share of rows with chosen_logps - rejected_logps > 0), highest = easiest first, as in sDPO
  ``column``        any numeric column, ascending or descending
  ``grid_2d``       2D-Curri-DPO (Li & Zhang 2025, arXiv 2504.07856, withdrawn by its authors; built from the paper
                    as written): each row gets a prompt-complexity level (``complexity_signal``, default
                    ``prompt_perplexity``) and a pair-distinguishability level (``signal``, default the
                    ``difficulty`` column), ``grid_levels`` equal-count levels per axis, easiest = 0; the cells are
                    visited by ``grid_strategy``: ``sum_pd`` (by PC + PD level, ties by PD level: the paper's
                    best, "S+PD"), ``pc_first`` (PC level, then PD level) or ``pd_first``; inside a cell by the
                    distinguishability difficulty. Chunking ``grid`` (its default): one chunk per cell visited
                    (per diagonal for ``sum_pd``)
Ties are broken by ``row_id``, so the order is deterministic and independent of the input's row order.

``keep_fraction`` < 1 keeps only a share of the ordered rows, from the start of the order (``keep_from='start'``: the
easiest for an easy→hard order, SelectiveDPO's filter, Gao et al. 2025, arXiv 2502.09650, and BeeS's large margins,
arXiv 2502.14560) or from its end (``keep_from='end'``: the hardest, the small DPO implicit-reward gaps of arXiv
2508.04149); the kept rows keep their order, the others are counted rejects (``beyond_keep_fraction``).

Chunkings: ``n`` equal chunks (``chunks``), explicit ``fractions`` (sum to 1), ``thresholds`` on the order key,
``quantiles`` of the order key, one chunk per source (``by_source``'s default); ``min_chunk_size`` merges a
too-small chunk into its neighbour; ``shuffle_within`` permutes rows inside each chunk (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpo_core.config import check_ranges

from .chunking import CHUNKING_NAMES
from .folder import PartitionConfigError
from .layout import SHARD_FORMATS
from .ordering import ORDER_NAMES

ORDERS = ORDER_NAMES  # the registries' names (ordering.ORDERS, chunking.CHUNKINGS), declared there once
CHUNKINGS = ("auto",) + CHUNKING_NAMES  # auto: picked from the options given
GRID_STRATEGIES = ("sum_pd", "pc_first", "pd_first")
KEEP_FROM = ("start", "end")


def _floats(value) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an integer past float's range
        raise PartitionConfigError(f"expected a list of numbers, got {str(value)[:60]}") from e


@dataclass
class PartitionConfig:
    """How rows are ordered, chunked and written. Checked in ``__post_init__``; data-dependent checks at run."""

    order: str = field(default="easy_to_hard", metadata={
        "choices": ORDERS, "help": f"Curriculum order: one of {', '.join(ORDERS)}."})
    signal: str | None = field(
        default=None,
        metadata={"help": "Difficulty signal for easy_to_hard/hard_to_easy (a name from scoring.json); "
                  "default: the 'difficulty' column."},
    )
    complexity_signal: str = field(
        default="prompt_perplexity",
        metadata={"help": "order grid_2d: the prompt-complexity axis (a signal name from scoring.json, higher = "
                  "harder after its direction); `signal` is the pair-distinguishability axis."},
    )
    grid_levels: int = field(default=3, metadata={"min": 1, "help": "order grid_2d: equal-count levels per axis."})
    grid_strategy: str = field(
        default="sum_pd", metadata={"choices": GRID_STRATEGIES,
                                    "help": f"order grid_2d: how the cells are visited: {', '.join(GRID_STRATEGIES)}."}
    )
    keep_fraction: float = field(
        default=1.0,
        metadata={"min": 0, "max": 1, "help": "Keep only this share of the rows (at least one), taken from keep_from's "
                  "end of the order; the rest are rejects with reason beyond_keep_fraction (SelectiveDPO keeps 0.5)."},
    )
    keep_from: str = field(
        default="start", metadata={"choices": KEEP_FROM, "help": "Which end of the order keep_fraction keeps: 'start' "
                                   "(the easiest for easy_to_hard: SelectiveDPO, BeeS) or 'end' (the hardest: "
                                   "small implicit-reward gaps); the kept rows stay in the order."},
    )
    column: str | None = field(default=None, metadata={"help": "Numeric column for order='column'."})
    ascending: bool = field(default=True, metadata={"help": "order='column': ascending (True) or descending."})
    seed: int = field(default=0, metadata={"min": 0, "help": "Seed of order='random' and shuffle_within."})
    chunking: str = field(
        default="auto",
        metadata={"choices": CHUNKINGS, "help": f"One of {', '.join(CHUNKINGS)}; 'auto' picks from the options given "
                  "(fractions/thresholds/quantiles, 'source' for by_source, else 'equal')."},
    )
    chunks: int = field(default=3, metadata={"min": 1, "help": "Number of equal chunks (chunking='equal')."})
    fractions: list[float] | None = field(default=None, metadata={"help": "Chunk shares, e.g. 0.2,0.3,0.5 (sum 1)."})
    thresholds: list[float] | None = field(
        default=None, metadata={"help": "Cut points on the order key (increasing along the order)."}
    )
    quantiles: list[float] | None = field(
        default=None, metadata={"help": "Cut points as quantiles of the order key, e.g. 0.25,0.5,0.75."}
    )
    min_chunk_size: int = field(
        default=1, metadata={"min": 1, "help": "Chunks smaller than this are merged into the previous chunk (next for the first)."}
    )
    shuffle_within: bool = field(default=False, metadata={"help": "Seeded shuffle of the rows inside each chunk."})
    shard_format: str = field(
        default="arrow", metadata={"choices": SHARD_FORMATS, "help": "Chunk files: 'arrow' (Arrow IPC streams, "
                                   "memory-mapped: local training), 'parquet' (compressed: to share or upload to the "
                                   "Hub) or 'both' (Arrow shards plus Parquet copies)."},
    )
    fsync: bool = field(default=True, metadata={"help": "fsync shards before the manifest (survives power loss)."})
    batch_rows: int = field(default=8192, metadata={"min": 1, "help": "Rows per output record batch (bounds memory)."})
    overwrite: bool = field(default=True, metadata={"help": "Replace a previous partition in the output folder."})

    def __post_init__(self):
        check_ranges(self)
        self.fractions, self.thresholds, self.quantiles = map(_floats, (self.fractions, self.thresholds, self.quantiles))
        given = [n for n in ("fractions", "thresholds", "quantiles") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PartitionConfigError(f"give only one of fractions, thresholds, quantiles (got {', '.join(given)})")
        if not 0 < self.keep_fraction <= 1:
            raise PartitionConfigError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.keep_from != "start" and self.keep_fraction == 1:
            raise PartitionConfigError(f"keep_from {self.keep_from!r} needs a keep_fraction below 1 (all rows are kept)")
        if self.chunking == "auto":
            default = {"by_source": "source", "grid_2d": "grid"}.get(self.order, "equal")
            self.chunking = given[0] if given else default
        elif self.chunking in ("fractions", "thresholds", "quantiles") and getattr(self, self.chunking) is None:
            raise PartitionConfigError(f"chunking {self.chunking!r} needs --{self.chunking}")
        if self.chunking == "grid" and self.order != "grid_2d":
            raise PartitionConfigError("chunking 'grid' (one chunk per grid cell) needs order 'grid_2d'")
        if self.chunking == "source" and self.order != "by_source":
            raise PartitionConfigError("chunking 'source' (one chunk per source) needs order 'by_source'")
        if self.order == "column" and not self.column:
            raise PartitionConfigError("order 'column' needs a column name (--column)")
        if self.order != "column" and self.column:
            raise PartitionConfigError(f"--column is only used with order 'column', not {self.order!r}")
        if self.signal and self.order not in ("easy_to_hard", "hard_to_easy", "grid_2d"):
            raise PartitionConfigError(f"--signal is only used with easy_to_hard/hard_to_easy/grid_2d, not "
                                       f"{self.order!r}")
        if self.chunking == "equal" and not isinstance(self.chunks, int):  # its minimum: check_ranges
            raise PartitionConfigError(f"chunks must be a positive integer, got {self.chunks!r}")
        if self.fractions is not None:
            if any(f <= 0 for f in self.fractions):
                raise PartitionConfigError(f"fractions must be positive, got {self.fractions}")
            if abs(sum(self.fractions) - 1.0) > 1e-6:
                raise PartitionConfigError(f"fractions must sum to 1, got {sum(self.fractions):g} ({self.fractions})")
        if self.quantiles is not None:
            q = self.quantiles
            if not q or any(not 0 < x < 1 for x in q) or any(b <= a for a, b in zip(q, q[1:])):
                raise PartitionConfigError(f"quantiles must be increasing and strictly between 0 and 1, got {q}")
        if self.thresholds is not None:
            t = self.thresholds
            if not t or any(b <= a for a, b in zip(t, t[1:])):
                raise PartitionConfigError(f"thresholds must be increasing, got {t}")
            if self.order in ("random", "by_source"):
                raise PartitionConfigError(f"thresholds need a score or column order, not {self.order!r}")
        if self.quantiles is not None and self.order in ("random", "by_source"):
            raise PartitionConfigError(f"quantiles need a score or column order, not {self.order!r}")

