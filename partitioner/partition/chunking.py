"""Cutting the ordered rows into consecutive chunks (the steps of the curriculum)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .folder import PartitionConfigError  # "PartitionConfig" annotations: config.py imports this registry


def _equal(n: int, config: "PartitionConfig", key, groups) -> list[int]:
    if config.chunks > n:
        raise PartitionConfigError(f"cannot cut {n} rows into {config.chunks} chunks (more chunks than rows)")
    return [len(a) for a in np.array_split(np.arange(n), config.chunks)]


def _fractions(n: int, config: "PartitionConfig", key, groups) -> list[int]:
    if len(config.fractions) > n:
        raise PartitionConfigError(f"cannot cut {n} rows into {len(config.fractions)} chunks (more chunks than rows)")
    bounds = np.rint(np.cumsum([0.0] + config.fractions) * n).astype(int)
    bounds[-1] = n
    return np.diff(bounds).tolist()


def _thresholds(n: int, config: "PartitionConfig", key, groups) -> list[int]:
    return _cut(n, config, key, lambda: np.asarray(config.thresholds))


def _quantiles(n: int, config: "PartitionConfig", key, groups) -> list[int]:
    return _cut(n, config, key, lambda: np.quantile(key, config.quantiles))


def _cut(n: int, config: "PartitionConfig", key, cut_points) -> list[int]:
    """Sizes of the chunks between the points ``cut_points()`` on the order key."""
    if key is None:
        raise PartitionConfigError(f"chunking {config.chunking!r} needs an order with a key")
    # key is non-decreasing along the order for ascending orders, non-increasing for descending ones
    ascending = bool(key[0] <= key[-1])
    cuts = cut_points()
    if ascending:
        bounds = np.searchsorted(key, cuts, side="left")
    else:
        cuts = cuts[::-1]
        bounds = np.searchsorted(-key, -cuts, side="left")
    sizes = np.diff(np.concatenate([[0], bounds, [n]])).tolist()
    return [s for s in sizes if s > 0]  # a cut outside the key's range gives no chunk


def _group_runs(n: int, config: "PartitionConfig", key, groups) -> list[int]:
    """source / grid: a chunk per run of equal group keys (the source's rank, the grid group)."""
    if groups is None:
        raise PartitionConfigError(f"chunking {config.chunking!r} needs order {CHUNKINGS[config.chunking].order}")
    change = np.flatnonzero(np.diff(groups)) + 1
    return np.diff(np.concatenate([[0], change, [n]])).tolist()


@dataclass(frozen=True)
class Chunking:
    """A way to cut the ordered rows into chunks (``PartitionConfig.chunking``; its ``auto`` picks one of these)."""

    name: str
    help: str  # README.md's chunking table shows it
    order: str | None  # the only order it cuts (its order key being a group per row); None: any order
    sizes: Callable  # (rows, config, order key, group keys or None) -> chunk sizes


CHUNKINGS = {c.name: c for c in (
    Chunking("equal", "`--chunks N` chunks of equal size", None, _equal),
    Chunking("fractions", "`--fractions 0.2,0.3,0.5`: shares of the rows (sum 1)", None, _fractions),
    Chunking("thresholds", "`--thresholds`: cut points on the order key (a score or column order)", None,
             _thresholds),
    Chunking("quantiles", "`--quantiles 0.25,0.5,0.75`: cut points at quantiles of the order key", None, _quantiles),
    Chunking("source", "one chunk per source (`by_source`'s default)", "by_source", _group_runs),
    Chunking("grid", "one chunk per grid cell visited, or per diagonal for `sum_pd` (`grid_2d`'s default)",
             "grid_2d", _group_runs),
)}
CHUNKING_NAMES = tuple(CHUNKINGS)


def chunk_sizes(n: int, config: "PartitionConfig", key: np.ndarray | None, source_rank: np.ndarray | None = None) -> list[int]:
    """Sizes of consecutive chunks over ``n`` ordered rows (``key`` aligned with the order; ``source_rank``: the
    group keys of an order whose key is a group per row)."""
    chunking = CHUNKINGS.get(config.chunking)
    if chunking is None:
        raise PartitionConfigError(f"unknown chunking {config.chunking!r}; choose one of {', '.join(CHUNKINGS)}")
    sizes = [int(s) for s in chunking.sizes(n, config, key, source_rank)]
    if any(s == 0 for s in sizes):
        raise PartitionConfigError(f"chunking gives an empty chunk for {n} rows (sizes {sizes}); use fewer chunks")
    return merge_small(sizes, config.min_chunk_size)


def merge_small(sizes: list[int], minimum: int) -> list[int]:
    """Merge chunks smaller than ``minimum`` into the previous chunk (the next one for the first)."""
    sizes = list(sizes)
    i = 0
    while i < len(sizes) and len(sizes) > 1:
        if sizes[i] < minimum:
            j = i - 1 if i > 0 else 1
            sizes[j] += sizes[i]
            del sizes[i]
            i = max(j, 0) if j < i else i
        else:
            i += 1
    return sizes

