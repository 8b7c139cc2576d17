"""``partition_preferences``: order rows into a curriculum and write its shards, ``rejects.arrow`` and manifest.

Steps: open the input (memory-mapped, :mod:`.inputs`), compute the order (:mod:`.ordering`), cut it into chunks
(:mod:`.chunking`), copy the rows into the shards (:mod:`.shards`), write ``rejects.arrow``, the dataset card
(:mod:`.card`) and, last, the manifest (:mod:`.folder`). Only the small key columns are sorted in memory, so memory
stays flat however large the input is.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from sdpo_core.columns import DIFFICULTY, ROW_ID, SOURCE

from ..data.rejects import REJECTS_FILE, REJECTS_SCHEMA, reason_counts, write_rejects
from ..io import StorageError, library_version
from .chunking import chunk_sizes
from .card import write_card
from .config import PartitionConfig
from .folder import SCHEMA_VERSION, PartitionError, prepare_output_dir, schema_columns, write_manifest
from .inputs import open_input
from .ordering import ORDERS, compute_order, numeric_column, source_codes
from .layout import REJECTS_PARQUET
from .shards import write_parquet, write_shards

logger = logging.getLogger(__name__)


def _summary(values: np.ndarray | None) -> dict | None:
    if values is None or not len(values):
        return None
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}


def partition_preferences(data, output_dir: str | os.PathLike, config: PartitionConfig | None = None, *,
                          rejects=None, progress: bool = True) -> Path:
    """Order ``data`` into a curriculum and write it as chunk shards + ``rejects.arrow`` + ``README.md`` (the
    dataset card) + ``manifest.json``.

    Args:
        data: a scored folder (path), or a ``datasets.Dataset`` / ``pyarrow.Table`` with a ``row_id`` column
            (the loader's output or scored rows).
        output_dir: the partition folder (created; a previous partition there is replaced).
        config: :class:`PartitionConfig` (default: easy_to_hard, 3 equal chunks).
        rejects: reject records or a REJECTS_SCHEMA table to carry over (Dataset input only; a scored folder
            brings its own ``rejects.arrow``).

    Returns:
        The partition folder.

    Raises:
        PartitionError / PartitionConfigError: one-line messages for bad settings or input (unknown signal,
        more chunks than rows, fractions not summing to 1, empty input, unscored input for a score order).
    """
    config = config or PartitionConfig()
    inp = open_input(data, rejects=rejects)
    perm, key, ordering = compute_order(inp, config)
    if config.keep_fraction < 1:
        perm, key = _keep_share(inp, perm, key, config.keep_fraction, config.keep_from, ordering)
    n = len(perm)
    sizes = chunk_sizes(n, config, key, source_rank=key if ORDERS[config.order].key_is_group else None)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # every kept row in exactly one chunk
    seen = np.zeros(inp.num_rows, dtype=bool)
    seen[perm] = True
    if bounds[-1] != n or int(seen.sum()) != n:  # n positions, all distinct
        raise PartitionError("internal error: the chunks do not cover every row exactly once")
    del seen

    if config.shuffle_within:
        for ci in range(len(sizes)):
            lo, hi = bounds[ci], bounds[ci + 1]
            perm[lo:hi] = perm[lo:hi][np.random.default_rng([config.seed, ci]).permutation(hi - lo)]
    chunk_entries = []
    harder = numeric_column(inp, DIFFICULTY, "difficulty") if DIFFICULTY in inp.schema.names else None
    codes, source_names = source_codes(inp)
    for ci in range(len(sizes)):
        idx = perm[bounds[ci]:bounds[ci + 1]]
        counts = np.bincount(codes[idx], minlength=len(source_names))
        chunk_entries.append({
            "index": ci,
            "difficulty": _summary(harder[idx]) if harder is not None else None,
            "key": _summary(key[bounds[ci]:bounds[ci + 1]]) if key is not None else None,
            "sources": {source_names[i]: int(c) for i, c in enumerate(counts) if c},
        })
    del harder, codes, key
    inp.release()

    inp.wait_verified()  # nothing is written (not even the old partition removed) before the input is confirmed
    out = prepare_output_dir(output_dir, overwrite=config.overwrite)
    try:
        return _write(inp, perm, bounds, out, config, chunk_entries, sizes, ordering, n, progress)
    except (StorageError, OSError) as e:
        # prepare_output_dir removed the old manifest before the first shard was written, and the new one is
        # written last: the folder holds no manifest now, so nothing can read a half-written partition.
        reason = str(e) if isinstance(e, StorageError) else f"cannot write in {out}: {e.strerror or e}"
        raise PartitionError(f"{reason}; {out} holds no manifest (no partition) until a rerun completes") from e


def _keep_share(inp, perm, key, fraction: float, keep_from: str, ordering: dict):
    """``fraction`` of the order (at least one row) from its start or its end, in order; the others join the input's
    rejects."""
    from ..data.rejects import reject_record, rejects_table

    keep = max(1, math.floor(len(perm) * fraction + 1e-9))
    kept = slice(0, keep) if keep_from == "start" else slice(len(perm) - keep, len(perm))
    dropped = np.sort(np.concatenate([perm[:kept.start], perm[kept.stop:]]))
    ids = inp.column(ROW_ID).take(pa.array(dropped)).to_pylist()
    sources = inp.column(SOURCE).take(pa.array(dropped)).to_pylist() if SOURCE in inp.schema.names else [None] * len(ids)
    which = "first" if keep_from == "start" else "last"
    detail = f"keep_fraction {fraction:g}: the {which} {keep} of {len(perm)} rows of the order were kept"
    new = rejects_table([reject_record(s, None, "partition", "beyond_keep_fraction", detail, {ROW_ID: r})
                         for r, s in zip(ids, sources)])
    inp.rejects = new if inp.rejects is None else pa.concat_tables([inp.rejects, new])
    ordering["keep_fraction"] = fraction
    ordering["keep_from"] = keep_from
    inp.release()
    return perm[kept], (None if key is None else key[kept])


def _write(inp, perm, bounds, out: Path, config: PartitionConfig, chunk_entries: list, sizes, ordering: dict, n: int,
           progress: bool) -> Path:
    files = write_shards(inp, perm, bounds, out, config, progress=progress)
    for entry, f in zip(chunk_entries, files):
        entry.update(f)
        # keep the manifest's key order readable: index, file, rows, sha256, ...
    chunk_entries = [{"index": e["index"], "file": e["file"], "rows": e["rows"], "sha256": e["sha256"],
                      **{k: v for k, v in e.items() if k not in ("index", "file", "rows", "sha256")}}
                     for e in chunk_entries]

    rej_table = inp.rejects
    if rej_table is None:
        rej_table = REJECTS_SCHEMA.empty_table()
    rejects_sha = write_rejects(rej_table, out / REJECTS_FILE)
    # beside Parquet shards the rejects are Parquet too: datasets reads every config of a folder with one builder
    rejects_parquet = write_parquet(rej_table, out / REJECTS_PARQUET) if config.shard_format != "arrow" else None
    rows_rejected = rej_table.num_rows
    rows_in = inp.rows_in if inp.rows_in is not None else n + rows_rejected
    if rows_in != n + rows_rejected:
        raise PartitionError(f"row accounting broken: rows_in {rows_in} != kept {n} + rejected {rows_rejected}")
    if sum(c["rows"] for c in chunk_entries) != n:
        raise PartitionError("internal error: rows written differ from rows kept")

    scoring = None
    if inp.scoring is not None:
        scoring = {k: v for k, v in inp.scoring.items() if k != "parts"}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [inp.fingerprint],
        "scoring": scoring,
        "ordering": ordering,
        "chunking": {
            "mode": config.chunking, "chunks": len(sizes), "requested_chunks": config.chunks if config.chunking == "equal" else None,
            "fractions": config.fractions, "thresholds": config.thresholds, "quantiles": config.quantiles,
            "min_chunk_size": config.min_chunk_size, "shuffle_within": config.shuffle_within,
            "batch_rows": config.batch_rows,
        },
        "seed": config.seed,
        "rows_in": int(rows_in),
        "rows_kept": int(n),
        "rows_rejected": int(rows_rejected),
        "reject_reasons": reason_counts(rej_table),
        "rejects_sha256": rejects_sha,
        **({"rejects_parquet": rejects_parquet} if rejects_parquet else {}),
        "card_sha256": None,
        "columns": schema_columns(inp.schema),
        "chunks": chunk_entries,
    }
    manifest["card_sha256"] = write_card(out, manifest)  # the card's statistics are read from the shards written
    write_manifest(out, manifest)
    logger.info("partitioned %d rows into %d chunks %s in %s", n, len(sizes), [c["rows"] for c in chunk_entries], out)
    return out
