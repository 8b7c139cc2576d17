"""The rows to partition, as record batches memory-mapped from a scored folder (or taken from a table).

Only small key columns are ever materialised; the rows themselves stay in the mapped files, and the mapping's
resident pages are released after each slice (:meth:`PartitionInput.release`), so the process holds a few
batches of the input at a time, however large the input is.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from scorers.compat import has_indices_mapping
from sdpo_core.columns import ROW_ID

from ..data.rejects import REJECTS_FILE, read_rejects, rejects_table
from ..io import sha256_file
from ..scoring.folder import SCORING_FILE, is_scored_folder, scored_parts, verify_parts
from .folder import PartitionError


class PartitionInput:
    """Rows to partition, as record batches (memory-mapped where the input is a file), plus what came with them."""

    def __init__(self, batches, schema, *, scoring=None, rejects=None, fingerprint=None, maps=(), rows_in=None,
                 verification=None):
        self.batches: list[pa.RecordBatch] = [b for b in batches if b.num_rows]
        self.schema: pa.Schema = schema
        self.scoring: dict | None = scoring
        self.rejects: pa.Table | None = rejects
        self.fingerprint: dict = fingerprint or {}
        self.maps: list[mmap.mmap] = list(maps)
        lengths = [b.num_rows for b in self.batches]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])
        self.rows_in = rows_in
        self._verification = verification  # a Future checking the input files' checksums, or None

    def wait_verified(self) -> None:
        """Block until the input's checksums are confirmed (raises what the check raised); call before writing."""
        if self._verification is not None:
            self._verification.result()

    def column(self, name: str) -> pa.ChunkedArray:
        if name not in self.schema.names:
            raise KeyError(name)
        i = self.schema.get_field_index(name)
        return pa.chunked_array([b.column(i) for b in self.batches], type=self.schema.field(i).type)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.batches)

    def release(self) -> None:
        """Drop the mapped input pages from this process's resident set (the OS page cache keeps them)."""
        for m in self.maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass


def _map_stream(path: Path) -> tuple[list[pa.RecordBatch], pa.Schema, mmap.mmap | None]:
    size = path.stat().st_size
    if size == 0:
        raise PartitionError(f"{path} is empty, not an Arrow IPC stream")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:  # rows are taken at random positions: no read-ahead / fault-around (keeps the resident set small)
        m.madvise(mmap.MADV_RANDOM)
    except (AttributeError, OSError):
        pass
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(m)))
        batches = list(reader)
        for b in batches:  # buffer sizes against lengths: cheap, and no read can then leave the mapping
            b.validate()
    except pa.ArrowInvalid as e:
        raise PartitionError(f"{path} is not an Arrow IPC stream: {str(e).splitlines()[0]}") from e
    return batches, reader.schema, m


def _read_scored_dir(path: Path) -> PartitionInput:
    """A complete scored folder (CONTRACTS.md section 2). Its parts are checked against their recorded sha256 in a
    background thread (hashing releases the GIL) while the key columns are read and sorted; the partitioner waits
    for the check before it writes or removes anything (:meth:`PartitionInput.wait_verified`), so a part that
    differs from its checksum never reaches a shard."""
    scoring, parts = scored_parts(path, verify=False)
    verification = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-parts")
    future = verification.submit(verify_parts, scoring, parts)
    verification.shutdown(wait=False)
    batches, maps, schema = [], [], None
    for p in parts:
        b, s, m = _map_stream(p)
        if schema is not None and s != schema:
            raise PartitionError(f"{p.name} has different columns than {parts[0].name}")
        schema = s
        batches += b
        maps.append(m)
    rejects = read_rejects(path / REJECTS_FILE) if (path / REJECTS_FILE).exists() else None
    fingerprint = {
        "kind": "scored",
        "path": str(path.resolve()),
        "scoring_json_sha256": sha256_file(path / SCORING_FILE),
        "parts": [{k: p.get(k) for k in ("file", "rows", "sha256")} for p in scoring.get("parts", [])],
    }
    return PartitionInput(batches, schema, scoring=scoring, rejects=rejects, fingerprint=fingerprint, maps=maps,
                          rows_in=scoring.get("rows_in"), verification=future)


