"""Writing the chunk shards: rows copied into curriculum order with bounded memory, each shard atomic and hashed.

:class:`ShardWriter` writes one shard (Arrow IPC stream, optional Parquet copy) through
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
from .folder import chunk_name
from .inputs import PartitionInput

BUCKET_BYTES = 48 << 20  # rows are distributed into buckets of about this size, then each bucket is sorted


class ShardWriter:
    """Write one shard (Arrow IPC stream, optional Parquet copy) under a temporary name; ``commit`` renames it.

    Assumptions: every batch has the schema given at construction.
    """

    def __init__(self, out_dir: Path, index: int, schema: pa.Schema, parquet: bool = False, fsync: bool = True):
        self.path = out_dir / chunk_name(index)
        self.rows = 0
        self._files = contextlib.ExitStack()
        self._sink = self._files.enter_context(atomic_file(self.path, fsync=fsync))
        self._writer = pa.ipc.new_stream(pa.PythonFile(self._sink, mode="w"), schema)
        self._pq = self._pq_sink = None
        if parquet:
            import pyarrow.parquet as pq

            self.parquet_path = out_dir / chunk_name(index, "parquet")
            self._pq_sink = self._files.enter_context(atomic_file(self.parquet_path, fsync=fsync))
            self._pq = pq.ParquetWriter(pa.PythonFile(self._pq_sink, mode="w"), schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        if self._pq is not None:
            self._pq.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self) -> dict:
        """Close, fsync and rename into place; returns the manifest entry's file fields."""
        self._writer.close()
        if self._pq is not None:
            self._pq.close()
        self._files.close()  # the atomic files rename into place (Parquet first: the Arrow shard is the last)
        entry = {"file": self.path.name, "rows": self.rows, "sha256": self._sink.sha.hexdigest()}
        if self._pq is not None:
            entry["parquet"] = {"file": self.parquet_path.name, "sha256": self._pq_sink.sha.hexdigest()}
        return entry

    def abort(self) -> None:
        """Drop the temporary files (the shard never appears)."""
        for closer in (self._writer.close, getattr(self._pq, "close", None)):
            with contextlib.suppress(Exception):
                if closer is not None:
                    closer()
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
                    writer = ShardWriter(out, ci, inp.schema, parquet=config.parquet, fsync=config.fsync)
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
