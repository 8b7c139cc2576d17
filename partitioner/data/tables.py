"""Tabular inputs as blocks of Arrow rows: CSV, Parquet, Arrow IPC (stream or file format), in-memory tables.

CSV: every cell is read as text first; a pass-through column becomes ``int64`` or ``float64`` only when every
non-empty cell of the whole file converts (one extra streamed pass), so a late row never breaks the read. An empty
unquoted cell is null; ``"NA"``, ``"null"`` and the like stay text. A row with another number of fields than the
header is a ``malformed_row`` reject; a header that repeats a column name is a file-level error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from .formats import PreferenceDataError, RowReject
from .blocks import Block

BLOCK_BYTES = 4 << 20
CANONICAL_TEXT = ("prompt", "chosen", "rejected")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def _sliced(batch, start: int) -> Iterator[Block]:
    """A record batch / table as blocks of about BLOCK_BYTES each."""
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    n = table.num_rows
    if not n:
        return
    per = max(1, min(n, int(BLOCK_BYTES / max(1, table.nbytes / n))))
    for lo in range(0, n, per):
        yield Block(start + lo, table=table.slice(lo, per))


def table_blocks(data) -> Iterator[Block]:
    """Blocks of a ``pyarrow.Table`` or a ``datasets.Dataset`` (its selection and order respected)."""
    if isinstance(data, pa.Table):
        start = 0
        for batch in data.to_batches():
            yield from _sliced(batch, start)
            start += batch.num_rows
        return
    start = 0
    for table in data.with_format("arrow").iter(batch_size=16384):
        yield from _sliced(table, start)
        start += table.num_rows


def arrow_blocks(path: Path, stream_factory: Callable | None) -> Iterator[Block]:
    """Blocks of an Arrow IPC file (file or stream format; memory-mapped, or streamed when compressed).

    Raises:
        PreferenceDataError: not an Arrow IPC file, or truncated (one line).
    """
    import pyarrow.ipc as ipc

    start = 0
    try:
        if stream_factory is not None:
            with stream_factory() as s:
                file_format = s.read(8)[:6] == b"ARROW1"
            with stream_factory() as s:
                if file_format:  # the file format is the stream format after 8 bytes (magic + padding), then a footer
                    s.read(8)
                for batch in ipc.open_stream(pa.PythonFile(s, mode="r")):
                    yield from _sliced(batch, start)
                    start += batch.num_rows
            return
        with open(path, "rb") as f:
            head = f.read(6)
        with pa.memory_map(str(path)) as source:
            if head == b"ARROW1":
                reader = ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = ipc.open_stream(source)
            for batch in batches:
                yield from _sliced(batch, start)
                start += batch.num_rows
    except (pa.ArrowException, OSError, EOFError) as e:
        raise PreferenceDataError(f"{path}: not a readable Arrow IPC file, or truncated ({_first_line(e)})") from None


def parquet_blocks(path: Path) -> Iterator[Block]:
    """Blocks of a Parquet file, read one batch at a time."""
    import pyarrow.parquet as pq

    start = 0
    try:
        pf = pq.ParquetFile(str(path))
        for batch in pf.iter_batches(batch_size=8192):
            yield from _sliced(batch, start)
            start += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise PreferenceDataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


# --------------------------------------------------------------------------------------------- CSV
def looks_binary(head: bytes) -> bool:
    """Whether the first bytes of a text file are not text: a NUL byte, or invalid UTF-8 (a character cut at the
    end of ``head`` is not held against it)."""
    if b"\x00" in head:
        return True
    for cut in range(4):  # up to 3 bytes of a multi-byte character may be cut off at the end
        try:
            head[: len(head) - cut].decode("utf-8")
            return False
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:
                return True
    return True


def _csv_header(stream_factory, path: Path) -> list[str]:
    import csv
    import io

    with stream_factory() as s:
        head = s.read(1 << 20)
    if looks_binary(head):
        raise PreferenceDataError(f"{path}: binary content (NUL bytes or invalid UTF-8 at the start), not a CSV file")
    text = head.decode("utf-8-sig", errors="replace")
    try:
        names = next(csv.reader(io.StringIO(text)), None)
    except csv.Error as e:
        raise PreferenceDataError(f"{path}: unreadable CSV header ({e})") from None
    if not names:
        raise PreferenceDataError(f"{path}: empty CSV file (no header)")
    seen = set()
    for n in names:
        if n in seen:
            raise PreferenceDataError(f"{path}: the CSV header repeats column {n!r}; every column needs its own name")
        seen.add(n)
    return names


def _csv_reader(stream_factory, path: Path, names: list[str], malformed: list):
    import pyarrow.csv as pcsv

    lock = threading.Lock()

    def on_invalid(row):
        with lock:
            malformed.append(row)
        return "skip"

    stream = stream_factory()
    reader = pcsv.open_csv(
        pa.PythonFile(stream, mode="r"),
        read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=True),
        parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                                            null_values=[""], quoted_strings_can_be_null=False),
    )
    return stream, reader


def _castable(arr: pa.Array, to: pa.DataType) -> bool:
    import pyarrow.compute as pc

    try:
        pc.cast(arr, to, safe=True)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def csv_blocks(path: Path, stream_factory) -> Callable[[], Iterator[Block]]:
    """An opener of a CSV file's blocks (see the module docstring); the column types are decided on first open."""
    state: dict = {}

    def read(types: dict | None) -> Iterator[tuple[pa.Table, list]]:
        names = state["names"]
        malformed: list = []
        stream, reader = None, None
        try:
            stream, reader = _csv_reader(stream_factory, path, names, malformed)
            for batch in reader:
                table = pa.Table.from_batches([batch])
                if types:
                    for name, t in types.items():
                        i = table.schema.get_field_index(name)
                        table = table.set_column(i, name, table.column(i).cast(t))
                yield table, malformed[:]
                malformed.clear()
            if malformed:
                yield pa.table({n: pa.array([], pa.string()) for n in names}), malformed[:]
        except (pa.ArrowException, OSError) as e:
            raise PreferenceDataError(f"{path}: not a readable CSV file ({_first_line(e)})") from None
        finally:
            if stream is not None:
                stream.close()

    def infer() -> dict:
        candidates = {n: [pa.int64(), pa.float64()] for n in state["names"] if n not in CANONICAL_TEXT}
        if not candidates:
            return {}
        for table, _ in read(None):
            for name, options in candidates.items():
                col = table.column(name).drop_null()
                if len(col):
                    options[:] = [t for t in options if _castable(col, t)]
        return {n: opts[0] for n, opts in candidates.items() if opts}

    def opener() -> Iterator[Block]:
        if "names" not in state:
            state["names"] = _csv_header(stream_factory, path)
            state["types"] = infer()
        start = 0
        for table, bad in read(state["types"]):
            loose = [RowReject("malformed_row", f"CSV line {r.number}: {r.actual_columns} fields, header has "
                                                f"{r.expected_columns}") for r in bad]
            yield Block(start, table=table, loose=list(zip(loose, [r.text for r in bad])), utf8_checked=True)
            start += table.num_rows

    return opener