def _table_of(data) -> pa.Table:
    """The Arrow table behind a ``datasets.Dataset`` (memory-mapped when the dataset is), or a ``pa.Table``."""
    if isinstance(data, pa.Table):
        return data
    if has_indices_mapping(data):
        data = data.flatten_indices()
    return data.data.table


def _mapped_dataset(data):
    """``_map_stream`` of the one Arrow stream file a ``datasets.Dataset`` is exactly (all its rows and columns, no
    selection), else None."""
    files = getattr(data, "cache_files", None)
    if not files or len(files) != 1 or has_indices_mapping(data):
        return None
    path = Path(files[0].get("filename", ""))
    try:
        with open(path, "rb") as f:
            if f.read(6) == b"ARROW1" or path.stat().st_size == 0:
                return None
        batches, schema, m = _map_stream(path)
    except (OSError, PartitionError):
        return None
    if sum(b.num_rows for b in batches) != data.num_rows or not schema.equals(data.data.schema, check_metadata=False):
        return None  # the mapping goes with its last reference
    return batches, schema, m


def _row_ids_sha256(ids: pa.ChunkedArray) -> str:
    h = hashlib.sha256()
    for chunk in ids.chunks:
        h.update("\n".join(chunk.to_pylist()).encode())
        h.update(b"\n")
    return h.hexdigest()


def open_input(data, rejects=None) -> PartitionInput:
    """Wrap a scored folder path, a ``datasets.Dataset`` or a ``pyarrow.Table`` as partitioner input.

    Raises:
        PartitionError: missing/incomplete scored folder, empty input, no ``row_id`` column.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise PartitionError(f"input {path} does not exist")
        if not is_scored_folder(path):
            raise PartitionError(f"input {path} is not a scored folder; load and score files first "
                                 "(sdpo partition FILES runs the scorer)")
        inp = _read_scored_dir(path)
    elif (mapped := _mapped_dataset(data)) is not None:
        # A dataset memory-mapped from one whole Arrow stream file (the loader's output): mapped here, so its pages
        # can be released after each slice like a scored folder's.
        batches, schema, m = mapped
        fp = {"kind": type(data).__name__, "rows": data.num_rows, "columns": data.column_names}
        if ROW_ID in schema.names and data.num_rows:
            fp["row_ids_sha256"] = _row_ids_sha256(pa.Table.from_batches(batches, schema=schema).column(ROW_ID))
        rej = rejects if rejects is None or isinstance(rejects, pa.Table) else rejects_table(list(rejects))
        inp = PartitionInput(batches, schema, rejects=rej, fingerprint=fp, maps=[m])
        inp.release()
    else:
        try:
            table = _table_of(data)
        except AttributeError as e:
            raise PartitionError(f"cannot partition a {type(data).__name__}: give a datasets.Dataset, a "
                                 "pyarrow.Table or a scored folder") from e
        # Keep datasets' feature metadata on the schema so shards load back with the same features.
        batches = table.to_batches()
        rej = rejects if rejects is None or isinstance(rejects, pa.Table) else None
        if rejects is not None and rej is None:
            rej = rejects_table(list(rejects))
        fp = {"kind": type(data).__name__, "rows": table.num_rows, "columns": table.column_names}
        if ROW_ID in table.column_names and table.num_rows:
            fp["row_ids_sha256"] = _row_ids_sha256(table.column(ROW_ID))
        inp = PartitionInput(batches, table.schema, rejects=rej, fingerprint=fp)
    if inp.num_rows == 0:
        raise PartitionError("input has no rows to partition")
    if ROW_ID not in inp.schema.names:
        raise PartitionError(f"input has no '{ROW_ID}' column; load it with partitioner.load_preferences")
    return inp

