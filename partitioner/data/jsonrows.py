"""JSON rows, streamed: JSON lines (Arrow's parser where it is exact, Python's per line where it is not) and JSON
arrays / documents (one element at a time).

A block of JSON lines goes to ``pyarrow.json`` only when that gives exactly what Python's ``json`` gives and cannot
crash: no line with more than :data:`ARROW_MAX_BRACKETS` brackets (Arrow's parser recurses and crashes the process
on values nested some thirty thousand deep), no integer past 64 bits (Arrow turns it into a float), no string Arrow
would turn into a timestamp (re-read with those fields as text). Anything Arrow refuses (a bad line, a lone
surrogate escape, a number that changes type, duplicate keys) sends the block to Python's parser, line by line,
where each bad line is a counted reject with its own reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from .blocks import Block
from .formats import PreferenceDataError, RowReject

BLOCK_BYTES = 4 << 20  # bytes of JSON lines parsed at a time
ARROW_MAX_BRACKETS = 9000  # lines with more brackets than this are parsed by Python (Arrow crashes near 30,000 deep)
MAX_NESTING = 32  # values nested deeper are rejected (nested_too_deep): Arrow IPC allows 64, datasets recurses
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_DOCUMENT_BYTES = 256 << 20  # a .json file that is one object (not an array, not JSON lines) is parsed whole
_SURROGATE_ESCAPE = re.compile(r"\\[uU][dD][89a-fA-F]")
_LONG_DIGITS = re.compile(r"\d{19}")
_BOM = b"\xef\xbb\xbf"


class UnparsedNumber:
    """An integer literal past Python's digit limit (kept as its digits; the row is rejected)."""

    def __init__(self, digits: str):
        self.digits = digits

    def __str__(self) -> str:
        return self.digits


def _parse_int(text: str):
    return int(text) if len(text) <= 4000 else UnparsedNumber(text)


def unrepresentable(value, depth: int = 0) -> RowReject | None:
    """Why ``value`` cannot be stored in an Arrow column (a lone surrogate, an out-of-range integer), or None."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return RowReject("invalid_unicode", f"text holds a lone surrogate {value[e.start]!r} at {e.start}")
        return None
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return None
    if isinstance(value, UnparsedNumber):
        return RowReject("value_out_of_range", f"an integer of {len(value.digits)} digits")
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            # str() of an in-memory integer past 4300 digits raises (Python's limit): show its size instead
            shown = str(value)[:30] if value.bit_length() < 14_000 else f"of {value.bit_length()} bits"
            return RowReject("value_out_of_range", f"integer {shown} does not fit in 64 bits")
        return None
    if depth > 200:
        return RowReject("nested_too_deep", "value nested more than 200 levels deep")
    items = value.items() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        for v in (item if isinstance(value, dict) else (item,)):
            bad = unrepresentable(v, depth + 1)
            if bad is not None:
                return bad
    return None


def parse_json_value(text: str | bytes, what: str):
    """One JSON value, or a :class:`RowReject` saying why it cannot be a row."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return RowReject("invalid_utf8", f"{what}: {e.reason} at byte {e.start}")
    try:
        value = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        return RowReject("nested_too_deep", f"{what}: nested deeper than Python's JSON parser allows")
    except ValueError as e:
        return RowReject("invalid_json", f"{what}: {getattr(e, 'msg', str(e))[:200]}")
    if text.count("[") + text.count("{") > MAX_NESTING and nested_deeper(value, MAX_NESTING):
        return RowReject("nested_too_deep", f"{what}: nested deeper than {MAX_NESTING} levels")
    if _SURROGATE_ESCAPE.search(text) or _LONG_DIGITS.search(text):
        bad = unrepresentable(value)
        if bad is not None:
            return RowReject(bad.reason, f"{what}: {bad.detail}")
    return value


