"""Partition folders on disk: Arrow IPC stream shards, ``rejects.arrow`` and ``manifest.json``.

Layout (CONTRACTS.md section 3)::

    OUT/chunk-000.arrow, chunk-001.arrow, ...   Arrow IPC *stream* files, curriculum order
    OUT/chunk-000.parquet, ...                  optional copies (``PartitionConfig.parquet``)
    OUT/rejects.arrow                           rejected rows carried over from loading/scoring
    OUT/manifest.json                           written last, atomically (temp file + rename)

A folder without ``manifest.json`` is not a partition: the writer removes an old manifest before touching any
shard, writes every shard to a temporary name and renames it into place, and only then writes the manifest.
A killed write therefore never leaves a manifest that points at partial shards.

Readers: :func:`load_partition` (list of ``datasets.Dataset``), :func:`load_partition_dict` (``DatasetDict``
``step_0..step_k``), :func:`read_manifest`, :func:`verify_partition`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa

from scorers.columns import ROW_ID
from scorers.errors import UserError

from ..data.rejects import REJECTS_FILE
from ..io import TMP_INFIX, fsync_dir, read_arrow_stream, read_json, sha256_file, write_json

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class PartitionError(UserError):
    """A partition folder is missing, incomplete or does not match its manifest (one-line message)."""


def chunk_name(index: int, suffix: str = "arrow") -> str:
    return f"chunk-{index:03d}.{suffix}"


def schema_columns(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """Create ``out_dir`` or clear a previous partition in it (manifest first), refusing foreign folders.

    Raises:
        PartitionError: ``out_dir`` is a file, or a non-empty folder that is not a partition.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PartitionError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out.iterdir()]
    ours = [p for p in entries if p.name in (MANIFEST, REJECTS_FILE)
            or p.name.startswith(("chunk-", ".chunk-", ".buckets-", f".{MANIFEST}{TMP_INFIX}", f".{REJECTS_FILE}"))]
    if len(ours) != len(entries):
        foreign = sorted(p.name for p in entries if p not in ours)
        raise PartitionError(f"output folder {out} is not empty and not a partition (contains {foreign[0]})")
    if ours and not overwrite:
        raise PartitionError(f"output folder {out} already holds a partition (use overwrite)")
    if (out / MANIFEST).exists():  # invalidate first: from here on the folder is not a partition
        (out / MANIFEST).unlink()
        fsync_dir(out)
    for p in ours:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists() and p.name != MANIFEST:
            p.unlink()
    return out


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` (atomically, fsynced): the partition's completion marker, written last."""
    write_json(Path(out_dir) / MANIFEST, manifest)
    return Path(out_dir) / MANIFEST


def read_manifest(partition_dir: str | os.PathLike) -> dict:
    """The manifest of a partition folder.

    Raises:
        PartitionError: the folder or its manifest is missing (an unfinished write leaves none), or unreadable.
    """
    d = Path(partition_dir)
    if not d.is_dir():
        raise PartitionError(f"partition folder {d} does not exist")
    path = d / MANIFEST
    if not path.exists():
        raise PartitionError(f"{d} has no {MANIFEST}: not a partition, or its write did not finish")
    manifest = read_json(path, "partition manifest")
    if not isinstance(manifest, dict) or "chunks" not in manifest:
        raise PartitionError(f"{path} is not a partition manifest (no 'chunks')")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PartitionError(f"{path} has schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return manifest


def load_partition(partition_dir: str | os.PathLike, verify: bool = False) -> list:
    """The chunks of a partition as memory-mapped ``datasets.Dataset`` objects, in curriculum order.

    Row counts are always checked against the manifest; ``verify=True`` runs :func:`verify_partition` first
    (checksums, schema, row ids).

    Raises:
        PartitionError: no manifest, a missing shard or a row-count mismatch.
    """
    from datasets import Dataset

    d = Path(partition_dir)
    if verify:
        verify_partition(d)
    manifest = read_manifest(d)
    out = []
    for c in manifest["chunks"]:
        path = d / c["file"]
        if not path.exists():
            raise PartitionError(f"shard {c['file']} listed in {d / MANIFEST} is missing")
        ds = Dataset.from_file(str(path))
        if ds.num_rows != c["rows"]:
            raise PartitionError(f"shard {c['file']} has {ds.num_rows} rows, manifest says {c['rows']}")
        out.append(ds)
    return out


def load_partition_dict(partition_dir: str | os.PathLike, verify: bool = False):
    """The chunks as a ``datasets.DatasetDict`` with keys ``step_0`` .. ``step_k`` (curriculum order)."""
    from datasets import DatasetDict

    return DatasetDict({f"step_{i}": ds for i, ds in enumerate(load_partition(partition_dir, verify=verify))})


def verify_partition(partition_dir: str | os.PathLike) -> dict:
    """Check a partition against its manifest; return the manifest when everything matches.

    Checks: every shard (and Parquet copy) exists and has the manifest's sha256; row counts per shard; the
    same columns and types in every shard as the manifest lists; row ids unique across shards; rows in
    chunks == rows_kept; rows_kept + rows_rejected == rows_in; ``rejects.arrow`` holds rows_rejected rows.

    Raises:
        PartitionError: the first mismatch found, as one line.
    """
    d = Path(partition_dir)
    m = read_manifest(d)
    expected_cols = m.get("columns")
    total = 0
    seen_ids: set = set()
    for c in m["chunks"]:
        path = d / c["file"]
        if not path.exists():
            raise PartitionError(f"shard {c['file']} is missing")
        digest = sha256_file(path)
        if digest != c["sha256"]:
            raise PartitionError(f"shard {c['file']} checksum mismatch (sha256 {digest[:12]}, manifest {c['sha256'][:12]})")
        table = read_arrow_stream(path)
        if table.num_rows != c["rows"]:
            raise PartitionError(f"shard {c['file']} has {table.num_rows} rows, manifest says {c['rows']}")
        if expected_cols is not None and schema_columns(table.schema) != expected_cols:
            raise PartitionError(f"shard {c['file']} columns differ from the manifest's")
        if ROW_ID in table.column_names:
            ids = table.column(ROW_ID).to_pylist()
            before = len(seen_ids)
            seen_ids.update(ids)
            if len(seen_ids) - before != len(ids):
                raise PartitionError(f"shard {c['file']} repeats a row_id (a row is in more than one place)")
        pq_entry = c.get("parquet")
        if pq_entry:
            pq_path = d / pq_entry["file"]
            if not pq_path.exists():
                raise PartitionError(f"parquet copy {pq_entry['file']} is missing")
            if sha256_file(pq_path) != pq_entry["sha256"]:
                raise PartitionError(f"parquet copy {pq_entry['file']} checksum mismatch")
        total += table.num_rows
    if total != m["rows_kept"]:
        raise PartitionError(f"chunks hold {total} rows, manifest rows_kept is {m['rows_kept']}")
    if m["rows_kept"] + m["rows_rejected"] != m["rows_in"]:
        raise PartitionError(
            f"row accounting broken: rows_kept {m['rows_kept']} + rows_rejected {m['rows_rejected']} != rows_in {m['rows_in']}"
        )
    rej = d / REJECTS_FILE
    if m["rows_rejected"] and not rej.exists():
        raise PartitionError(f"{REJECTS_FILE} is missing but the manifest counts {m['rows_rejected']} rejected rows")
    if rej.exists():
        n = read_arrow_stream(rej).num_rows
        if n != m["rows_rejected"]:
            raise PartitionError(f"{REJECTS_FILE} has {n} rows, manifest rows_rejected is {m['rows_rejected']}")
        if m.get("rejects_sha256") and sha256_file(rej) != m["rejects_sha256"]:
            raise PartitionError(f"{REJECTS_FILE} checksum mismatch")
    return m
