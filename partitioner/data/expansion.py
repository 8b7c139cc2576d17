"""A converted block's row accounting, and the converter of multi-response layouts (one row -> several pairs).

Rows are counted where they come in: *rows in = rows kept + rows rejected* counts input rows, whatever their layout,
and the pairs a row gives are counted beside them (``pairs``). For a pair layout a kept row is one pair. A
multi-response row (:mod:`.multi_response`) is kept when at least one of its pairs is; the reject records are then

* one per rejected row: a row :func:`.multi_response.expand_row` refuses, or one whose every pair the pair checks
  drop (its first pair's reason, e.g. ``duplicate_pair`` with ``drop_duplicates``, a null source column);
* one per pair dropped from a kept row (``pair_rejects``; in practice only ``duplicate_pair``).

So ``rejects.arrow`` holds ``rows_rejected + pairs_rejected`` records, and the next stages, which count the loader's
pairs, see *pairs kept + records* as their rows in.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .blocks import Block
from .convert import BlockConverter, table_rows
from .fields import RowReject
from .multi_response import PAIR_RANK, expand_row
from .rejects import reject_record


@dataclass
class BlockResult:
    """What one block gave: kept pairs, reject records and their counts."""

    kept: pa.Table | None
    records: list[dict]
    rows_in: int
    rows_kept: int  # input rows with at least one kept pair
    row_rejects: Counter = field(default_factory=Counter)  # reason -> rejected input rows
    pair_rejects: Counter = field(default_factory=Counter)  # reason -> pairs dropped from kept rows

    @property
    def pairs(self) -> int:
        return self.kept.num_rows if self.kept is not None else 0

    def check(self, where: str) -> None:
        """Raises AssertionError when rows in != kept + rejected, or the records do not match the counts."""
        rejected, dropped = sum(self.row_rejects.values()), sum(self.pair_rejects.values())
        if self.rows_in != self.rows_kept + rejected or len(self.records) != rejected + dropped:
            raise AssertionError(f"row accounting broken in {where}: {self.rows_in} in != {self.rows_kept} kept + "
                                 f"{rejected} rejected, or {len(self.records)} records != {rejected} rows + "
                                 f"{dropped} pairs")


def plain_result(block: Block, kept: pa.Table | None, records: list[dict]) -> BlockResult:
    """The result of a pair layout's block (one pair a row)."""
    return BlockResult(kept, records, block.num_rows + len(block.loose), kept.num_rows if kept is not None else 0,
                       Counter(r["reason"] for r in records))


class MultiPairConverter:
    """Expands the rows of a multi-response source into pairs and converts those with the :class:`BlockConverter`
    that ``pair_converter(conversational)`` gives for the pairs' kind (TRL's explicit-prompt layout of that kind)."""

    def __init__(self, source: str, fmt: str, pairing: str, pair_converter: Callable[[bool], BlockConverter]):
        self.source, self.fmt, self.pairing = source, fmt, pairing
        self._pair_converter = pair_converter
        self.pairs: BlockConverter | None = None  # made for the kind of the first usable row: DPOTrainer needs one
        self._kind: bool | None = None

    @property
    def duplicates(self) -> int:
        return self.pairs.duplicates if self.pairs is not None else 0

    @property
    def conversational(self) -> bool | None:
        return self.pairs.conversational if self.pairs is not None else None

    def _record(self, block: Block, pos: int, reason: str, detail: str, original) -> dict:
        if block.originals is not None:
            original = block.originals[pos]
        return reject_record(self.source, block.start + pos, "load", reason, detail, original)

    def convert(self, block: Block) -> BlockResult:
        """The block's kept pairs and rejects (see the module docstring for how they are counted).

        Raises:
            PreferenceDataError: from the pair conversion (e.g. a source column of no usable type).
        """
        records = [reject_record(self.source, None, "load", rj.reason, rj.detail, orig) for rj, orig in block.loose]
        rows = table_rows(block.table, np.arange(block.num_rows)) if block.table is not None else block.rows
        pair_rows, owners = [], []  # owners[k]: the block position of the row pair k comes from
        for pos, row in enumerate(rows):
            try:
                if isinstance(row, RowReject):
                    raise row
                conversational, pairs = expand_row(row, self.fmt, self.pairing)
                if self.pairs is None:
                    self.pairs, self._kind = self._pair_converter(conversational), conversational
                elif conversational != self._kind:
                    kinds = ("text", "conversational")
                    raise RowReject("mixed_format", f"{kinds[conversational]} row in an input of "
                                                    f"{kinds[self._kind]} rows")
            except RowReject as rj:
                records.append(self._record(block, pos, rj.reason, rj.detail, row))
                continue
            pair_rows.extend(pairs)
            owners.extend([pos] * len(pairs))
        row_rejects = Counter(r["reason"] for r in records)
        kept, pair_records = self.pairs.convert(Block(0, rows=pair_rows)) if pair_rows else (None, [])
        dropped = defaultdict(list)
        for rec in pair_records:
            dropped[owners[rec["row_index"]]].append(rec)
        pairs_of = Counter(owners)
        pair_rejects, rows_kept = Counter(), len(pairs_of)
        for pos, recs in sorted(dropped.items()):
            if len(recs) == pairs_of[pos]:  # nothing of the row is kept: the row is the reject
                rows_kept -= 1
                first = recs[0]
                records.append(self._record(block, pos, first["reason"], f"all {len(recs)} pairs dropped: "
                                            f"{first['detail']}", rows[pos]))
                row_rejects[first["reason"]] += 1
                continue
            for rec in recs:
                rank = pair_rows[rec["row_index"]][PAIR_RANK]
                records.append({**rec, "row_index": block.start + pos, "detail": f"pair {rank}: {rec['detail']}"})
                pair_rejects[rec["reason"]] += 1
        records.sort(key=lambda r: (r["row_index"] is not None, r["row_index"] or 0))
        return BlockResult(kept, records, len(rows) + len(block.loose), rows_kept, row_rejects, pair_rejects)
