"""The scored folder on disk (CONTRACTS.md section 2): its parts, markers, ``scoring.json``, and its one reader.

::

    OUT/settings.json             what the numbers depend on (written first; a rerun must match it)
    OUT/parts/part-00000.arrow    scored rows in input order, Arrow IPC stream, ``rows_per_part`` rows each
    OUT/parts/part-00000.done     its completion marker: {"rows", "sha256"}
    OUT/rejects.arrow             rows not scored, with a reason each (loader + tokenizer rejects)
    OUT/scoring.json              settings, row accounting, per-source statistics, every part's sha256
    OUT/_SUCCESS                  the folder's completion marker (written last): {"rows_scored", "scoring_json_sha256"}

:func:`scored_parts` is the only reader of a finished folder; it checks the marker and every part's checksum
against ``scoring.json`` before anything reads a row.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from sdpo_core.columns import CHOSEN_LOGPS, REJECTED_LOGPS, SOURCE
from sdpo_core.errors import UserError
from sdpo_core.stats import margin_stats_by

from ..data.rejects import REJECTS_FILE, reason_counts, write_rejects
from ..io import (
    marker_vouches_for,
    read_arrow_stream,
    read_json,
    read_marker,
    remove_temp_files,
    sha256_file,
    write_arrow_stream,
    write_json,
    write_marker,
)

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
SETTINGS_FILE = "settings.json"
SCORING_FILE = "scoring.json"
SUCCESS_FILE = "_SUCCESS"


class ScoringError(UserError):
    """The scoring job cannot go on as asked, or a scored folder cannot be used (one-line message)."""


def part_path(out: Path, k: int, suffix: str = "arrow") -> Path:
    return out / PARTS_DIR / f"part-{k:05d}.{suffix}"


def prepare_folder(out: Path, settings: dict, overwrite: bool) -> None:
    """Make ``out`` ready for a job with ``settings``: keep matching results, refuse or clear others."""
    path = out / SETTINGS_FILE
    if path.exists():
        old = read_json(path, "scoring settings")
        if old != settings:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ScoringError(
                    f"{out} holds results scored with other settings ({', '.join(changed)} differ); "
                    "use a new output folder or overwrite=True (--overwrite) to start over"
                )
            logger.warning("%s: settings changed, starting over", out)
            _clear(out)
    elif out.exists() and not out.is_dir():
        raise ScoringError(f"output {out} exists and is not a folder")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ScoringError(f"{out} is not empty and holds no scoring settings; use an empty folder or --overwrite")
        _clear(out)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    remove_temp_files(out / PARTS_DIR)
    remove_temp_files(out)
    if not path.exists():
        (out / SUCCESS_FILE).unlink(missing_ok=True)
        write_json(path, settings, sort_keys=True)


def _clear(out: Path) -> None:
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    for name in (SETTINGS_FILE, SCORING_FILE, SUCCESS_FILE, REJECTS_FILE):
        (out / name).unlink(missing_ok=True)
    if any(out.iterdir()):
        raise ScoringError(f"{out} holds other files; give an output folder of its own")


def part_done(out: Path, k: int) -> bool:
    """Whether part ``k`` is complete: its marker exists and records the part's current sha256."""
    return marker_vouches_for(read_marker(part_path(out, k, "done")), part_path(out, k))


def write_part(out: Path, k: int, table) -> None:
    """Write part ``k`` (atomically), then its completion marker."""
    sha = write_arrow_stream(table, part_path(out, k))
    write_marker(part_path(out, k, "done"), {"rows": table.num_rows, "sha256": sha})


