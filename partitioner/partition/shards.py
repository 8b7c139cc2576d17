"""Writing the chunk shards: rows copied into curriculum order with bounded memory, each shard atomic and hashed.

:class:`ShardWriter` writes one shard (Arrow IPC stream, Parquet file, or both) through
:func:`partitioner.io.atomic_file`: under a temporary name, hashed while written, renamed into place on
:meth:`~ShardWriter.commit`. :func:`write_shards` moves the rows by an external distribution sort.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..io import atomic_file
from .config import PartitionConfig
from .inputs import PartitionInput
from .layout import chunk_name

BUCKET_BYTES = 48 << 20  # rows are distributed into buckets of about this size, then each bucket is sorted


def _parquet_writer(sink, schema: pa.Schema):
    import pyarrow.parquet as pq

    return pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema)


def write_parquet(table: pa.Table, path: Path, fsync: bool = True) -> dict:
    """``table`` as a Parquet file written like a shard (atomically, hashed while written); the manifest entry."""
    with atomic_file(path, fsync=fsync) as sink:
        writer = _parquet_writer(sink, table.schema)
        writer.write_table(table)
        writer.close()
    return {"file": path.name, "sha256": sink.sha.hexdigest()}


class ShardWriter:
    """Write one shard under temporary names; ``commit`` renames it into place.

    ``shard_format``: ``arrow`` (an Arrow IPC stream), ``parquet`` (a Parquet file) or ``both`` (the Arrow stream
    plus a Parquet copy, the manifest entry's ``parquet``). Assumptions: every batch has the schema given at
    construction.
    """

    def __init__(self, out_dir: Path, index: int, schema: pa.Schema, shard_format: str = "arrow", fsync: bool = True):
        self.rows = 0
        self._files = contextlib.ExitStack()
        self._writers = []  # (path, hashing sink, writer): the primary shard first
        if shard_format in ("arrow", "both"):
            path = out_dir / chunk_name(index)
            sink = self._files.enter_context(atomic_file(path, fsync=fsync))
            self._writers.append((path, sink, pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), schema)))
        if shard_format in ("parquet", "both"):
            path = out_dir / chunk_name(index, "parquet")
            sink = self._files.enter_context(atomic_file(path, fsync=fsync))
            self._writers.append((path, sink, _parquet_writer(sink, schema)))
        self.path = self._writers[0][0]

    def write(self, batch: pa.RecordBatch) -> None:
        for _, _, writer in self._writers:
            writer.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self) -> dict:
        """Close, fsync and rename into place; returns the manifest entry's file fields."""
        for _, _, writer in self._writers:
            writer.close()
        self._files.close()  # the atomic files rename into place (a Parquet copy first: the primary is the last)
        (path, sink, _), *copies = self._writers
        entry = {"file": path.name, "rows": self.rows, "sha256": sink.sha.hexdigest()}
        for path, sink, _ in copies:
            entry["parquet"] = {"file": path.name, "sha256": sink.sha.hexdigest()}
        return entry

    def abort(self) -> None:
        """Drop the temporary files (the shard never appears)."""
        for _, _, writer in self._writers:
            with contextlib.suppress(Exception):
                writer.close()
        err = _Aborted()
        with contextlib.suppress(_Aborted):
            self._files.__exit__(_Aborted, err, None)


class _Aborted(Exception):
    """Thrown into the atomic files of an aborted shard so they remove their temporary files."""


def write_shards(inp: PartitionInput, perm: np.ndarray, bounds: np.ndarray, out: Path, config: PartitionConfig,
                  progress: bool = True) -> list[dict]:
    """Copy rows into the chunk shards in curriculum order with bounded memory (an external distribution sort).

    Pass 1 reads the input front to back and appends each row to the bucket file of its final position
    (bucket ``b`` holds final positions ``[b*R, (b+1)*R)``); pass 2 reads one bucket at a time, puts its rows
    in order with one ``take`` per output batch and streams them into the shards. Memory: one input slice + one
    bucket + 8 bytes per row (the order and its inverse), whatever the input size. Small inputs (one bucket)
    are taken from the input directly. Output record batches have exactly ``batch_rows`` rows (fewer at the
    end of a chunk), independent of the bucketing.
    """
    n = len(perm)
    row_bytes = max(1, inp.nbytes() // max(n, 1))
    bucket_rows = int(max(config.batch_rows, min(n, BUCKET_BYTES // row_bytes)))
    n_buckets = -(-n // bucket_rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n if n_buckets > 1 else n, unit="row", desc="partition", disable=None)
    tmp = out / f".buckets-{os.getpid()}"
    writer, pending = None, []
    try:
        if n_buckets > 1:
            tmp.mkdir()
            pos = np.empty(n, dtype=perm.dtype)  # final position of each input row
            pos[perm] = np.arange(n, dtype=perm.dtype)
            writers = [pa.ipc.new_stream(str(tmp / f"{b:05d}.arrow"), inp.schema) for b in range(n_buckets)]
            step = 1 << 15
            for bi, batch in enumerate(inp.batches):
                base = int(inp.offsets[bi])
                for lo in range(0, batch.num_rows, step):
                    sub = batch.slice(lo, step)
                    bk = pos[base + lo: base + lo + sub.num_rows] // bucket_rows
                    order = np.argsort(bk, kind="stable")
                    sbk = bk[order]
                    cuts = np.flatnonzero(np.diff(sbk)) + 1
                    taken = sub.take(pa.array(order))
                    for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(sbk)]]).tolist()):
                        writers[int(sbk[a])].write_batch(taken.slice(a, b - a))
                    del taken, sub
                    inp.release()
                    if bar is not None:
                        bar.update(len(bk))
            for w in writers:
                w.close()
            del pos
        entries: list[dict] = []
        ci = 0
        for b in range(n_buckets):
            first = b * bucket_rows  # final position of the bucket's first row
            wanted = perm[first:first + bucket_rows]  # input rows in final order
            if n_buckets == 1:
                src, local = pa.Table.from_batches(inp.batches, schema=inp.schema), wanted
            else:
                path = tmp / f"{b:05d}.arrow"
                with pa.OSFile(str(path), "rb") as f:
                    src = pa.ipc.open_stream(f).read_all().combine_chunks()
                path.unlink()
                # the bucket holds its rows in input order: the k-th smallest input position is row k
                local = np.searchsorted(np.sort(wanted), wanted)
            done = 0
            while done < len(wanted):
                if writer is None:
                    writer = ShardWriter(out, ci, inp.schema, shard_format=config.shard_format, fsync=config.fsync)
                buffered = sum(t.num_rows for t in pending)
                take_n = min(int(bounds[ci + 1]) - (first + done), len(wanted) - done, config.batch_rows - buffered)
                pending.append(src.take(pa.array(local[done:done + take_n])))
                done += take_n
                if bar is not None:
                    bar.update(take_n)
                end_of_chunk = first + done == int(bounds[ci + 1])
                if buffered + take_n == config.batch_rows or end_of_chunk:
                    table = pending[0] if len(pending) == 1 else pa.concat_tables(pending)
                    writer.write(table.combine_chunks().to_batches()[0])
                    pending.clear()
                if end_of_chunk:
                    entries.append(writer.commit())
                    writer, ci = None, ci + 1
            del src
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entries
