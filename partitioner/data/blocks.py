"""Blocks: the unit of rows every reader yields and the converter takes, and what is done to a stream of them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

ROWS_PER_BLOCK = 8192  # rows of Python lists / JSON arrays converted at a time


@dataclass
class Block:
    """Consecutive rows of one input: parsed by Arrow (``table``) or as Python objects (``rows``).

    ``rows`` items are a row (any object; a mapping when usable) or a :class:`RowReject` for a row that could not be
    parsed; ``originals`` holds each row's raw text where there is one (for the rejects file). ``loose`` are rejects
    without a position (CSV rows with the wrong number of fields), counted as rows of this block. ``utf8_checked``:
    the parser already checked that the table's strings are UTF-8 (JSON and CSV readers do; Arrow files may not).
    ``may_escape``: False when no text can hold a character JSON escapes (JSON source without any backslash).
    """

    start: int
    table: pa.Table | None = None
    rows: list | None = None
    originals: list | None = None
    loose: list = field(default_factory=list)
    utf8_checked: bool = False
    may_escape: bool = True

    @property
    def num_rows(self) -> int:
        return self.table.num_rows if self.table is not None else len(self.rows)

    def head(self, n: int) -> "Block":
        if self.table is not None:
            return Block(self.start, table=self.table.slice(0, n), loose=self.loose, utf8_checked=self.utf8_checked,
                         may_escape=self.may_escape)
        return Block(self.start, rows=self.rows[:n], originals=self.originals and self.originals[:n], loose=self.loose)


def python_rows_blocks(rows_with_originals, start: int = 0) -> Iterator[Block]:
    """Python rows (with their original text or object, for the rejects file) as blocks of ROWS_PER_BLOCK."""
    rows, originals = [], []
    for row, original in rows_with_originals:
        rows.append(row)
        originals.append(original)
        if len(rows) == ROWS_PER_BLOCK:
            yield Block(start, rows=rows, originals=originals)
            start, rows, originals = start + len(rows), [], []
    if rows:
        yield Block(start, rows=rows, originals=originals)


def limited(blocks: Iterator[Block], limit: int | None) -> Iterator[Block]:
    """The blocks up to ``limit`` rows (rows past it are not part of the load, not counted)."""
    seen = 0
    for block in blocks:
        if limit is not None and seen + block.num_rows + len(block.loose) > limit:
            block = block.head(max(0, limit - seen - len(block.loose)))
            if block.num_rows + len(block.loose):
                yield block
            return
        seen += block.num_rows + len(block.loose)
        yield block
        if limit is not None and seen >= limit:
            return


def prefetched(blocks: Iterator[Block], depth: int = 2) -> Iterator[Block]:
    """``blocks``, read ahead in a thread (parsing and decompression overlap the conversion)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for block in blocks:
                while not stop.is_set():
                    try:
                        q.put((block, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((None, e))
            return
        finally:
            close = getattr(blocks, "close", None)
            if stop.is_set() and close is not None:
                close()
        q.put((done, None))

    thread = threading.Thread(target=work, name="sdpo-load-reader", daemon=True)
    thread.start()
    try:
        while True:
            block, error = q.get()
            if error is not None:
                raise error
            if block is done:
                return
            yield block
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
