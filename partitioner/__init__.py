"""sdpo-curriculum's data side: load preference data, score it, order it easy -> hard, write stepwise-DPO chunks.

Sub-packages: ``partitioner.data`` (formats, loading, rejects, TRL tokenization), ``partitioner.scoring`` (the
resumable scoring job and its executors), ``partitioner.partition`` (ordering, chunking, shards, manifest,
statistics); ``partitioner.run`` is the whole offline job and the one score-then-partition path. The ``sdpo``
command line (``sdpo_cli``) is a separate package above this one.

Public names are imported lazily, so ``import partitioner`` stays light (no datasets/torch at import time).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LoadConfig": "data.loading",
    "load_preferences": "data.loading",
    "load_preferences_with_rejects": "data.loading",
    "PreferenceDataError": "data.formats",
    "TokenizeConfig": "data.tokenization",
    "tokenize_preferences": "data.tokenization",
    "ScoringConfig": "scoring.config",
    "score_preferences": "scoring.job",
    "read_scored": "scoring.folder",
    "PartitionConfig": "partition.config",
    "PartitionConfigError": "partition.folder",
    "partition_preferences": "partition.job",
    "PartitionError": "partition.folder",
    "load_partition": "partition.folder",
    "load_partition_dict": "partition.folder",
    "read_manifest": "partition.folder",
    "verify_partition": "partition.folder",
    "partition_stats": "partition.stats",
    "plot_partition": "partition.stats",
    "RunConfig": "run",
    "run_job": "run",
    "score_and_partition": "run",
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