def nested_deeper(value, limit: int) -> bool:
    """Whether lists/objects in ``value`` nest more than ``limit`` deep (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def type_deeper(t: pa.DataType, limit: int) -> bool:
    """Whether lists/structs in type ``t`` nest more than ``limit`` deep (iterative)."""
    stack = [(t, 0)]
    while stack:
        t, depth = stack.pop()
        if depth > limit:
            return True
        if pa.types.is_struct(t):
            stack.extend((f.type, depth + 1) for f in t)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            stack.append((t.value_type, depth + 1))
    return False


def python_block(data: bytes, start: int) -> Block:
    """Every non-blank line parsed by Python's ``json``; a bad line is a :class:`RowReject` row."""
    rows, originals = [], []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        rows.append(parse_json_value(raw, f"line {start + len(rows) + 1}"))
        originals.append(raw)
    return Block(start, rows=rows, originals=originals)


def _arrow_safe(data: bytes) -> bool:
    """Whether no line of ``data`` has more than ARROW_MAX_BRACKETS brackets (Arrow's parser recursion)."""
    if data.count(b"[") + data.count(b"{") <= ARROW_MAX_BRACKETS:
        return True
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(data)]])
    for a, b in zip(starts[ends - starts > ARROW_MAX_BRACKETS].tolist(), ends[ends - starts > ARROW_MAX_BRACKETS].tolist()):
        if data.count(b"[", a, b) + data.count(b"{", a, b) > ARROW_MAX_BRACKETS:
            return False
    return True


def _valid_utf8(data: bytes) -> bool:
    """Whether ``data`` is UTF-8 (Arrow's validation, as a one-value binary -> string cast)."""
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int32))
    try:
        pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(data)]).cast(pa.string())
    except pa.ArrowInvalid:
        return False
    return True


def _replace_timestamps(t: pa.DataType) -> tuple[pa.DataType, bool]:
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return pa.string(), True
    if pa.types.is_struct(t):
        fields = [(f, *_replace_timestamps(f.type)) for f in t]
        return pa.struct([f.with_type(nt) for f, nt, _ in fields]), any(c for _, _, c in fields)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner, changed = _replace_timestamps(t.value_type)
        return (pa.list_(inner) if pa.types.is_list(t) else pa.large_list(inner)), changed
    return t, False


