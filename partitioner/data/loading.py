"""Load preference data from files, folders, in-memory tables or the Hub into TRL's canonical form, streamed.

``load_preferences(inputs)`` returns a ``datasets.Dataset`` memory-mapped from an Arrow stream file with the
columns ``row_id``, ``source``, ``prompt``, ``chosen``, ``rejected`` and the inputs' other columns passed through.
Every row that cannot be used is a reject with a reason (``partitioner.data.rejects``); rows in = rows kept + rows
rejected, checked for every block and source. A row of a multi-response layout becomes several pairs (Curri-DPO,
:mod:`.multi_response`; ``LoadConfig.pairing``): rows are still counted as rows, the pairs beside them
(:mod:`.expansion`).

Inputs (one, a list, or a ``{source_name: input}`` mapping; ``"name=path"`` strings name a source too):
  * files: ``.jsonl``/``.ndjson``, ``.json`` (an array of objects, JSON lines, or one object), ``.parquet``,
    ``.arrow`` (IPC stream or file format), ``.csv``, each also compressed as ``.gz``, ``.bz2``, ``.xz`` or
    ``.zst``; globs (each matched file is a source named by its stem, unless a name is given, which they share);
  * folders of such files, and folders written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
  * ``datasets.Dataset``/``DatasetDict``, ``polars.DataFrame``, ``pyarrow.Table``, a list of dicts;
  * Hub dataset names (``org/name``), loaded with ``datasets.load_dataset(name, split=split)``.

How (no stage holds all rows): each input is read as blocks of a few MB (:mod:`.sources`, :mod:`.jsonrows`,
:mod:`.tables`); its layout is the one most rows of a sample of the first :data:`SAMPLE_ROWS` rows fit
(:func:`partitioner.data.formats.vote_format`), and every row is then checked against it; each block is converted
(:mod:`.convert`), its rows get content-hash ids (:mod:`.identity`), and the kept rows and the rejects are appended
to Arrow stream files in the load's work folder (:mod:`.store`) while the next block is read in a thread.

This loader's own output read again (a ``save_to_disk`` folder of it, or the dataset itself: it has ``row_id`` and
``source`` columns) goes through the same validation, keeps its sources and gets its row ids recomputed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from sdpo_core.columns import ROW_ID, SOURCE
from sdpo_core.config import check_ranges

from ..io import atomic_file
from .convert import BlockConverter, table_rows
from .expansion import MultiPairConverter, plain_result
from .formats import FORMATS, MAPPING_KEYS, MULTI_FORMATS, PreferenceDataError, detect_row_format, vote_format
from .multi_response import PAIRINGS
from .identity import DuplicateIndex, pair_content_hash  # noqa: F401 - re-exported
from .rejects import REJECTS_FILE, RejectsWriter, read_rejects
from .blocks import limited, prefetched
from .sources import Source, expand_inputs
from .store import KeptWriter, new_work_dir, open_kept

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 10_000  # rows that fit a layout, read to detect an input's layout


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    source: str
    format: str | None = None
    rows_in: int = 0
    rows_kept: int = 0
    rejects: Counter = field(default_factory=Counter)  # reason -> rejected input rows
    duplicates: int = 0
    pairs: int = 0  # pairs kept: rows_kept for a pair layout, more for a multi-response one
    pair_rejects: Counter = field(default_factory=Counter)  # reason -> pairs dropped from kept multi-response rows

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejects.values())

    @property
    def pairs_rejected(self) -> int:
        return sum(self.pair_rejects.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_rejected": self.rows_rejected,
            "reject_reasons": dict(sorted(self.rejects.items())),
            "duplicates": self.duplicates,
            "pairs": self.pairs,
            "pairs_rejected": self.pairs_rejected,
            "pair_reject_reasons": dict(sorted(self.pair_rejects.items())),
        }


def _total(name: str, doc: str) -> property:
    """A :class:`LoadReport` count: the sum of its sources' ``name``."""
    return property(lambda self: sum(getattr(s, name) for s in self.sources), doc=doc)


