"""Per-chunk statistics and a plot of a partition, for the terminal and for notebooks.

``partition_stats(dir)`` returns a polars DataFrame, one row per chunk; ``plot_partition(dir, path=None)`` draws
the difficulty distribution per chunk and each chunk's composition by source and returns the matplotlib figure.
Only the columns needed are read, from memory-mapped shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdpo_core.columns import (
    CHOSEN_IDS,
    CHOSEN_LOGPS,
    CHOSEN_TOKENS,
    DIFFICULTY,
    PROMPT_IDS,
    REJECTED_IDS,
    REJECTED_LOGPS,
    REJECTED_TOKENS,
)
from sdpo_core.stats import margin_stats

from ..io import StorageError
from .folder import PartitionError, read_manifest
from .layout import iter_shard

QUANTILES = (0.1, 0.5, 0.9)


def _read_columns(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Columns ``names`` (those present) of a shard as numpy arrays, a list column (token ids) as its lengths:
    read batch by batch, only those columns (Arrow pages memory-mapped, Parquet column chunks)."""
    if not path.exists():
        raise PartitionError(f"shard {path.name} is missing")
    parts: dict[str, list] = {}
    try:
        for batch in iter_shard(path, names):
            for name, col in zip(batch.schema.names, batch.columns):
                value = pc.list_value_length(col) if pa.types.is_list(col.type) else col
                parts.setdefault(name, []).append(value.to_numpy(zero_copy_only=False))
    except StorageError as e:
        raise PartitionError(f"shard {e}") from None
    return {n: np.concatenate(v) for n, v in parts.items()}


def _chunk_row(index: int, rows: int, total: int, cols: dict) -> dict:
    row: dict = {"chunk": index, "rows": rows, "share": rows / total if total else 0.0}
    if DIFFICULTY in cols:
        d = cols[DIFFICULTY].astype(np.float64)
        row.update(difficulty_mean=float(d.mean()), difficulty_std=float(d.std()),
                   difficulty_min=float(d.min()), difficulty_max=float(d.max()),
                   **{f"difficulty_q{int(q * 100)}": float(np.quantile(d, q)) for q in QUANTILES})
    if CHOSEN_LOGPS in cols and REJECTED_LOGPS in cols:
        m = margin_stats(cols[CHOSEN_LOGPS], cols[REJECTED_LOGPS])
        row.update(reward_accuracy=m["reward_accuracy"], mean_gamma=m["mean_margin"])
    if PROMPT_IDS in cols:
        row["prompt_tokens_mean"] = float(cols[PROMPT_IDS].astype(np.float64).mean())
    for ids, count, name in ((CHOSEN_IDS, CHOSEN_TOKENS, "chosen"), (REJECTED_IDS, REJECTED_TOKENS, "rejected")):
        if count in cols:
            row[f"{name}_tokens_mean"] = float(cols[count].astype(np.float64).mean())
        elif ids in cols:
            row[f"{name}_tokens_mean"] = float(cols[ids].astype(np.float64).mean())
    return row


def partition_stats(partition_dir: str | os.PathLike):
    """One row per chunk: rows, share, difficulty mean/std/min/max/quantiles, reward accuracy (share of
    rows with chosen_logps - rejected_logps > 0) and mean gamma, mean token lengths, and the source mix
    (``sources``: "name n, ..." in descending count).

    Columns whose inputs are absent (e.g. unscored data) are left out.

    Raises:
        PartitionError: no manifest or a missing shard.
    """
    import polars as pl

    d = Path(partition_dir)
    manifest = read_manifest(d)
    return pl.DataFrame(chunk_stats(d, manifest["chunks"], manifest["rows_kept"]))


def chunk_stats(partition_dir: Path, chunks: list[dict], total: int) -> list[dict]:
    """:func:`partition_stats`'s rows as dicts, from the manifest's ``chunks`` entries and their shards (the dataset
    card's table is made from them before the manifest is written)."""
    wanted = [DIFFICULTY, CHOSEN_LOGPS, REJECTED_LOGPS, PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, CHOSEN_TOKENS,
              REJECTED_TOKENS]
    rows = []
    for c in chunks:
        cols = _read_columns(Path(partition_dir) / c["file"], wanted)
        row = _chunk_row(c["index"], c["rows"], total, cols)
        srcs = sorted(c.get("sources", {}).items(), key=lambda kv: (-kv[1], kv[0]))
        row["sources"] = ", ".join(f"{s} {n}" for s, n in srcs)
        rows.append(row)
    return rows


def plot_partition(partition_dir: str | os.PathLike, path: str | os.PathLike | None = None):
    """Difficulty distribution per chunk (box plots) and chunk composition by source (stacked bars).

    Returns the matplotlib ``Figure`` (displayed by Jupyter); with ``path`` also saves it (PNG, or the format
    of the suffix). No GUI backend is needed.
    """
    from matplotlib.figure import Figure

    d = Path(partition_dir)
    manifest = read_manifest(d)
    chunks = manifest["chunks"]
    labels = [f"step {c['index']}\n({c['rows']:,})" for c in chunks]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_d, ax_s = fig.subplots(1, 2)
    diffs = [_read_columns(d / c["file"], [DIFFICULTY]).get(DIFFICULTY) for c in chunks]
    if all(x is not None for x in diffs):
        data = [x.astype(np.float64) for x in diffs]
        ax_d.boxplot(data, showfliers=False, widths=0.6)
        ax_d.set_xticks(range(1, len(chunks) + 1), labels)
        ax_d.set_ylabel("difficulty (higher = harder)")
        ax_d.set_title("Difficulty per chunk (curriculum order)")
    else:
        ax_d.bar(range(len(chunks)), [c["rows"] for c in chunks], tick_label=labels)
        ax_d.set_ylabel("rows")
        ax_d.set_title("Rows per chunk (no difficulty column)")
    sources = sorted({s for c in chunks for s in c.get("sources", {})})
    bottom = np.zeros(len(chunks))
    for s in sources:
        share = np.array([c["sources"].get(s, 0) / max(c["rows"], 1) for c in chunks])
        ax_s.bar(range(len(chunks)), share, bottom=bottom, label=s, width=0.6)
        bottom += share
    ax_s.set_xticks(range(len(chunks)), labels)
    ax_s.set_ylim(0, 1)
    ax_s.set_ylabel("share of chunk")
    ax_s.set_title("Composition by source")
    if sources:
        ax_s.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    o = manifest.get("ordering", {})
    fig.suptitle(f"{d.name}: order {o.get('order')}"
                 + (f" ({o['signal']})" if o.get("signal") else "")
                 + f", {len(chunks)} chunks, {manifest['rows_kept']:,} rows kept, {manifest['rows_rejected']:,} rejected")
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
