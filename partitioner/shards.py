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

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from .schema import ROW_ID

MANIFEST = "manifest.json"
REJECTS = "rejects.arrow"
SCHEMA_VERSION = 1


class PartitionError(ValueError):
    """A partition folder is missing, incomplete or does not match its manifest (one-line message)."""


def chunk_name(index: int, suffix: str = "arrow") -> str:
    return f"chunk-{index:03d}.{suffix}"


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("sdpo-curriculum")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a source tree)
        return "0+unknown"


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def schema_columns(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


class _HashingSink:
    """A write-only file object that hashes what passes through (so shards are hashed while written)."""

    def __init__(self, f):
        self._f, self.sha = f, hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        self.sha.update(data)
        return self._f.write(data)

    def flush(self):
        self._f.flush()

    def close(self):
        self.closed = True

    def writable(self):
        return True


class ShardWriter:
    """Write one shard (Arrow IPC stream, optional Parquet) under a temporary name; ``commit`` renames it.

    Assumptions: every batch has the schema given at construction.
    """

    def __init__(self, out_dir: Path, index: int, schema: pa.Schema, parquet: bool = False, fsync: bool = True):
        self.fsync = fsync
        self.path = out_dir / chunk_name(index)
        self.tmp = out_dir / f".{self.path.name}.tmp-{os.getpid()}"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._sink = _HashingSink(self._file)
        self._writer = pa.ipc.new_stream(pa.PythonFile(self._sink, mode="w"), schema)
        self.rows = 0
        self.parquet_path = self.parquet_tmp = self._pq = None
        if parquet:
            import pyarrow.parquet as pq

            self.parquet_path = out_dir / chunk_name(index, "parquet")
            self.parquet_tmp = out_dir / f".{self.parquet_path.name}.tmp-{os.getpid()}"
            self._pq = pq.ParquetWriter(str(self.parquet_tmp), schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        if self._pq is not None:
            self._pq.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self) -> dict:
        """Close, fsync and rename into place; returns the manifest entry's file fields."""
        self._writer.close()
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        entry = {"file": self.path.name, "rows": self.rows, "sha256": self._sink.sha.hexdigest()}
        if self._pq is not None:
            self._pq.close()
            os.replace(self.parquet_tmp, self.parquet_path)
            entry["parquet"] = {"file": self.parquet_path.name, "sha256": sha256_file(self.parquet_path)}
        return entry

    def abort(self) -> None:
        for closer in (self._writer.close, self._file.close):
            try:
                closer()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        if self._pq is not None:
            try:
                self._pq.close()
            except Exception:  # noqa: BLE001
                pass
        for p in (self.tmp, self.parquet_tmp):
            if p is not None and Path(p).exists():
                Path(p).unlink()


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
    ours = [p for p in entries if p.name in (MANIFEST, REJECTS)
            or p.name.startswith(("chunk-", ".chunk-", ".buckets-", f".{MANIFEST}", f".{REJECTS}"))]
    if len(ours) != len(entries):
        foreign = sorted(p.name for p in entries if p not in ours)
        raise PartitionError(f"output folder {out} is not empty and not a partition (contains {foreign[0]})")
    if ours and not overwrite:
        raise PartitionError(f"output folder {out} already holds a partition (use overwrite)")
    if (out / MANIFEST).exists():  # invalidate first: from here on the folder is not a partition
        (out / MANIFEST).unlink()
        _fsync_dir(out)
    for p in ours:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists() and p.name != MANIFEST:
            p.unlink()
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(obj: dict, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    return write_json_atomic(manifest, Path(out_dir) / MANIFEST)


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
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PartitionError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(manifest, dict) or "chunks" not in manifest:
        raise PartitionError(f"{path} is not a partition manifest (no 'chunks')")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PartitionError(f"{path} has schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return manifest


def chunk_paths(partition_dir: str | os.PathLike) -> list[Path]:
    d = Path(partition_dir)
    return [d / c["file"] for c in read_manifest(d)["chunks"]]


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


def _read_stream(path: Path) -> pa.Table:
    try:
        with pa.OSFile(str(path), "rb") as f:
            return pa.ipc.open_stream(f).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise PartitionError(f"{path.name} is not a readable Arrow IPC stream: {str(e).splitlines()[0]}") from e


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
        table = _read_stream(path)
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
    rej = d / REJECTS
    if m["rows_rejected"] and not rej.exists():
        raise PartitionError(f"{REJECTS} is missing but the manifest counts {m['rows_rejected']} rejected rows")
    if rej.exists():
        n = _read_stream(rej).num_rows
        if n != m["rows_rejected"]:
            raise PartitionError(f"{REJECTS} has {n} rows, manifest rows_rejected is {m['rows_rejected']}")
        if m.get("rejects_sha256") and sha256_file(rej) != m["rejects_sha256"]:
            raise PartitionError(f"{REJECTS} checksum mismatch")
    return m
