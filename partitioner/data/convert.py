"""One block of input rows -> kept rows in TRL's canonical columns (an Arrow table) + reject records.

Rows of a TRL *standard* input that Arrow parsed are checked column-wise (:func:`_fast_rows`: three non-null texts
that are not blank by Python's ``str.strip``, chosen != rejected, no column of another layout) and hashed straight
from the Arrow buffers; every other row goes through :func:`partitioner.data.formats.convert_row` one by one, which
gives each bad row its reason. Both paths give the same kept rows. Pass-through columns of Arrow blocks are taken
from the block as they are; those of Python rows are built per block (a column whose values have no common Arrow
type is kept as JSON text, marked in its field metadata).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdpo_core.columns import CHOSEN, PROMPT, REJECTED, ROW_ID, SOURCE

from .formats import PreferenceDataError, RowReject, consumed_columns, convert_row
from .identity import (DuplicateIndex, canonical_json, digest_keys, row_id_array, string_buffers,
                       text_pair_digests)
from .blocks import Block
from .jsonrows import MAX_NESTING, nested_deeper, type_deeper, unrepresentable
from .rejects import reject_record

logger = logging.getLogger(__name__)

RESERVED = (ROW_ID, SOURCE, PROMPT, CHOSEN, REJECTED)
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
JSON_TEXT = b"sdpo.json_text"  # field metadata key of a pass-through column kept as JSON text
OTHER_LAYOUT_COLUMNS = ("input", "preferred_output", "non_preferred_output", "conversations", "chosen_messages",
                        "rejected_messages")
# Every character for which Python's str.isspace() is true (what str.strip() removes); a test checks the list.
PY_SPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
            "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_SPACE) + "]*$"  # blank by Python's str.strip()
_BLANK_FIRST_BYTES = np.array(sorted({c.encode("utf-8")[0] for c in PY_SPACE}), dtype=np.uint8)
_BLANK_LAST_BYTES = np.array(sorted({c.encode("utf-8")[-1] for c in PY_SPACE}), dtype=np.uint8)


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _blank(col: pa.Array) -> np.ndarray:
    """Which strings are empty or whitespace by Python's ``str.strip`` (exact regex on the few that may be)."""
    offsets, data = string_buffers(col)
    lengths = np.diff(offsets)
    candidates = lengths == 0
    nonempty = ~candidates
    # a blank text starts with the first byte of a space and ends with the last byte of one
    candidates[nonempty] = np.isin(data[offsets[:-1][nonempty]], _BLANK_FIRST_BYTES) & np.isin(
        data[offsets[1:][nonempty] - 1], _BLANK_LAST_BYTES)
    where = np.flatnonzero(candidates)
    if len(where):
        exact = pc.fill_null(pc.match_substring_regex(col.take(pa.array(where)), _BLANK), False)
        exact = exact.to_numpy(zero_copy_only=False)
        candidates[where] = exact
    return candidates


def _fast_rows(table: pa.Table, fmt: str, utf8_checked: bool) -> np.ndarray | None:
    """Rows of an Arrow block that are valid TRL standard rows by column-wise checks (None: no such path)."""
    if fmt != "standard" or not all(c in table.column_names and _is_text_type(table.schema.field(c).type)
                                    for c in (PROMPT, CHOSEN, REJECTED)):
        return None
    try:
        cols = [_one_array(table.column(c)).cast(pa.string()) for c in (PROMPT, CHOSEN, REJECTED)]
        if not utf8_checked:  # Arrow files and tables may hold bytes that are not UTF-8
            for col in cols:
                col.validate(full=True)
    except pa.ArrowException:
        return None
    ok = np.ones(table.num_rows, dtype=bool)
    for col in cols:
        ok &= col.is_valid().to_numpy(zero_copy_only=False)
        ok &= ~_blank(col)
    ok &= ~pc.fill_null(pc.equal(cols[1], cols[2]), True).to_numpy(zero_copy_only=False)
    for name in OTHER_LAYOUT_COLUMNS:
        if name in table.column_names:
            ok &= ~table.column(name).is_valid().to_numpy(zero_copy_only=False)
    return ok


def table_rows(table: pa.Table, positions: np.ndarray) -> list:
    """Python rows of ``table`` at ``positions`` (a row Arrow cannot give as Python is a RowReject)."""
    if not len(positions):
        return []
    try:
        return table.take(pa.array(positions)).to_pylist()
    except (pa.ArrowException, UnicodeDecodeError, ValueError):
        out = []
        for p in positions.tolist():
            try:
                out.append(table.slice(p, 1).to_pylist()[0])
            except (pa.ArrowException, UnicodeDecodeError, ValueError) as e:
                out.append(RowReject("invalid_utf8", f"row holds text that is not UTF-8 ({str(e)[:80]})"))
        return out


def _one_array(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _take(data, positions: np.ndarray, n: int):
    """``data`` at ``positions`` (no copy when they are all ``n`` rows in order)."""
    if len(positions) == n and (n == 0 or (positions[0] == 0 and bool(np.all(np.diff(positions) == 1)))):
        return data
    return data.take(pa.array(positions))


def _json_text(values: list) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                    type=pa.string())