def finish(out: Path, settings: dict, n_parts: int, rejects: list, rows_in: int, n_kept: int) -> Path:
    """Write ``rejects.arrow``, ``scoring.json`` and, last, the ``_SUCCESS`` marker, after checking the accounting."""
    import pyarrow as pa

    parts, tables = [], []
    for k in range(n_parts):
        path = part_path(out, k)
        t = read_arrow_stream(path)
        parts.append({"file": f"{PARTS_DIR}/{path.name}", "rows": t.num_rows, "sha256": sha256_file(path)})
        tables.append(t.select([SOURCE, CHOSEN_LOGPS, REJECTED_LOGPS]))
    rows_scored = sum(p["rows"] for p in parts)
    if rows_scored != n_kept or rows_in != rows_scored + len(rejects):
        raise AssertionError(f"row accounting broken: {rows_in} in != {rows_scored} scored + {len(rejects)} rejected")
    write_rejects(rejects, out / REJECTS_FILE)
    scores = pa.concat_tables(tables)
    meta = {k: settings[k] for k in ("schema_version", "library_version", "model", "dtype", "tokenizer", "signals",
                                     "difficulty", "scoring")}
    meta.update(
        rows_in=rows_in,
        rows_scored=rows_scored,
        rows_rejected=len(rejects),
        reject_reasons=reason_counts(rejects),
        per_source=margin_stats_by(scores.column(SOURCE).to_pylist(), scores.column(CHOSEN_LOGPS).to_numpy(),
                                   scores.column(REJECTED_LOGPS).to_numpy()),
        parts=parts,
    )
    sha = write_json(out / SCORING_FILE, meta)
    write_marker(out / SUCCESS_FILE, {"rows_scored": rows_scored, "scoring_json_sha256": sha})
    logger.info("scored %d rows into %s (%d rejected)", rows_scored, out, len(rejects))
    return out


def is_scored_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / SCORING_FILE).is_file()


def scored_parts(path, verify: bool = True) -> tuple[dict, list[Path]]:
    """``(scoring.json, part paths in order)`` of a complete scored folder, every part checked against its sha256.

    With ``verify=False`` the parts' checksums are left to the caller (:func:`verify_parts`), e.g. to check them
    while other work runs; nothing derived from a part may be written before that check passes.

    Raises:
        ScoringError: not a scored folder, unfinished (no valid ``_SUCCESS``), a part missing, outside the folder,
            or different from its recorded checksum.
    """
    out = Path(path)
    if not (out / SCORING_FILE).is_file():
        raise ScoringError(f"{out} is not a scored folder (no {SCORING_FILE}); run `sdpo score` first")
    marker = read_marker(out / SUCCESS_FILE)
    if not marker_vouches_for(marker and {"sha256": marker.get("scoring_json_sha256")}, out / SCORING_FILE):
        raise ScoringError(f"scored folder {out} is incomplete (no valid {SUCCESS_FILE}); rerun `sdpo score` to "
                           "finish it")
    meta = read_json(out / SCORING_FILE, "scoring metadata")
    listed = meta.get("parts") if isinstance(meta, dict) else None
    if not isinstance(listed, list) or not listed:
        raise ScoringError(f"{out / SCORING_FILE} lists no parts")
    paths = []
    for entry in listed:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).parent != Path(PARTS_DIR) or not Path(name).name.startswith(
                "part-") or Path(name).name in ("", ".", ".."):
            raise ScoringError(f"{out / SCORING_FILE} lists a part that is not a file under {PARTS_DIR}/: {name!r}")
        p = out / name
        if not p.is_file():
            raise ScoringError(f"scored part {p} is missing")
        paths.append(p)
    if verify:
        verify_parts(meta, paths)
    return meta, paths


def verify_parts(meta: dict, paths: list[Path]) -> None:
    """Check every part against the sha256 ``scoring.json`` records for it.

    Raises:
        ScoringError: a part differs from its recorded checksum.
    """
    for entry, p in zip(meta["parts"], paths, strict=True):
        if sha256_file(p) != entry.get("sha256"):
            raise ScoringError(f"scored part {p} differs from its checksum in {SCORING_FILE}; rescore the folder")


def read_scored(path) -> tuple:
    """``(dataset, scoring.json)`` of a complete scored folder: the checked parts concatenated (memory-mapped).

    Raises:
        ScoringError: see :func:`scored_parts`.
    """
    import datasets

    meta, paths = scored_parts(path)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in paths]), meta


def scoring_summary(path) -> dict:
    """``scoring.json`` of a scored folder, for printing (not checked; use :func:`scored_parts` to read rows)."""
    return json.loads((Path(path) / SCORING_FILE).read_text(encoding="utf-8"))
