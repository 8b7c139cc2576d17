"""Partition folders on disk: chunk shards, ``rejects.arrow``, the dataset card ``README.md`` and ``manifest.json``.

Layout (CONTRACTS.md section 3)::

    OUT/chunk-000.arrow, chunk-001.arrow, ...   Arrow IPC *stream* files, curriculum order (shard_format arrow)
    OUT/chunk-000.parquet, ...                  Parquet shards (shard_format parquet) or copies (both)
    OUT/rejects.arrow                           rejected rows carried over from loading/scoring
    OUT/README.md                               dataset card: configs (a split per chunk, rejects) and statistics
    OUT/manifest.json                           written last, atomically (temp file + rename)

A folder without ``manifest.json`` is not a partition: the writer removes an old manifest before touching any
shard, writes every shard to a temporary name and renames it into place, and only then writes the manifest.
A killed write therefore never leaves a manifest that points at partial shards.

Readers: :func:`load_partition` (list of ``datasets.Dataset``), :func:`load_partition_dict` (``DatasetDict``
``step_0..step_k``), :func:`read_manifest`, :func:`verify_partition`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa

from sdpo_core.columns import ROW_ID
from sdpo_core.errors import UserError

from ..data.rejects import REJECTS_FILE
from ..io import TMP_INFIX, StorageError, fsync_dir, read_arrow_stream, read_json, sha256_file, write_json
from .layout import CARD, REJECTS_PARQUET, chunk_name, is_card, read_shard, shard_dataset  # noqa: F401 - chunk_name

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class PartitionError(UserError):
    """A partition folder is missing, incomplete or does not match its manifest (one-line message)."""


class PartitionConfigError(PartitionError):
    """Settings that cannot produce a partition for this input (one-line message)."""


def schema_columns(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """Create ``out_dir`` or clear a previous partition in it (manifest first), refusing foreign folders.

    Raises:
        PartitionError: ``out_dir`` is a file, or a non-empty folder that is not a partition.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PartitionError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out.iterdir()]
    ours = [p for p in entries if p.name in (MANIFEST, REJECTS_FILE, REJECTS_PARQUET) or (p.name == CARD and is_card(p))
            or p.name.startswith(("chunk-", ".chunk-", ".buckets-", f".{MANIFEST}{TMP_INFIX}", f".{REJECTS_FILE}",
                                  f".{REJECTS_PARQUET}", f".{CARD}{TMP_INFIX}"))]
    if len(ours) != len(entries):
        foreign = sorted(p.name for p in entries if p not in ours)
        raise PartitionError(f"output folder {out} is not empty and not a partition (contains {foreign[0]})")
    if ours and not overwrite:
        raise PartitionError(f"output folder {out} already holds a partition (use overwrite)")
    if (out / MANIFEST).exists():  # invalidate first: from here on the folder is not a partition
        (out / MANIFEST).unlink()
        fsync_dir(out)
    for p in ours:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists() and p.name != MANIFEST:
            p.unlink()
    return out


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` (atomically, fsynced): the partition's completion marker, written last."""
    write_json(Path(out_dir) / MANIFEST, manifest)
    return Path(out_dir) / MANIFEST


def read_manifest(partition_dir: str | os.PathLike) -> dict:
    """The manifest of a partition folder.

    Raises:
        PartitionError: the folder or its manifest is missing (an unfinished write leaves none), or unreadable.
    """
    d = Path(partition_dir)
    if not d.is_dir():
        raise PartitionError(f"partition folder {d} does not exist")
    path = d / MANIFEST
    if not path.exists():
        raise PartitionError(f"{d} has no {MANIFEST}: not a partition, or its write did not finish")
    try:
        manifest = read_json(path, "partition manifest")
    except UserError as e:
        raise PartitionError(str(e)) from None
    if not isinstance(manifest, dict) or "chunks" not in manifest:
        raise PartitionError(f"{path} is not a partition manifest (no 'chunks')")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PartitionError(f"{path} has schema_version {_short(manifest.get('schema_version'))}, expected "
                             f"{SCHEMA_VERSION}")
    check_manifest(manifest, path)
    return manifest


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_plain_name(name) -> bool:
    """Whether ``name`` is a plain file name inside a folder: no separator, not ``.``/``..``, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not Path(name).is_absolute() and Path(name).name == name)


def check_manifest(m: dict, path) -> None:
    """Refuse a manifest whose fields have the wrong JSON types, or whose files are not plain names in the folder.

    Raises:
        PartitionError: the first bad field, as one line.
    """
    for key in ("rows_in", "rows_kept", "rows_rejected"):
        if not _is_count(m.get(key)):
            raise PartitionError(f"{path}: {key} must be a non-negative integer, got {_short(m.get(key))}")
    if m.get("columns") is not None and not (isinstance(m["columns"], list) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("type"), str)
            for c in m["columns"])):
        raise PartitionError(f"{path}: columns must be a list of {{name, type}} objects")
    for key in ("rejects_sha256", "card_sha256"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise PartitionError(f"{path}: {key} must be text, got {_short(m[key])}")
    rp = m.get("rejects_parquet")
    if rp is not None and not (isinstance(rp, dict) and rp.get("file") == REJECTS_PARQUET
                               and isinstance(rp.get("sha256"), str)):
        raise PartitionError(f"{path}: rejects_parquet must be {{file: {REJECTS_PARQUET}, sha256}}, got {_short(rp)}")
    chunks = m["chunks"]
    if not isinstance(chunks, list):
        raise PartitionError(f"{path}: chunks must be a list, got {_short(chunks)}")
    for i, c in enumerate(chunks):
        if not isinstance(c, dict):
            raise PartitionError(f"{path}: chunk {i} must be an object, got {_short(c)}")
        entries = [("file", c.get("file"), c.get("sha256"))]
        if c.get("parquet") is not None:
            pq = c["parquet"]
            if not isinstance(pq, dict):
                raise PartitionError(f"{path}: chunk {i} parquet must be an object, got {_short(pq)}")
            entries.append(("parquet file", pq.get("file"), pq.get("sha256")))
        for what, name, sha in entries:
            if not is_plain_name(name):
                raise PartitionError(f"{path}: chunk {i} {what} {_short(name)} is not a plain file name inside the "
                                     "folder; refusing to open it")
            if not isinstance(sha, str):
                raise PartitionError(f"{path}: chunk {i} sha256 must be text, got {_short(sha)}")
        if not _is_count(c.get("rows")):
            raise PartitionError(f"{path}: chunk {i} rows must be a non-negative integer, got {_short(c.get('rows'))}")


def _shard_file(d: Path, name: str, what: str = "shard") -> Path:
    """``d / name`` when it is a regular file (not a folder, not a link that could lead outside ``d``)."""
    path = d / name
    if path.is_symlink():
        raise PartitionError(f"{what} {name} is a symbolic link; refusing to follow it out of {d}")
    if not path.exists():
        raise PartitionError(f"{what} {name} listed in {d / MANIFEST} is missing")
    if not path.is_file():
        raise PartitionError(f"{what} {name} is not a regular file (a folder?)")
    return path


def load_partition(partition_dir: str | os.PathLike, verify: bool = False) -> list:
    """The chunks of a partition as ``datasets.Dataset`` objects, in curriculum order (Arrow shards memory-mapped,
    Parquet shards decoded into memory).

    Row counts are always checked against the manifest; ``verify=True`` runs :func:`verify_partition` first
    (checksums, schema, row ids).

    Raises:
        PartitionError: no manifest, a missing shard or a row-count mismatch.
    """
    d = Path(partition_dir)
    if verify:
        verify_partition(d)
    manifest = read_manifest(d)
    out = []
    for c in manifest["chunks"]:
        path = _shard_file(d, c["file"])
        try:
            ds = shard_dataset(path)
        except StorageError as e:
            raise PartitionError(f"shard {e}") from None
        if ds.num_rows != c["rows"]:
            raise PartitionError(f"shard {c['file']} has {ds.num_rows} rows, manifest says {c['rows']}")
        out.append(ds)
    return out


def load_partition_dict(partition_dir: str | os.PathLike, verify: bool = False):
    """The chunks as a ``datasets.DatasetDict`` with keys ``step_0`` .. ``step_k`` (curriculum order)."""
    from datasets import DatasetDict

    return DatasetDict({f"step_{i}": ds for i, ds in enumerate(load_partition(partition_dir, verify=verify))})


def verify_partition(partition_dir: str | os.PathLike) -> dict:
    """Check a partition against its manifest; return the manifest when everything matches.

    Checks: every shard (and Parquet copy) exists and has the manifest's sha256; row counts per shard; the
    same columns and types in every shard as the manifest lists; row ids unique across shards; rows in
    chunks == rows_kept; rows_kept + rows_rejected == rows_in; ``rejects.arrow`` holds rows_rejected rows; the
    card ``README.md`` has the manifest's ``card_sha256`` (partitions written before the card have none).

    Raises:
        PartitionError: the first mismatch found, as one line.
    """
    try:
        return _verify(Path(partition_dir))
    except StorageError as e:  # a shard or the rejects file that is not a readable Arrow stream
        raise PartitionError(str(e)) from None


def _verify(d: Path) -> dict:
    m = read_manifest(d)
    expected_cols = m.get("columns")
    total = 0
    seen_ids: set = set()
    listed = {c["file"] for c in m["chunks"]} | {c["parquet"]["file"] for c in m["chunks"] if c.get("parquet")}
    unlisted = sorted(p.name for p in d.iterdir() if p.name.startswith("chunk-") and p.name not in listed)
    if unlisted:
        raise PartitionError(f"{unlisted[0]} looks like a shard but is not in the manifest ({len(unlisted)} such "
                             "file(s)); a partition folder holds only its own shards")
    for c in m["chunks"]:
        path = _shard_file(d, c["file"])
        digest = sha256_file(path)
        if digest != c["sha256"]:
            raise PartitionError(f"shard {c['file']} checksum mismatch (sha256 {digest[:12]}, manifest {c['sha256'][:12]})")
        table = read_shard(path)
        if table.num_rows != c["rows"]:
            raise PartitionError(f"shard {c['file']} has {table.num_rows} rows, manifest says {c['rows']}")
        if expected_cols is not None and schema_columns(table.schema) != expected_cols:
            raise PartitionError(f"shard {c['file']} columns differ from the manifest's")
        if ROW_ID in table.column_names:
            ids = table.column(ROW_ID).to_pylist()
            before = len(seen_ids)
            seen_ids.update(ids)
            if len(seen_ids) - before != len(ids):
                raise PartitionError(f"shard {c['file']} repeats a row_id (a row is in more than one place)")
        pq_entry = c.get("parquet")
        if pq_entry:
            pq_path = _shard_file(d, pq_entry["file"])
            if sha256_file(pq_path) != pq_entry["sha256"]:
                raise PartitionError(f"parquet copy {pq_entry['file']} checksum mismatch")
        total += table.num_rows
    if total != m["rows_kept"]:
        raise PartitionError(f"chunks hold {total} rows, manifest rows_kept is {m['rows_kept']}")
    if m["rows_kept"] + m["rows_rejected"] != m["rows_in"]:
        raise PartitionError(
            f"row accounting broken: rows_kept {m['rows_kept']} + rows_rejected {m['rows_rejected']} != rows_in {m['rows_in']}"
        )
    rej = d / REJECTS_FILE
    if rej.exists() and not rej.is_file():
        raise PartitionError(f"{REJECTS_FILE} is not a regular file")
    if m["rows_rejected"] and not rej.exists():
        raise PartitionError(f"{REJECTS_FILE} is missing but the manifest counts {m['rows_rejected']} rejected rows")
    if rej.exists():
        n = read_arrow_stream(rej).num_rows
        if n != m["rows_rejected"]:
            raise PartitionError(f"{REJECTS_FILE} has {n} rows, manifest rows_rejected is {m['rows_rejected']}")
        if m.get("rejects_sha256") and sha256_file(rej) != m["rejects_sha256"]:
            raise PartitionError(f"{REJECTS_FILE} checksum mismatch")
    if m.get("rejects_parquet"):
        rp = _shard_file(d, REJECTS_PARQUET, "rejects copy")
        if sha256_file(rp) != m["rejects_parquet"]["sha256"]:
            raise PartitionError(f"{REJECTS_PARQUET} checksum mismatch")
        if (n := read_shard(rp).num_rows) != m["rows_rejected"]:
            raise PartitionError(f"{REJECTS_PARQUET} has {n} rows, manifest rows_rejected is {m['rows_rejected']}")
    if m.get("card_sha256"):
        card = _shard_file(d, CARD, "dataset card")
        if sha256_file(card) != m["card_sha256"]:
            raise PartitionError(f"{CARD} (the dataset card) checksum mismatch: edited after the partition was "
                                 "written? rerun sdpo partition to write it again")
    return m
