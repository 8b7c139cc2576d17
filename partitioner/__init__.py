"""sdpo-curriculum partitioner: load preference data, order it easy -> hard and write stepwise-DPO chunks.

Public names are imported lazily so ``import partitioner`` stays light (no datasets/torch at import time).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load_preferences": "loading",
    "load_preferences_with_rejects": "loading",
    "PreferenceDataError": "formats",
    "TokenizeConfig": "tokenization",
    "tokenize_preferences": "tokenization",
    "PartitionConfig": "partition",
    "PartitionConfigError": "partition",
    "partition_preferences": "partition",
    "PartitionError": "shards",
    "load_partition": "shards",
    "load_partition_dict": "shards",
    "read_manifest": "shards",
    "verify_partition": "shards",
    "partition_stats": "stats",
    "plot_partition": "stats",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
