"""Load preference data from files, folders, in-memory tables or the Hub into TRL's canonical form.

``load_preferences(inputs)`` returns an Arrow-backed ``datasets.Dataset`` with the columns ``row_id``,
``source``, ``prompt``, ``chosen``, ``rejected`` and the inputs' other columns passed through. Every row that
cannot be used goes to the rejects (``partitioner.rejects``) with a reason; rows in = rows kept + rows
rejected, checked here.

Inputs (one, a list, or a ``{source_name: input}`` mapping; ``"name=path"`` strings name a source too):
  * files: ``.jsonl``/``.ndjson``, ``.json`` (an array of objects, or JSON lines), ``.parquet``,
    ``.arrow`` (IPC stream or file format), ``.csv``; globs (each matched file is a source named by its stem,
    unless a name is given, which they then share);
  * folders written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks the split);
  * ``datasets.Dataset``/``DatasetDict``, ``polars.DataFrame``, ``pyarrow.Table``, a list of dicts;
  * Hub dataset names (``org/name``), loaded with ``datasets.load_dataset(name, split=split)``.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from scorers.columns import CHOSEN, PROMPT, REJECTED, ROW_ID, SOURCE

from .formats import FORMATS, PreferenceDataError, RowReject, convert_row, detect_format
from .rejects import reject_record, write_rejects

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow", ".csv")
RESERVED = (ROW_ID, SOURCE, PROMPT, CHOSEN, REJECTED)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    source: str
    format: str | None = None
    rows_in: int = 0
    rows_kept: int = 0
    rejects: Counter = field(default_factory=Counter)
    duplicates: int = 0

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_rejected": sum(self.rejects.values()),
            "reject_reasons": dict(sorted(self.rejects.items())),
            "duplicates": self.duplicates,
        }


@dataclass
class LoadReport:
    """Row accounting of a load: per source and in total; ``rejects`` holds the reject records."""

    sources: list[SourceReport] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)

    @property
    def rows_in(self) -> int:
        return sum(s.rows_in for s in self.sources)

    @property
    def rows_kept(self) -> int:
        return sum(s.rows_kept for s in self.sources)

    @property
    def rows_rejected(self) -> int:
        return len(self.rejects)

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_rejected": self.rows_rejected,
            "sources": [s.as_dict() for s in self.sources],
        }


@dataclass
class LoadConfig:
    """How inputs are read (the keyword arguments of :func:`load_preferences`, and every command's loading flags)."""

    format: str | None = field(default=None, metadata={
        "help": "Force a layout (default: detected per input).", "choices": FORMATS})
    column_mapping: str | None = field(default=None, metadata={
        "help": "Other layouts: prompt=COL,chosen=COL,rejected=COL[,system=COL]."})
    source_column: str | None = field(default=None, metadata={"help": "Take each row's source tag from this column."})
    split: str = field(default="train", metadata={"help": "Split of a DatasetDict folder or a Hub dataset."})
    drop_duplicates: bool = field(default=False, metadata={"help": "Reject exact duplicate pairs."})
    limit_per_source: int | None = field(default=None, metadata={"help": "Read only the first N rows of each input."})

    def as_kwargs(self) -> dict:
        """The keyword arguments of :func:`load_preferences`."""
        return {"format": self.format, "column_mapping": parse_column_mapping(self.column_mapping),
                "source_column": self.source_column, "split": self.split, "drop_duplicates": self.drop_duplicates,
                "limit_per_source": self.limit_per_source}


# --------------------------------------------------------------------------------------------- reading
def _iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(index, row) per non-blank line; a bad line yields a RowReject instead of a row."""
    with open(path, "rb") as f:
        index = 0
        for raw in f:
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield index, RowReject("invalid_utf8", f"line {index + 1}: {e.reason} at byte {e.start}"), raw
                index += 1
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield index, RowReject("invalid_json", f"line {index + 1}: {e.msg}"), text
                index += 1
                continue
            yield index, row, row
            index += 1


def _read_json(path: Path) -> Iterator:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        for i, row in enumerate(rows):
            yield i, row, row
    elif stripped.startswith("{"):
        # Either one object holding the rows under a single list key, or JSON lines in a .json file.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(path)
            return
        lists = [k for k, v in obj.items() if isinstance(v, list)] if isinstance(obj, dict) else []
        if len(lists) == 1 and all(isinstance(r, dict) for r in obj[lists[0]]):
            for i, row in enumerate(obj[lists[0]]):
                yield i, row, row
        else:
            yield 0, obj, obj
    elif not stripped:
        return
    else:
        raise PreferenceDataError(f"{path}: not a JSON array or JSON lines")


def _read_arrow_table(path: Path) -> pa.Table:
    import pyarrow.ipc as ipc

    with open(path, "rb") as f:
        head = f.read(6)
    try:
        if head == b"ARROW1":
            with pa.memory_map(str(path)) as source:
                return ipc.open_file(source).read_all()
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).read_all()
    except pa.ArrowInvalid as e:
        raise PreferenceDataError(f"{path}: not a readable Arrow IPC file ({str(e).splitlines()[0]})") from None


def _table_rows(table) -> Iterator:
    for i, row in enumerate(table.to_pylist()):
        yield i, row, row


def _read_file(path: Path) -> Iterator:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _iter_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return _table_rows(pq.read_table(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise PreferenceDataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if suffix == ".arrow":
        return _table_rows(_read_arrow_table(path))
    if suffix == ".csv":
        import pyarrow.csv as pcsv

        try:
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
        except (pa.ArrowInvalid, OSError) as e:
            raise PreferenceDataError(f"{path}: not a readable CSV file ({str(e).splitlines()[0]})") from None
        return _table_rows(table)
    raise PreferenceDataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _from_dataset_obj(obj, split: str, name: str):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise PreferenceDataError(f"{name}: no split {split!r}; splits are {', '.join(obj)}")
        obj = obj[split]
    # A selected/filtered/shuffled Dataset keeps all rows in ``.data`` behind an indices mapping: read through it.
    return obj.with_format("arrow")[:] if isinstance(obj, datasets.Dataset) else obj


def _expand(inputs, split: str) -> list[tuple[str, object, str]]:
    """Normalise inputs to [(source_name, rows_iterator_factory_arg, description)]."""
    if isinstance(inputs, Mapping):
        items = [(str(k), v) for k, v in inputs.items()]
    elif isinstance(inputs, (list, tuple)) and not (inputs and isinstance(inputs[0], Mapping)):
        items = [(None, v) for v in inputs]
    else:
        items = [(None, inputs)]
    if not items:
        raise PreferenceDataError("no inputs given")
    out = []
    for name, item in items:
        if isinstance(item, (str, os.PathLike)):
            s = str(item)
            if name is None and "=" in s and not Path(s).exists():
                name, s = s.split("=", 1)
            out.extend(_expand_path(s, name, split))
        else:
            out.append((name or f"input{len(out)}", item, type(item).__name__))
    names = [n for n, _, _ in out]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup and not all(isinstance(n, str) for n in dup):
        raise PreferenceDataError(f"two inputs share the source name {dup[0]!r}; name them with name=path")
    return out


def _expand_path(s: str, name: str | None, split: str) -> list:
    p = Path(s).expanduser()
    if any(ch in s for ch in "*?["):
        files = sorted(Path(f) for f in _glob.glob(str(p), recursive=True))
        if not files:
            raise PreferenceDataError(f"no files match {s!r}")
        return [(name or f.stem, f, str(f)) for f in files]
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return [(name or p.name, ("disk", p), str(p))]
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise PreferenceDataError(f"{p}: folder has no data files ({', '.join(FILE_SUFFIXES)}) and no saved dataset")
        return [(name or f.stem, f, str(f)) for f in files]
    if p.exists():
        return [(name or p.stem, p, str(p))]
    if _HUB_NAME.match(s) and not s.endswith(FILE_SUFFIXES):
        return [(name or s.split("/")[-1], ("hub", s), s)]
    raise PreferenceDataError(f"no such file or folder: {s}")


def _rows_of(item, split: str, desc: str) -> Iterator:
    if isinstance(item, Path):
        return _read_file(item)
    if isinstance(item, tuple) and item[0] == "disk":
        import datasets

        try:
            obj = datasets.load_from_disk(str(item[1]))
        except (FileNotFoundError, ValueError) as e:
            raise PreferenceDataError(f"{item[1]}: not a readable saved dataset ({str(e).splitlines()[0]})") from None
        return _table_rows(_from_dataset_obj(obj, split, desc))
    if isinstance(item, tuple) and item[0] == "hub":
        import datasets

        try:
            obj = datasets.load_dataset(item[1], split=split)
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PreferenceDataError(
                f"could not load {item[1]!r} from the Hugging Face Hub (offline or not found?): {first[:200]}"
            ) from None
        return _table_rows(_from_dataset_obj(obj, split, desc))
    try:
        import polars as pl

        if isinstance(item, pl.DataFrame):
            return _table_rows(item.to_arrow())
    except ImportError:
        pass
    if isinstance(item, pa.Table):
        return _table_rows(item)
    if isinstance(item, list):
        return ((i, r, r) for i, r in enumerate(item))
    try:
        return _table_rows(_from_dataset_obj(item, split, desc))
    except (ImportError, AttributeError, TypeError):
        raise PreferenceDataError(f"cannot read input of type {type(item).__name__}") from None


# --------------------------------------------------------------------------------------------- identity
def pair_content_hash(prompt, chosen, rejected) -> str:
    """16-hex content hash of a canonical pair: the same pair gets the same id in every run."""
    payload = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _is_conversational_value(value) -> bool:
    return isinstance(value, list)


# --------------------------------------------------------------------------------------------- main API
def load_preferences_with_rejects(
    inputs,
    *,
    format: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    drop_duplicates: bool = False,
    split: str = "train",
    source_column: str | None = None,
    limit_per_source: int | None = None,
) -> tuple:
    """Like ``load_preferences`` but returns ``(dataset, report)``; ``report.rejects`` holds the reject records.

    Raises:
        PreferenceDataError: unreadable input, unknown layout (the message lists the columns seen), an unknown
            ``format``, inputs that mix conversational and standard rows, or no usable row at all.
    """
    if format is not None and format not in FORMATS:
        raise PreferenceDataError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if limit_per_source is not None and limit_per_source < 1:
        raise PreferenceDataError(f"limit_per_source must be >= 1, got {limit_per_source}")
    if column_mapping:
        bad = set(column_mapping) - {"prompt", "chosen", "rejected", "system"}
        if bad:
            raise PreferenceDataError(f"column mapping keys must be prompt, chosen, rejected, system; got {sorted(bad)}")
        format = "mapping"
    report = LoadReport()
    kept: list[dict] = []
    seen: Counter = Counter()
    for source, item, desc in _expand(inputs, split):
        rep = SourceReport(source=source)
        report.sources.append(rep)
        rows = list(_rows_of(item, split, desc))
        if limit_per_source is not None:
            rows = rows[:limit_per_source]  # rows past the limit are not part of this job (not counted)
        rep.rows_in = len(rows)
        # This loader's own output read again (row_id + source columns, e.g. a save_to_disk folder of it): validated
        # like any input, its sources kept, its row ids recomputed from the content (the same, as they are hashes).
        own_output = bool(rows) and isinstance(rows[0][1], Mapping) and {ROW_ID, SOURCE} <= set(rows[0][1])
        row_source_column = SOURCE if own_output else source_column
        if not rows:
            logger.warning("%s: no rows", desc)
            continue
        fmt = format
        if fmt is None:
            good = [r for _, r, _ in rows if not isinstance(r, RowReject)]
            columns = sorted({k for r in good[:100] if isinstance(r, Mapping) for k in r})
            fmt = detect_format(good[:100], columns) if good else "standard"
        rep.format = fmt
        for index, row, original in rows:
            try:
                if isinstance(row, RowReject):
                    raise row
                canonical, extras = convert_row(row, fmt, column_mapping)
            except RowReject as rj:
                rep.rejects[rj.reason] += 1
                report.rejects.append(reject_record(source, index, "load", rj.reason, rj.detail, original))
                continue
            content_id = pair_content_hash(canonical[PROMPT], canonical[CHOSEN], canonical[REJECTED])
            if seen[content_id]:
                rep.duplicates += 1
                if drop_duplicates:
                    rep.rejects["duplicate_pair"] += 1
                    report.rejects.append(
                        reject_record(source, index, "load", "duplicate_pair", f"same pair as row_id {content_id}", original)
                    )
                    continue
                row_id = f"{content_id}-{seen[content_id]}"
            else:
                row_id = content_id
            seen[content_id] += 1
            src = source
            if own_output:
                extras.pop(ROW_ID, None)
            if row_source_column is not None:
                if extras.get(row_source_column) is None:
                    rep.rejects["missing_field"] += 1
                    report.rejects.append(
                        reject_record(source, index, "load", "missing_field", f"source column {row_source_column!r} is null", original)
                    )
                    continue
                src = str(extras.pop(SOURCE) if own_output else extras[row_source_column])
            out = {ROW_ID: row_id, SOURCE: src, **canonical}
            for k, v in extras.items():
                out[f"orig_{k}" if k in RESERVED else k] = v
            kept.append(out)
            rep.rows_kept += 1
        assert rep.rows_in == rep.rows_kept + sum(rep.rejects.values()), "row accounting broken"
    if report.rows_in != report.rows_kept + report.rows_rejected:
        raise AssertionError("row accounting broken: rows in != kept + rejected")
    kinds = {}
    for r in kept:
        kinds.setdefault(_is_conversational_value(r[CHOSEN]), set()).add(r[SOURCE])
    if len(kinds) > 1:
        raise PreferenceDataError(
            f"inputs mix conversational ({', '.join(sorted(kinds[True]))}) and standard "
            f"({', '.join(sorted(kinds[False]))}) rows; DPOTrainer needs one kind per dataset"
        )
    return _to_dataset(kept), report


def _to_dataset(rows: list[dict]):
    import datasets

    if not rows:
        return datasets.Dataset.from_dict({ROW_ID: [], SOURCE: [], PROMPT: [], CHOSEN: [], REJECTED: []})
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Pass-through columns whose types differ between rows are kept as JSON text.
        extra_keys = sorted({k for r in rows for k in r} - set(RESERVED))
        for key in extra_keys:
            try:
                pa.array([r.get(key) for r in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                logger.warning("column %r has mixed types across rows; kept as JSON text", key)
                for r in rows:
                    if key in r:
                        r[key] = json.dumps(r[key], ensure_ascii=False, default=str)
        table = pa.Table.from_pylist(rows)
    return datasets.Dataset(table)


def load_preferences(
    inputs,
    *,
    format: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    drop_duplicates: bool = False,
    split: str = "train",
    source_column: str | None = None,
    limit_per_source: int | None = None,
    rejects_path: str | os.PathLike | None = None,
):
    """Load preference pairs into TRL's canonical columns, one ``source`` tag per input.

    Args:
        inputs: a file, glob, folder, in-memory table, Hub name, or a list / ``{name: input}`` mapping of them.
        format: force a layout (``partitioner.formats.FORMATS``); detected per input when None.
        column_mapping: ``{"prompt": col, "chosen": col, "rejected": col[, "system": col]}`` for other layouts.
        drop_duplicates: reject exact duplicate pairs (reason ``duplicate_pair``) instead of keeping them with
            a ``-N`` suffix on their ``row_id``. Either way they are counted.
        split: the split to read from a ``DatasetDict`` folder or the Hub.
        source_column: take each row's ``source`` tag from this column instead of the input's name.
        limit_per_source: read only the first N rows of each input (for quick runs); the rest are not counted.
        rejects_path: write the rejects there (Arrow IPC stream), even when there are none.

    Returns:
        ``datasets.Dataset`` with ``row_id``, ``source``, ``prompt``, ``chosen``, ``rejected`` and the
        pass-through columns (an input column named like one of ours is kept as ``orig_<name>``).

    Raises:
        PreferenceDataError: see ``load_preferences_with_rejects``.
    """
    dataset, report = load_preferences_with_rejects(
        inputs,
        format=format,
        column_mapping=column_mapping,
        drop_duplicates=drop_duplicates,
        split=split,
        source_column=source_column,
        limit_per_source=limit_per_source,
    )
    for s in report.sources:
        logger.info(
            "%s: %s, %d rows in, %d kept, %d rejected %s%s",
            s.source, s.format, s.rows_in, s.rows_kept, sum(s.rejects.values()), dict(s.rejects) or "",
            f", {s.duplicates} duplicates" if s.duplicates else "",
        )
    if rejects_path is not None:
        write_rejects(report.rejects, rejects_path)
    return dataset


def parse_column_mapping(text: str | Mapping | None) -> dict | None:
    """``"prompt=question,chosen=response_j,rejected=response_k"`` -> dict (CLI helper)."""
    if text is None or isinstance(text, Mapping):
        return dict(text) if text else None
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise PreferenceDataError(f"column mapping item {part!r} is not key=column")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


__all__ = [
    "LoadConfig",
    "LoadReport",
    "PreferenceDataError",
    "SourceReport",
    "load_preferences",
    "load_preferences_with_rejects",
    "pair_content_hash",
    "parse_column_mapping",
]