@dataclass
class LoadReport:
    """Row accounting of a load, per source and in total; the rejects are in the Arrow file ``rejects_path``."""

    sources: list[SourceReport] = field(default_factory=list)
    rejects_path: Path | None = None

    rows_in = _total("rows_in", "Input rows read.")
    rows_kept = _total("rows_kept", "Input rows that gave at least one kept pair.")
    rows_rejected = _total("rows_rejected", "Input rows rejected (a record each in the rejects file).")
    pairs = _total("pairs", "Rows of the loaded dataset, each a pair (rows_kept, or more with multi-response rows).")
    pairs_rejected = _total("pairs_rejected", "Pairs dropped from kept multi-response rows (a record each too).")

    def rejects_table(self) -> pa.Table:
        """The reject records as a memory-mapped ``pyarrow.Table`` (REJECTS_SCHEMA)."""
        return read_rejects(self.rejects_path)

    @property
    def rejects(self) -> list[dict]:
        """The reject records as Python dicts (for small reports; large ones: :meth:`rejects_table`)."""
        return self.rejects_table().to_pylist() if self.rejects_path is not None else []

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_rejected": self.rows_rejected,
            "pairs": self.pairs,
            "pairs_rejected": self.pairs_rejected,
            "sources": [s.as_dict() for s in self.sources],
        }


@dataclass
class LoadConfig:
    """How inputs are read: the options of :func:`load_preferences` and every command's loading flags."""

    format: str | None = field(default=None, metadata={
        "help": "Force a layout (default: detected per input).", "choices": FORMATS})
    column_mapping: str | dict | None = field(default=None, metadata={
        "help": "Other layouts: prompt=COL,chosen=COL,rejected=COL[,system=COL] (or a mapping); implies "
                "format 'mapping'."})
    source_column: str | None = field(default=None, metadata={"help": "Take each row's source tag from this column."})
    split: str = field(default="train", metadata={"help": "Split of a DatasetDict folder or a Hub dataset."})
    drop_duplicates: bool = field(default=False, metadata={
        "help": "Reject exact duplicate pairs (reason duplicate_pair) instead of keeping them with a -N row_id "
                "suffix; either way they are counted."})
    limit_per_source: int | None = field(default=None, metadata={
        "min": 1, "help": "Read only the first N rows of each input (the rest are not counted)."})
    pairing: str = field(default="best_vs_rest", metadata={
        "help": "Pairs of a multi-response row (UltraFeedback completions, responses+ratings, chosen/rejected "
                "lists; Curri-DPO): best_vs_rest pairs the top-rated response with each lower-rated one, all pairs "
                "every higher- with every lower-rated one; equal ratings give no pair.", "choices": PAIRINGS})

    def __post_init__(self):
        if self.format is not None and self.format not in FORMATS:
            raise PreferenceDataError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.limit_per_source is not None and (isinstance(self.limit_per_source, bool)
                                                  or not isinstance(self.limit_per_source, int)):
            raise PreferenceDataError(f"limit_per_source must be an integer, got {self.limit_per_source!r}")
        if self.pairing not in PAIRINGS:
            raise PreferenceDataError(f"unknown pairing {self.pairing!r}; choose one of {', '.join(PAIRINGS)}")
        check_ranges(self)
        self.column_mapping = parse_column_mapping(self.column_mapping)
        if self.column_mapping:
            bad = set(self.column_mapping) - set(MAPPING_KEYS)
            if bad:
                raise PreferenceDataError(
                    f"column mapping keys must be prompt, chosen, rejected, system; got {sorted(bad)}")
            missing = set(MAPPING_KEYS[:3]) - set(self.column_mapping)
            if missing:
                raise PreferenceDataError(
                    f"column mapping needs prompt, chosen and rejected; got {dict(self.column_mapping)}")
            self.format = "mapping"


