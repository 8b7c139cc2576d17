"""Rejected rows: one record per row that did not make it, with a reason code and the original row.

Reason codes (``reason`` column):
  ``invalid_json``      a jsonl line that is not JSON
  ``invalid_utf8``      bytes that are not UTF-8
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

Rejects are written as an Arrow IPC *stream* file, readable by ``datasets.Dataset.from_file``,
``polars.read_ipc_stream`` and ``pyarrow.ipc.open_stream``.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa

from scorers.columns import SOURCE

from ..io import read_arrow_stream, write_arrow_stream

REJECTS_FILE = "rejects.arrow"

REASONS = (
    "invalid_json",
    "invalid_utf8",
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
    if isinstance(original, str):
        return original
    if isinstance(original, bytes):
        return original.decode("utf-8", errors="backslashreplace")
    try:
        return json.dumps(original, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(original)


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
