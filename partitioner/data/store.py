"""Where loaded rows go: Arrow IPC stream files in a work folder, written a block at a time.

The work folder is ``load_preferences(work_dir=...)``, or by default a new ``sdpo-load-<pid>-*`` folder in the
system temporary folder (``TMPDIR``), removed when the process exits; folders left by killed processes are
removed by the next load. The returned ``datasets.Dataset`` is memory-mapped from ``kept.arrow`` there, so the
folder must outlive the dataset: keep ``work_dir`` yours (e.g. beside a job's output) to keep the file.

Blocks are appended to ``kept.arrow`` while their schema stays the same. When a block brings other column types
(a pass-through column that is null in one block and text in the next, an integer column that turns float), a new
segment file starts; at the end the segments are rewritten once, streamed, into one file under the unified schema
(``pyarrow.unify_schemas(promote_options="permissive")``); a column whose types cannot be unified is kept as JSON
text.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa

from sdpo_core.columns import CHOSEN, PROMPT, REJECTED, ROW_ID, SOURCE

from ..io import StorageError
from .convert import JSON_TEXT

logger = logging.getLogger(__name__)

KEPT_FILE = "kept.arrow"
WORK_PREFIX = "sdpo-load-"
EMPTY_SCHEMA = pa.schema([(c, pa.string()) for c in (ROW_ID, SOURCE, PROMPT, CHOSEN, REJECTED)])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def new_work_dir(work_dir=None) -> Path:
    """A fresh folder for one load (see the module docstring)."""
    if work_dir is not None:
        path = Path(work_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=path))
        except OSError as e:
            raise StorageError(f"cannot use work folder {path}: {e.strerror or e}") from e
    base = Path(tempfile.gettempdir())
    for stale in base.glob(f"{WORK_PREFIX}*-*"):
        try:
            pid = int(stale.name[len(WORK_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=base))
    except OSError as e:
        raise StorageError(f"cannot create a work folder in {base}: {e.strerror or e} (set TMPDIR)") from e
    atexit.register(shutil.rmtree, path, True)
    return path


def _storage_error(path: Path, e: Exception) -> StorageError:
    return StorageError(f"cannot write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0][:150]}")


class KeptWriter:
    """Append kept-row tables to Arrow stream segments; :meth:`finish` gives the one file of the load.

    ``fingerprint`` is a hash of the rows written (their schema, row ids and other columns; the same rows
    give the same fingerprint in every run), used as the ``datasets`` fingerprint of the loaded dataset, so what
    ``datasets`` derives from it (``map`` results and the fingerprints they record in their files) does not depend
    on the work folder's random name.
    """

    def __init__(self, folder: Path):
        import xxhash

        self.folder = folder
        self.segments: list[Path] = []
        self.schema: pa.Schema | None = None
        self.rows = 0
        self._sink = self._writer = None
        self._hasher = xxhash.xxh3_64()

    @property
    def fingerprint(self) -> str:
        return self._hasher.hexdigest()

    def write(self, table: pa.Table) -> None:
        try:
            if self.schema is None or not table.schema.equals(self.schema, check_metadata=True):
                self._close()
                path = self.folder / f"segment-{len(self.segments):05d}.arrow"
                self._sink = pa.OSFile(str(path), "wb")
                self._writer = pa.ipc.new_stream(self._sink, table.schema)
                self.segments.append(path)
                self.schema = table.schema
                self._hasher.update(table.schema.serialize())
            self._writer.write_table(table)
            # The canonical text is fixed by row_id (its content hash); the other columns are hashed as IPC messages
            # (the bytes written, padding zeroed), so equal rows give equal fingerprints.
            identity = table.drop_columns([c for c in (PROMPT, CHOSEN, REJECTED) if c in table.column_names])
            for batch in identity.to_batches():
                self._hasher.update(batch.serialize())
        except OSError as e:
            raise _storage_error(self.segments[-1] if self.segments else self.folder, e) from e
        self.rows += table.num_rows

    def abort(self) -> None:
        """Close the open segment (a failed load; the work folder is removed with the process)."""
        try:
            self._close()
        except OSError:
            pass

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def finish(self) -> Path:
        """The kept rows as one Arrow stream file (``kept.arrow`` in the work folder)."""
        out = self.folder / KEPT_FILE
        try:
            self._close()
            if not self.segments:
                with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, EMPTY_SCHEMA):
                    pass
            elif len(self.segments) == 1:
                os.replace(self.segments[0], out)
            else:
                _unify(self.segments, out)
                for seg in self.segments:
                    seg.unlink(missing_ok=True)
        except OSError as e:
            raise _storage_error(out, e) from e
        return out


def _schemas(segments: list[Path]) -> list[pa.Schema]:
    out = []
    for seg in segments:
        with pa.memory_map(str(seg)) as source:
            out.append(pa.ipc.open_stream(source).schema)
    return out


def _target_schema(schemas: list[pa.Schema], as_json: set) -> pa.Schema:
    names: dict[str, list] = {}
    for schema in schemas:
        for f in schema:
            names.setdefault(f.name, []).append(f)
    fields = []
    for name, found in names.items():
        if name in as_json or any((f.metadata or {}).get(JSON_TEXT) for f in found):
            fields.append(pa.field(name, pa.string(), metadata={JSON_TEXT: b"1"}))
            as_json.add(name)
            continue
        try:
            unified = pa.unify_schemas([pa.schema([f.remove_metadata()]) for f in found], promote_options="permissive")
            fields.append(unified.field(name))
        except (pa.ArrowException, TypeError):
            logger.warning("column %r has different types in different rows; kept as JSON text", name)
            fields.append(pa.field(name, pa.string(), metadata={JSON_TEXT: b"1"}))
            as_json.add(name)
    return pa.schema(fields)


class _CastFailed(Exception):
    def __init__(self, name: str):
        self.name = name


def _column(batch: pa.RecordBatch, field: pa.Field, as_json: set) -> pa.Array:
    i = batch.schema.get_field_index(field.name)
    if i < 0:
        return pa.nulls(batch.num_rows, field.type)
    col, source_field = batch.column(i), batch.schema.field(i)
    if field.name in as_json:
        if (source_field.metadata or {}).get(JSON_TEXT):
            return col
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                         for v in col.to_pylist()], type=pa.string())
    if col.type == field.type:
        return col
    try:
        return col.cast(field.type)
    except (pa.ArrowException, TypeError):
        try:
            return pa.array(col.to_pylist(), type=field.type)
        except (pa.ArrowException, TypeError, ValueError):
            raise _CastFailed(field.name) from None


def _unify(segments: list[Path], out: Path) -> None:
    """Rewrite the segments into ``out`` under one schema (streamed, a batch at a time)."""
    schemas = _schemas(segments)
    as_json: set = set()
    while True:
        target = _target_schema(schemas, as_json)
        try:
            with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, target) as writer:
                for seg in segments:
                    with pa.memory_map(str(seg)) as source:
                        for batch in pa.ipc.open_stream(source):
                            arrays = [_column(batch, f, as_json) for f in target]
                            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=target))
            return
        except _CastFailed as e:
            logger.warning("column %r cannot be brought to one type; kept as JSON text", e.name)
            as_json.add(e.name)


def open_kept(path: Path):
    """The kept rows as a ``datasets`` memory-mapped table whose pages are not left in this process's resident set.

    Reading a stream touches every record batch's header; a page fault on the page cache can map a whole large
    folio (up to 2 MB) around it, so ``MemoryMappedTable.from_file`` would keep ~2 MB per batch resident. Mapping
    the file here lets us read it with ``MADV_RANDOM`` and drop the pages after (``MADV_DONTNEED``); they are
    read again on access. The table is still tied to ``path`` (pickling re-maps it by path, as datasets does).
    """
    import mmap

    from datasets.table import MemoryMappedTable

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    advise = getattr(m, "madvise", lambda advice: None)
    advise(getattr(mmap, "MADV_RANDOM", 0))
    reader = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(m)))
    batches = []
    for batch in reader:
        batches.append(batch)
        if len(batches) % 32 == 0:  # drop what reading the last headers mapped, as we go
            advise(getattr(mmap, "MADV_DONTNEED", 0))
    advise(getattr(mmap, "MADV_DONTNEED", 0))
    return MemoryMappedTable(pa.Table.from_batches(batches, schema=reader.schema), str(path))
