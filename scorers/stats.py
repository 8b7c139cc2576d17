"""Per-source statistics of reference margins, as the sDPO paper uses them to order sources.

For each ``source``: ``count``, ``reward_accuracy`` (share of pairs with γ > 0, γ = chosen_logps − rejected_logps),
``mean_margin`` and ``median_margin`` of γ. A source with a higher reward accuracy is easier for the reference.
"""

from __future__ import annotations

from partitioner.schema import CHOSEN_LOGPS, REJECTED_LOGPS, SOURCE


def per_source_stats(data):
    """Per-source statistics as a polars DataFrame sorted by source.

    Args:
        data: a ``pyarrow.Table``, ``datasets.Dataset``, ``polars.DataFrame`` or a scored folder path, with
            ``source``, ``chosen_logps``, ``rejected_logps``.

    Returns:
        ``polars.DataFrame`` with columns source, count, reward_accuracy, mean_margin, median_margin.
    """
    import os

    import polars as pl
    import pyarrow as pa

    if isinstance(data, (str, os.PathLike)):
        from .job import read_scored

        data = read_scored(data)[0]
    if not isinstance(data, (pl.DataFrame, pa.Table)):  # datasets.Dataset
        data = data.with_format("arrow")[:]
    if isinstance(data, pa.Table):
        data = pl.from_arrow(data.select([SOURCE, CHOSEN_LOGPS, REJECTED_LOGPS]))
    margin = pl.col(CHOSEN_LOGPS) - pl.col(REJECTED_LOGPS)
    return (
        data.group_by(SOURCE)
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            (margin > 0).mean().alias("reward_accuracy"),
            margin.mean().alias("mean_margin"),
            margin.median().alias("median_margin"),
        )
        .sort(SOURCE)
    )