def _load_config(config: LoadConfig | None, options: dict) -> LoadConfig:
    """``config``, or a :class:`LoadConfig` of the keyword ``options`` (not both)."""
    if config is not None and options:
        raise TypeError(f"give a LoadConfig or its options as keywords, not both (got {sorted(options)})")
    return config if config is not None else LoadConfig(**options)


# --------------------------------------------------------------------------------------------- detection
def _sample(source: Source, limit: int | None) -> tuple[Counter, set, bool]:
    """Layout votes, columns seen and whether the rows are this loader's output, from the input's first rows."""
    votes, columns, objects, own = Counter(), set(), 0, 0
    blocks = limited(source.open(), limit)
    try:
        for block in blocks:
            if block.table is not None:
                rows = table_rows(block.table.slice(0, SAMPLE_ROWS), _arange(min(block.num_rows, SAMPLE_ROWS)))
            else:
                rows = block.rows
            for row in rows:
                if not isinstance(row, Mapping):
                    continue
                objects += 1
                columns.update(map(str, row))
                own += ROW_ID in row and SOURCE in row
                fmt = detect_row_format(row)
                if fmt is not None:
                    votes[fmt] += 1
            if sum(votes.values()) >= SAMPLE_ROWS:
                break
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()
    return votes, columns, objects > 0 and own * 2 > objects


def _arange(n: int):
    import numpy as np

    return np.arange(n)


# --------------------------------------------------------------------------------------------- main API
def load_preferences_with_rejects(inputs, config: LoadConfig | None = None, *,
                                  work_dir: str | os.PathLike | None = None, **options) -> tuple:
    """Like ``load_preferences`` but returns ``(dataset, report)``; the rejects are in ``report.rejects_path``.

    Raises:
        PreferenceDataError: unreadable input, unknown layout (the message lists the columns seen), an unknown
            ``format``, inputs that mix conversational and standard rows.
        StorageError: the work folder cannot be written (a full disk, no permission).
    """
    config = _load_config(config, options)
    format, limit_per_source = config.format, config.limit_per_source
    folder = new_work_dir(work_dir)
    sources = expand_inputs(inputs, config.split, lambda: folder)
    report = LoadReport(rejects_path=folder / REJECTS_FILE)
    writer, rejects = KeptWriter(folder), RejectsWriter(folder / REJECTS_FILE)
    index = DuplicateIndex()
    kinds: dict[bool, list[str]] = {}
    try:
        for source in sources:
            rep = SourceReport(source=source.name)
            report.sources.append(rep)
            fmt, own_output = format, False
            if fmt is None or fmt != "mapping":
                votes, columns, own_output = _sample(source, limit_per_source)
                if fmt is None:
                    # no object at all (an empty file, or only unreadable lines): every row is a counted reject
                    try:
                        fmt = vote_format(votes, columns) if votes or columns else "standard"
                    except PreferenceDataError as e:
                        raise PreferenceDataError(f"{source.desc}: {e}") from None
            rep.format = fmt
            conv, convert = _converter(source.name, fmt, config, own_output, index)
            for block in prefetched(limited(source.open(), limit_per_source)):
                result = convert(block)
                result.check(source.desc)
                if result.kept is not None:
                    writer.write(result.kept)
                rejects.add(result.records)
                rep.rows_in += result.rows_in
                rep.rows_kept += result.rows_kept
                rep.pairs += result.pairs
                rep.rejects.update(result.row_rejects)
                rep.pair_rejects.update(result.pair_rejects)
                if conv.conversational is not None:
                    _check_kinds(kinds, conv.conversational, source.name)
            rep.duplicates = conv.duplicates
            if not rep.rows_in:
                logger.warning("%s: no rows", source.desc)
            assert rep.rows_in == rep.rows_kept + rep.rows_rejected, "row accounting broken"
        kept_path = writer.finish()
        rejects.close()
    except BaseException:
        writer.abort()
        rejects.abort()
        raise
    if report.rows_in != report.rows_kept + report.rows_rejected or writer.rows != report.pairs:
        raise AssertionError("row accounting broken: rows in != kept + rejected, or rows written != pairs")
    import datasets

    # Dataset.from_file would derive the fingerprint from the (random) path; the content's hash keeps it the same
    # from run to run, as resumable jobs need (the fingerprint ends up in the files datasets writes).
    dataset = datasets.Dataset(open_kept(kept_path), fingerprint=writer.fingerprint)
    return dataset, report


