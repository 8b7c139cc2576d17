"""Cutting the ordered rows into consecutive chunks (the steps of the curriculum)."""

from __future__ import annotations

import numpy as np

from .config import PartitionConfig, PartitionConfigError

def chunk_sizes(n: int, config: PartitionConfig, key: np.ndarray | None, source_rank: np.ndarray | None = None) -> list[int]:
    """Sizes of consecutive chunks over ``n`` ordered rows (``key`` aligned with the order)."""
    mode = config.chunking
    if mode == "equal":
        if config.chunks > n:
            raise PartitionConfigError(f"cannot cut {n} rows into {config.chunks} chunks (more chunks than rows)")
        sizes = [len(a) for a in np.array_split(np.arange(n), config.chunks)]
    elif mode == "fractions":
        if len(config.fractions) > n:
            raise PartitionConfigError(f"cannot cut {n} rows into {len(config.fractions)} chunks (more chunks than rows)")
        bounds = np.rint(np.cumsum([0.0] + config.fractions) * n).astype(int)
        bounds[-1] = n
        sizes = np.diff(bounds).tolist()
    elif mode in ("thresholds", "quantiles"):
        if key is None:
            raise PartitionConfigError(f"chunking {mode!r} needs an order with a key")
        # key is non-decreasing along the order for ascending orders, non-increasing for descending ones
        ascending = bool(key[0] <= key[-1])
        cuts = np.quantile(key, config.quantiles) if mode == "quantiles" else np.asarray(config.thresholds)
        if ascending:
            bounds = np.searchsorted(key, cuts, side="left")
        else:
            cuts = cuts[::-1]
            bounds = np.searchsorted(-key, -cuts, side="left")
        bounds = np.concatenate([[0], bounds, [n]])
        sizes = np.diff(bounds).tolist()
        sizes = [s for s in sizes if s > 0]  # a cut outside the key's range gives no chunk
    else:  # source / grid: a chunk per run of equal keys (the source's rank, the grid group)
        if source_rank is None:
            raise PartitionConfigError(f"chunking {mode!r} needs order {'by_source' if mode == 'source' else 'grid_2d'}")
        change = np.flatnonzero(np.diff(source_rank)) + 1
        sizes = np.diff(np.concatenate([[0], change, [n]])).tolist()
    sizes = [int(s) for s in sizes]
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

