"""Names and readers of a partition folder's data files: the chunk shards (Arrow IPC stream or Parquet) and the card.

One reader per shard format: :func:`read_shard` (a ``pyarrow.Table``, optionally only some columns) and
:func:`shard_dataset` (a ``datasets.Dataset``); which format a shard is comes from its suffix. The writers are
:class:`partitioner.partition.shards.ShardWriter` (shards) and :func:`partitioner.partition.card.write_card`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa

from ..io import StorageError

SHARD_FORMATS = ("arrow", "parquet", "both")  # both: the Arrow shard plus a Parquet copy of it
CARD = "README.md"
REJECTS_PARQUET = "rejects.parquet"  # Parquet copy of rejects.arrow beside Parquet shards (one builder per repository)
CARD_MARKER = "<!-- sdpo-curriculum partition card: written with manifest.json, its sha256 is card_sha256 -->"


def chunk_name(index: int, suffix: str = "arrow") -> str:
    return f"chunk-{index:03d}.{suffix}"


def split_name(index: int) -> str:
    """The chunk's split in the card (``chunk_000``: split names must match ``\\w+(\\.\\w+)*``)."""
    return f"chunk_{index:03d}"


def is_parquet(path: str | os.PathLike) -> bool:
    return str(path).endswith(".parquet")


def read_shard(path: str | os.PathLike) -> pa.Table:
    """A shard's rows: an Arrow stream memory-mapped, a Parquet file decoded (with the Arrow types it was written
    from).

    Raises:
        StorageError: the file is missing, truncated or not a readable shard of its format.
    """
    path = Path(path)
    try:
        if is_parquet(path):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(str(path), memory_map=True).read()
            schema = pa.schema([f.with_type(_item_lists(f.type)) for f in table.schema], metadata=table.schema.metadata)
            same = [str(f.type) for f in schema] == [str(f.type) for f in table.schema]  # equals() ignores the names
            return table if same else table.cast(schema)
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_stream(source).read_all()
        table.validate()  # buffer sizes against lengths: no later read leaves the mapping
        return table
    except (pa.ArrowInvalid, OSError) as e:
        raise _unreadable(path, e) from e


def iter_shard(path: str | os.PathLike, columns: list[str]):
    """A shard's ``columns`` (those it has) batch by batch, so memory stays at one batch (a Parquet row group)
    whatever the shard's size: what statistics over whole chunks read.

    Raises:
        StorageError: as :func:`read_shard`.
    """
    path = Path(path)
    try:
        with contextlib.ExitStack() as stack:
            if is_parquet(path):
                import pyarrow.parquet as pq

                pf = stack.enter_context(pq.ParquetFile(str(path), memory_map=True))
                batches = pf.iter_batches(columns=[c for c in columns if c in pf.schema_arrow.names])
            else:
                batches = pa.ipc.open_stream(stack.enter_context(pa.memory_map(str(path), "r")))
            for batch in batches:
                batch.validate()
                yield batch.select([c for c in columns if c in batch.schema.names])
    except (pa.ArrowInvalid, OSError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, error: Exception) -> StorageError:
    what = "Parquet file" if is_parquet(path) else "Arrow IPC stream"
    return StorageError(f"{path.name} is not a readable {what}: {str(error).splitlines()[0][:160]}")


def _item_lists(t: pa.DataType) -> pa.DataType:
    """``t`` with Arrow's list field name ``item`` where Parquet's nested-type convention gave ``element``: a
    Parquet shard reads back with the types of the Arrow rows it was written from (and of the manifest)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        item = pa.field("item", _item_lists(t.value_type), nullable=t.value_field.nullable)
        if pa.types.is_fixed_size_list(t):
            return pa.list_(item, t.list_size)
        return pa.large_list(item) if pa.types.is_large_list(t) else pa.list_(item)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_item_lists(t.field(i).type)) for i in range(t.num_fields)])
    return t


def shard_dataset(path: str | os.PathLike):
    """A shard as a ``datasets.Dataset`` with the features its schema records: an Arrow stream memory-mapped in
    place (``Dataset.from_file``), a Parquet file decoded into memory (no cache file is written).

    Raises:
        StorageError: as :func:`read_shard`.
    """
    from datasets import Dataset

    if is_parquet(path):
        from datasets.table import InMemoryTable

        return Dataset(InMemoryTable(read_shard(path)))
    try:
        return Dataset.from_file(str(path))
    except (OSError, ValueError) as e:
        raise StorageError(f"{Path(path).name} is not a readable Arrow IPC stream: "
                           f"{str(e).splitlines()[0][:120]}") from None


def is_card(path: Path) -> bool:
    """Whether ``path`` is a card this package wrote (so a rerun may replace it; anyone else's README is kept)."""
    try:
        with open(path, "rb") as f:
            return CARD_MARKER.encode() in f.read(16 << 20)
    except OSError:
        return False