class BlockConverter:
    """Converts the blocks of one source (layout ``fmt``) and counts duplicates across every source of a load."""

    def __init__(self, source: str, fmt: str, mapping: Mapping | None, source_column: str | None, own_output: bool,
                 duplicates: DuplicateIndex, drop_duplicates: bool):
        self.source, self.fmt, self.mapping = source, fmt, mapping
        self.own_output = own_output
        self.source_column = SOURCE if own_output else source_column
        self.index, self.drop_duplicates = duplicates, drop_duplicates
        self.consumed = consumed_columns(fmt, mapping)
        self.duplicates = 0
        self.conversational: bool | None = None

    # ----------------------------------------------------------------------------------------- per block
    def convert(self, block: Block) -> tuple[pa.Table | None, list[dict]]:
        """``(kept rows, reject records)`` of one block (rows in = kept + rejected)."""
        rejects = [reject_record(self.source, None, "load", rj.reason, rj.detail, orig) for rj, orig in block.loose]
        n = block.num_rows
        table = block.table
        fast = _fast_rows(table, self.fmt, block.utf8_checked) if table is not None else None
        fast = fast if fast is not None else np.zeros(n, dtype=bool)
        slow_pos = np.flatnonzero(~fast)
        rows = table_rows(table, slow_pos) if table is not None else block.rows
        kept_pos, canon, digests = [], [], {}

        def reject(pos: int, rj: RowReject, row=None):
            original = row
            if block.originals is not None:
                original = block.originals[pos]
            elif table is not None and row is None:
                original = table_rows(table, np.array([pos]))[0]
            rejects.append(reject_record(self.source, block.start + pos, "load", rj.reason, rj.detail, original))

        for pos, row in zip(slow_pos.tolist(), rows):
            try:
                if isinstance(row, RowReject):
                    raise row
                canonical, _ = convert_row(row, self.fmt, self.mapping)
                digests[pos] = canonical_json(canonical[PROMPT], canonical[CHOSEN], canonical[REJECTED])
            except RowReject as rj:
                reject(pos, rj, row)
                continue
            except UnicodeEncodeError as e:
                reject(pos, RowReject("invalid_unicode", f"text holds a lone surrogate at {e.start}"), row)
                continue
            kept_pos.append(pos)
            canon.append(canonical)
        slow_rows = dict(zip(slow_pos.tolist(), rows))
        fast_pos = np.flatnonzero(fast)
        extras, bad, self._json_columns = self._extras(block, np.array(sorted(kept_pos + fast_pos.tolist()),
                                                                       dtype=np.int64), slow_rows)
        for pos, rj in bad.items():
            reject(pos, rj, slow_rows.get(pos))
        if bad:
            keep = [i for i, p in enumerate(kept_pos) if p not in bad]
            kept_pos, canon = [kept_pos[i] for i in keep], [canon[i] for i in keep]
        if not kept_pos and not len(fast_pos):
            return None, rejects
        return self._assemble(block, fast_pos, kept_pos, canon, digests, extras, reject), rejects

    # ----------------------------------------------------------------------------------------- columns
    def _extras(self, block: Block, positions: np.ndarray, slow_rows: dict) -> tuple[dict, dict, set]:
        """Pass-through columns at ``positions`` (name -> array), rows whose values no column can hold, and the
        columns kept as JSON text."""
        skip = set(self.consumed)
        if self.own_output:
            skip |= {ROW_ID, SOURCE}
        if block.table is not None:
            names = [c for c in block.table.column_names if c not in skip]
            sub = _take(block.table.select(names), positions, block.num_rows) if names else None
            return ({n: sub.column(n).combine_chunks() for n in names} if sub is not None else {}), {}, set()
        names: dict = {}
        for p in positions.tolist():
            row = slow_rows[p]
            for k in row:
                if k not in skip:
                    names.setdefault(k, None)
        out, bad, as_json = {}, {}, set()
        for name in names:
            values = [slow_rows[p].get(name) for p in positions.tolist()]
            try:
                out[name] = pa.array(values)
                if type_deeper(out[name].type, MAX_NESTING - 1):  # Arrow files hold 64 levels; datasets recurses
                    raise pa.ArrowInvalid("nested too deep")
            except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeError, RecursionError):
                for p, v in zip(positions.tolist(), values):
                    why = unrepresentable(v)
                    if why is None and nested_deeper(v, MAX_NESTING - 1):
                        why = RowReject("nested_too_deep", f"nested deeper than {MAX_NESTING} levels")
                    if why is not None and p not in bad:
                        bad[p] = RowReject(why.reason, f"column {name!r}: {why.detail}")
                out[name] = None  # built again below, without the bad rows
        if bad or any(v is None for v in out.values()):
            keep = [p for p in positions.tolist() if p not in bad]
            for name in out:
                values = [slow_rows[p].get(name) for p in keep]
                try:
                    out[name] = pa.array(values)
                except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeError, RecursionError):
                    logger.warning("%s: column %r has values of different types; kept as JSON text", self.source, name)
                    out[name] = _json_text(values)
                    as_json.add(name)
        return out, bad, as_json

    def _canonical(self, block, fast_pos, kept_pos, canon, order) -> tuple[list[pa.Array], bool]:
        conversational = {isinstance(c[CHOSEN], list) for c in canon}
        if len(fast_pos):
            conversational.add(False)
        if len(conversational) > 1:
            raise PreferenceDataError(f"{self.source}: rows mix conversational and standard pairs (column mapping "
                                      "values of both kinds); DPOTrainer needs one kind per dataset")
        conv = conversational.pop()
        arrays = []
        for key in (PROMPT, CHOSEN, REJECTED):
            slow = pa.array([c[key] for c in canon], type=MESSAGES if conv else pa.string())
            if len(fast_pos):
                fast = _one_array(_take(block.table.column(key), fast_pos, block.num_rows)).cast(pa.string())
                slow = _take(pa.concat_arrays([fast, slow]), order, len(order)) if canon else fast
            arrays.append(slow)
        return arrays, conv

    def _assemble(self, block, fast_pos, kept_pos, canon, digests, extras, reject) -> pa.Table | None:
        import hashlib

        positions = np.concatenate([fast_pos, np.array(kept_pos, dtype=np.int64)])
        order = np.argsort(positions, kind="stable")
        positions = positions[order]
        (prompt, chosen, rejected), conv = self._canonical(block, fast_pos, kept_pos, canon, order)
        if self.conversational is None:
            self.conversational = conv
        if len(fast_pos):
            fast_digests = text_pair_digests(*(_one_array(_take(block.table.column(k), fast_pos, block.num_rows))
                                               for k in (PROMPT, CHOSEN, REJECTED)), may_escape=block.may_escape)
            all_digests = fast_digests + [hashlib.sha256(digests[p]).digest() for p in kept_pos]
            if len(kept_pos):
                all_digests = [all_digests[i] for i in order.tolist()]
        else:
            all_digests = [hashlib.sha256(digests[p]).digest() for p in kept_pos]
        columns = {PROMPT: prompt, CHOSEN: chosen, REJECTED: rejected}
        keep = np.ones(len(positions), dtype=bool)
        if self.source_column is not None:
            if not self.own_output:
                src = extras.get(self.source_column)
            elif block.table is not None:
                src = _one_array(_take(block.table.column(SOURCE), positions, block.num_rows))
            else:
                src = pa.array([_text_or_none(_row(block, p).get(SOURCE)) for p in positions.tolist()], pa.string())
            if src is None:
                src = pa.nulls(len(positions), pa.string())
            for i in np.flatnonzero(~src.is_valid().to_numpy(zero_copy_only=False)).tolist():
                keep[i] = False
                reject(int(positions[i]), RowReject("missing_field", f"source column {self.source_column!r} is null"),
                       _row(block, int(positions[i])))
            sources = src.cast(pa.string()) if not pa.types.is_string(src.type) else src
        else:
            sources = pa.array([self.source] * len(positions), type=pa.string())
        keys, hex_ids = digest_keys(all_digests)
        if not keep.all():
            sel = np.flatnonzero(keep)
            keys = keys[sel]
            hex_ids = b"".join(hex_ids[16 * i:16 * i + 16] for i in sel.tolist())
        occurrences = self.index.occurrences(keys)
        self.duplicates += int((occurrences > 0).sum())
        if self.drop_duplicates and occurrences.any():
            sel = np.flatnonzero(keep)
            for j in np.flatnonzero(occurrences > 0).tolist():
                i = int(sel[j])
                keep[i] = False
                reject(int(positions[i]), RowReject("duplicate_pair", f"same pair as row_id "
                                                    f"{hex_ids[16 * j:16 * j + 16].decode()}"), _row(block, int(positions[i])))
            first = np.flatnonzero(occurrences == 0)
            hex_ids = b"".join(hex_ids[16 * j:16 * j + 16] for j in first.tolist())
            occurrences = occurrences[first]
        if not keep.any():
            return None
        sel = np.flatnonzero(keep)
        out = {ROW_ID: row_id_array(hex_ids, occurrences), SOURCE: _take(sources, sel, len(keep))}
        out.update({k: _take(v, sel, len(keep)) for k, v in columns.items()})
        fields = [pa.field(ROW_ID, pa.string()), pa.field(SOURCE, pa.string())] + [
            pa.field(k, v.type) for k, v in columns.items()]
        arrays = list(out.values())
        for name, arr in extras.items():
            if self.own_output and name == SOURCE:
                continue
            arr = _take(arr, sel, len(keep)) if len(arr) == len(keep) else arr
            meta = {JSON_TEXT: b"1"} if name in self._json_columns else None
            fields.append(pa.field(f"orig_{name}" if name in RESERVED else name, arr.type, metadata=meta))
            arrays.append(arr)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _text_or_none(value):
    return None if value is None else value if isinstance(value, str) else str(value)


def _row(block: Block, pos: int):
    if block.rows is not None:
        return block.rows[pos]
    return table_rows(block.table, np.array([pos]))[0]
