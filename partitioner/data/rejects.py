"""Rejected rows: one record per row that did not make it, with a reason code and the original row.

Reason codes (``reason`` column):
  ``invalid_json``      a jsonl line that is not JSON
  ``invalid_utf8``      bytes that are not UTF-8
  ``invalid_unicode``   a lone surrogate escape (``"\ud800"``): valid JSON, but no UTF-8 text can hold it
  ``value_out_of_range`` a number no column can hold: an integer past Python's digit limit (4300 digits) or
                        outside the 64-bit range of an Arrow integer column
  ``nested_too_deep``   a value nested deeper than 32 levels (lists/objects; JSON past Python's recursion limit too)
  ``malformed_row``     a CSV row with another number of fields than the header
  ``not_an_object``     a row that is not a JSON object / mapping
  ``missing_field``     a required field is absent or null
  ``empty_text``        a prompt/chosen/rejected text (or a message's content) is empty or whitespace
  ``non_text``          a field has the wrong type (a number where text is expected, a message without role...)
  ``unknown_role``      a message role that is not system/user/assistant/tool (after ShareGPT mapping)
  ``no_assistant_turn`` chosen or rejected has no assistant turn, or the prompt ends with an assistant turn
  ``identical_pair``    chosen == rejected: no preference signal
  ``prompt_mismatch``   implicit-prompt rows whose chosen and rejected contexts differ (e.g. HH transcripts)
  ``mixed_format``      a row whose layout differs from the format detected for its file
  ``duplicate_pair``    an exact duplicate of an earlier pair (only with ``drop_duplicates=True``)
  ``prompt_too_long``   the prompt alone has >= max_length tokens: DPOTrainer would drop it silently
Multi-response rows (:mod:`partitioner.data.multi_response`; each gives several pairs):
  ``too_few_responses`` fewer than 2 responses, or an empty chosen / rejected list: no pair
  ``length_mismatch``   ``responses`` and ``ratings``/``scores`` of different lengths
  ``bad_rating``        a rating that is missing, null, not a number (text, true/false) or not finite
  ``tied_ratings``      every response has the same rating: no pair has a preference
  ``conflicting_ratings`` the same response twice with different ratings (or both chosen and rejected)

Rejects are written as they are found (:class:`RejectsWriter`), as an Arrow IPC *stream* file, readable by ``datasets.Dataset.from_file``,
``polars.read_ipc_stream`` and ``pyarrow.ipc.open_stream``.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa

from sdpo_core.columns import SOURCE

from ..io import read_arrow_stream, write_arrow_stream

REJECTS_FILE = "rejects.arrow"

REASONS = (
    "invalid_json",
    "invalid_utf8",
    "invalid_unicode",
    "value_out_of_range",
    "nested_too_deep",
    "malformed_row",
    "not_an_object",
    "missing_field",
    "empty_text",
    "non_text",
    "unknown_role",
    "no_assistant_turn",
    "identical_pair",
    "prompt_mismatch",
    "mixed_format",
    "duplicate_pair",
    "prompt_too_long",
    "too_few_responses",
    "length_mismatch",
    "bad_rating",
    "tied_ratings",
    "conflicting_ratings",
    "beyond_keep_fraction",  # partition: the order kept only its first keep_fraction of rows (SelectiveDPO)
)

REJECTS_SCHEMA = pa.schema(
    [
        (SOURCE, pa.string()),
        ("row_index", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("original", pa.string()),
    ]
)


def _to_json(original) -> str:
    if isinstance(original, bytes):
        original = original.decode("utf-8", errors="backslashreplace")
    if isinstance(original, str):
        return original.encode("utf-8", errors="backslashreplace").decode("utf-8")
    try:
        text = json.dumps(original, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(original)
        except RecursionError:
            text = "<not shown: nested too deep>"
        except ValueError:  # an in-memory integer past Python's 4300-digit str limit (JSON input never has one)
            text = "<not shown: an integer with too many digits>"
    # A lone surrogate cannot be written as UTF-8: keep it visible as an escape.
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def reject_record(source, row_index, stage: str, reason: str, detail: str, original) -> dict:
    if reason not in REASONS:
        raise ValueError(f"unknown reject reason {reason!r}")
    return {
        "source": None if source is None else str(source),
        "row_index": None if row_index is None else int(row_index),
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "original": _to_json(original),
    }


def rejects_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=REJECTS_SCHEMA)


def reason_counts(records_or_table) -> dict[str, int]:
    if isinstance(records_or_table, pa.Table):
        reasons = records_or_table.column("reason").to_pylist()
    else:
        reasons = [r["reason"] for r in records_or_table]
    return dict(sorted(Counter(reasons).items()))


def write_rejects(records_or_table, path: str | os.PathLike) -> str:
    """Write reject records (or a REJECTS_SCHEMA table) as an Arrow IPC stream; returns its sha256."""
    table = records_or_table if isinstance(records_or_table, pa.Table) else rejects_table(records_or_table)
    return write_arrow_stream(table, path)


def read_rejects(path: str | os.PathLike) -> pa.Table:
    """A rejects file as a ``pyarrow.Table`` (raises ``StorageError`` when unreadable)."""
    return read_arrow_stream(path)


def combine_rejects(*parts) -> pa.Table:
    """One REJECTS_SCHEMA table from tables and lists of reject records, in order."""
    tables = [p if isinstance(p, pa.Table) else rejects_table(list(p)) for p in parts if p is not None]
    return pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()


class RejectsWriter:
    """Append reject records to an Arrow IPC stream file as they are found (batched), counting them.

    Raises:
        StorageError: the file cannot be written (``partitioner.io.atomic_file``).
    """

    def __init__(self, path: str | os.PathLike, flush_rows: int = 4096):
        from ..io import atomic_file

        self.path = path
        self.count = 0
        self._pending: list[dict] = []
        self._flush_rows = flush_rows
        self._file = atomic_file(path, fsync=False)
        sink = self._file.__enter__()
        self._writer = pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), REJECTS_SCHEMA)

    def add(self, records: list[dict]) -> None:
        self._pending.extend(records)
        self.count += len(records)
        if len(self._pending) >= self._flush_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(rejects_table(self._pending))
            self._pending = []

    def close(self) -> None:
        """Write what is pending and put the file in place."""
        try:
            self._flush()
            self._writer.close()
        except BaseException as e:
            self._file.__exit__(type(e), e, e.__traceback__)
            raise
        self._file.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the file (its temporary name is removed)."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is dropped anyway
            pass
        err = RuntimeError("aborted")
        try:
            self._file.__exit__(RuntimeError, err, None)
        except RuntimeError:
            pass