def _converter(source: str, fmt: str, config: LoadConfig, own_output: bool, index: DuplicateIndex) -> tuple:
    """``(converter, block -> BlockResult)`` of a source of layout ``fmt``; a multi-response layout's pairs are
    converted as TRL's explicit-prompt layout of their kind (text or conversational, from the first usable row)."""
    if fmt not in MULTI_FORMATS:
        conv = BlockConverter(source, fmt, config.column_mapping, config.source_column, own_output, index,
                              config.drop_duplicates)
        return conv, lambda block: plain_result(block, *conv.convert(block))
    conv = MultiPairConverter(source, fmt, config.pairing, lambda conversational: BlockConverter(
        source, "conversational" if conversational else "standard", None, config.source_column, False, index,
        config.drop_duplicates))
    return conv, conv.convert


def _check_kinds(kinds: dict, conversational: bool, source: str) -> None:
    names = kinds.setdefault(conversational, [])
    if source not in names:
        names.append(source)
    if len(kinds) > 1:
        raise PreferenceDataError(
            f"inputs mix conversational ({', '.join(kinds[True])}) and standard ({', '.join(kinds[False])}) rows; "
            "DPOTrainer needs one kind per dataset"
        )


def copy_rejects(report: LoadReport, path: str | os.PathLike) -> None:
    """Copy the load's rejects file to ``path`` (atomically)."""
    import shutil

    with open(report.rejects_path, "rb") as src, atomic_file(path) as sink:
        shutil.copyfileobj(src, sink, 8 << 20)


def load_preferences(inputs, config: LoadConfig | None = None, *, rejects_path: str | os.PathLike | None = None,
                     work_dir: str | os.PathLike | None = None, **options):
    """Load preference pairs into TRL's canonical columns, one ``source`` tag per input.

    Args:
        inputs: a file, glob, folder, in-memory table, Hub name, or a list / ``{name: input}`` mapping of them.
        config: how the inputs are read (:class:`LoadConfig`: format, column_mapping, source_column, split,
            drop_duplicates, limit_per_source, pairing); or give those options as keywords instead.
        rejects_path: write the rejects there (Arrow IPC stream), even when there are none.
        work_dir: where the loaded rows' Arrow file is written (default: a temporary folder removed at exit;
            see :mod:`partitioner.data.store`).

    Returns:
        ``datasets.Dataset`` (memory-mapped) with ``row_id``, ``source``, ``prompt``, ``chosen``, ``rejected`` and
        the pass-through columns (an input column named like one of ours is kept as ``orig_<name>``).

    Raises:
        TypeError: an unknown keyword option.
        PreferenceDataError, StorageError: see ``load_preferences_with_rejects``.
    """
    dataset, report = load_preferences_with_rejects(inputs, config, work_dir=work_dir, **options)
    for s in report.sources:
        logger.info(
            "%s: %s, %d rows in, %d kept, %d rejected %s%s%s",
            s.source, s.format, s.rows_in, s.rows_kept, s.rows_rejected, dict(s.rejects) or "",
            f", {s.duplicates} duplicates" if s.duplicates else "",
            f", {s.pairs} pairs ({s.pairs_rejected} dropped)" if s.pairs != s.rows_kept else "",
        )
    if rejects_path is not None:
        copy_rejects(report, rejects_path)
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
    "copy_rejects",
    "load_preferences",
    "load_preferences_with_rejects",
    "pair_content_hash",
    "parse_column_mapping",
]