def _has_big_float(arr) -> bool:
    """Whether a float column (at any depth) holds a magnitude past 2**63: maybe an integer Arrow turned to float."""
    t = arr.type
    if pa.types.is_floating(t):
        import pyarrow.compute as pc

        m = pc.max(pc.abs(arr)).as_py()
        return m is not None and m >= 2.0**63
    if pa.types.is_struct(t):
        return any(_has_big_float(arr.field(i)) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_big_float(arr.flatten())
    return False


def arrow_block(data: bytes, start: int) -> Block | None:
    """``data`` parsed by Arrow when that is exact (see the module docstring), else None."""
    import pyarrow.json as pj

    if not _arrow_safe(data) or not _valid_utf8(data):  # Arrow's JSON parser lets bytes that are not UTF-8 through
        return None
    # one Arrow block for the whole piece: one chunk per column (no copies to combine them later)
    options = pj.ReadOptions(use_threads=False, block_size=len(data) + 1)
    try:
        table = pj.read_json(pa.BufferReader(data), read_options=options)
        if any(type_deeper(f.type, MAX_NESTING - 1) for f in table.schema):  # rows nested too deep: row by row
            return None
        schema, changed = [], False
        for f in table.schema:
            t, c = _replace_timestamps(f.type)
            schema.append(f.with_type(t))
            changed |= c
        if changed:  # strings that looked like dates: read again as the text they are
            table = pj.read_json(pa.BufferReader(data), read_options=options, parse_options=pj.ParseOptions(
                explicit_schema=pa.schema(schema)))
        table.validate(full=True)  # Arrow's parser can build arrays that fail their own checks (lists of nulls)
        if any(_has_big_float(c.combine_chunks()) for c in table.columns):
            return None
    except (pa.ArrowException, ValueError, UnicodeError, OverflowError):
        return None  # the exact row-by-row path reads it instead
    # In JSON text every character JSON escapes is written with a backslash: none in the source, none in the rows.
    return Block(start, table=table, utf8_checked=True, may_escape=b"\\" in data)


def jsonl_blocks(stream, limit_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """Blocks of JSON lines from a binary stream (a leading UTF-8 BOM is skipped)."""
    carry, start, first = b"", 0, True
    while True:
        chunk = stream.read(limit_bytes)
        if first:
            chunk = chunk[len(_BOM):] if chunk.startswith(_BOM) else chunk
            first = False
        if chunk:
            data = carry + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            data, carry = data[:cut + 1], data[cut + 1:]
        else:
            data, carry = carry, b""
        if data.strip():
            block = arrow_block(data, start) or python_block(data, start)
            start += block.num_rows
            yield block
        if not chunk:
            return


# --------------------------------------------------------------------------------------------- JSON arrays
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|"')
_SCALAR_END = re.compile(r"[,\]\s]")
_WS = re.compile(r"\s*")


class _Text:
    """Decoded text of a stream, read on demand (UTF-8; an invalid byte is a file-level error)."""

    def __init__(self, stream, name: str):
        import codecs

        self.stream, self.name = stream, name
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof, self.offset = "", 0, False, 0

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.stream.read(BLOCK_BYTES)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise PreferenceDataError(f"{self.name}: not valid UTF-8 ({e.reason} near byte "
                                      f"{self.offset + len(self.buf.encode('utf-8', 'surrogatepass'))})") from None
        if self.pos > (1 << 20):  # drop what was consumed
            self.offset += len(self.buf[:self.pos].encode("utf-8", "surrogatepass"))
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += text
        self.eof = not data
        return True

    def skip_ws(self) -> str:
        """The next non-whitespace character (read as needed), '' at the end."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def fail(self, what: str):
        line = self.buf.count("\n", 0, self.pos) + 1
        raise PreferenceDataError(f"{self.name}: invalid JSON ({what} near line {line} of the current read "
                                  f"window, character {self.pos})")

    def element_end(self) -> int:
        """End of the JSON value starting at ``pos``, found by bracket matching (strings skipped)."""
        if self.buf[self.pos] not in "[{\"":
            while True:
                m = _SCALAR_END.search(self.buf, self.pos)
                if m or not self.more():
                    return m.start() if m else len(self.buf)
        depth, at = 0, self.pos
        while True:
            for m in _TOKEN.finditer(self.buf, at):
                tok = m.group()
                if tok == '"':  # a string not yet complete: read more and rescan from it
                    at = m.start()
                    break
                depth += 1 if tok in "[{" else -1 if tok in "]}" else 0
                if depth <= 0:
                    return m.end()
            else:
                at = len(self.buf)
            if not self.more():
                self.fail("an unterminated value")


def json_array_rows(stream, name: str) -> Iterator[tuple[object, str]]:
    """``(row, original text)`` per element of a top-level JSON array; a bad element is a RowReject row."""
    text = _Text(stream, name)
    if text.skip_ws() != "[":
        text.fail("expected '['")
    text.pos += 1
    if text.skip_ws() == "]":
        return
    index = 0
    while True:
        if text.skip_ws() == "":
            text.fail("the array is not closed")
        end = text.element_end()
        raw = text.buf[text.pos:end]
        yield parse_json_value(raw, f"element {index}"), raw
        index += 1
        text.pos = end
        nxt = text.skip_ws()
        if nxt == "]":
            return
        if nxt != ",":
            text.fail("expected ',' or ']' after an element")
        text.pos += 1


def json_document_rows(data: bytes, name: str) -> list | None:
    """Rows of a ``.json`` file that is one JSON object: the items of its only list of objects, or the object
    itself as one row. None when the file is not one JSON value (then it is read as JSON lines).

    Raises:
        PreferenceDataError: the file is larger than MAX_DOCUMENT_BYTES, or not UTF-8.
    """
    if len(data) > MAX_DOCUMENT_BYTES:
        raise PreferenceDataError(f"{name}: a single JSON object of more than {MAX_DOCUMENT_BYTES} bytes; give large "
                                  "data as JSON lines or a JSON array (both are streamed)")
    try:
        obj = json.loads(data.decode("utf-8-sig"), parse_int=_parse_int)
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"{name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError):
        return None
    lists = [k for k, v in obj.items() if isinstance(v, list)] if isinstance(obj, dict) else []
    if len(lists) == 1 and obj[lists[0]] and all(isinstance(r, dict) for r in obj[lists[0]]):
        return obj[lists[0]]
    return [obj]
