"""Inputs of the loader as re-openable streams of :class:`~.blocks.Block`: files (plain or compressed), folders,
globs, ``save_to_disk`` folders, in-memory tables and Hub datasets.

Compressed files (``.gz``, ``.bz2``, ``.zst`` through ``pyarrow``'s ``CompressedInputStream``; ``.xz`` through the
standard library's ``lzma``) are decompressed while they are read, for every file type. Parquet needs random access,
so a compressed Parquet file is first decompressed (streamed) into the load's work folder. Every source can be
opened again: format detection reads a sample first, then the rows are read from the start.
"""

from __future__ import annotations

import errno
import glob as _glob
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .formats import PreferenceDataError
from .blocks import Block, python_rows_blocks
from .jsonrows import MAX_DOCUMENT_BYTES, json_array_rows, json_document_rows, jsonl_blocks
from .tables import arrow_blocks, csv_blocks, parquet_blocks, table_blocks

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow", ".csv")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVED_DATASET = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Source:
    """One input: its source name, a description for messages, and a function that opens its blocks."""

    name: str
    desc: str
    open: Callable[[], Iterator[Block]]


def split_suffixes(path: Path) -> tuple[str, str | None]:
    """``(data suffix, compression)`` of a file name, e.g. ``("".jsonl", "gzip")`` for ``x.jsonl.gz``."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), COMPRESSIONS[suffix]
    return suffix, None


def is_data_file(path: Path) -> bool:
    return split_suffixes(path)[0] in DATA_SUFFIXES


def _os_error(path, e: OSError) -> PreferenceDataError:
    return PreferenceDataError(f"cannot read {path}: {e.strerror or e}")


class _Stream:
    """A binary stream of a (maybe compressed) file; read errors become one-line PreferenceDataErrors."""

    def __init__(self, path: Path, compression: str | None):
        self.path, self.compression = path, compression
        try:
            if compression is None or compression == "xz":
                raw = open(path, "rb")  # noqa: SIM115 - closed by close()
            else:  # Arrow's own file and codec: decompression runs in C++ without the GIL
                raw = pa.OSFile(str(path), "rb")
        except OSError as e:
            raise _os_error(path, e) from None
        if compression is None:
            self._f = raw
        elif compression == "xz":
            import lzma

            self._f = lzma.LZMAFile(raw)
        else:
            self._f = pa.CompressedInputStream(raw, compression)
        self._raw = raw
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n) if n >= 0 else self._f.read()
        except (OSError, EOFError, ValueError, pa.ArrowException) as e:
            what = f"corrupt or truncated {self.compression} data" if self.compression else "read error"
            raise PreferenceDataError(f"{self.path}: {what} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") \
                from None
        return bytes(data)

    def close(self) -> None:
        self.closed = True
        for f in (self._f, self._raw):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a failed stream
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _jsonl(path: Path, compression) -> Iterator[Block]:
    with _Stream(path, compression) as s:
        yield from jsonl_blocks(s)


def _json(path: Path, compression) -> Iterator[Block]:
    """A ``.json`` file: a JSON array (streamed), JSON lines, or one JSON object."""
    with _Stream(path, compression) as s:
        head = s.read(1 << 20)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        with _Stream(path, compression) as s:
            yield from python_rows_blocks(json_array_rows(s, str(path)))
        return
    if first == b"{":
        first_line = head.lstrip(b"\xef\xbb\xbf \t\r\n").split(b"\n", 1)[0]
        import json

        try:
            json.loads(first_line)
            is_lines = True
        except (ValueError, RecursionError):
            is_lines = False
        if not is_lines:
            with _Stream(path, compression) as s:
                rows = json_document_rows(s.read(MAX_DOCUMENT_BYTES + 1), str(path))
            if rows is not None:
                yield from python_rows_blocks((r, r) for r in rows)
                return
        yield from _jsonl(path, compression)
        return
    if not first:
        return
    raise PreferenceDataError(f"{path}: not a JSON array, JSON object or JSON lines")


def file_source(name: str, path: Path, work_dir: Callable[[], Path]) -> Source:
    suffix, compression = split_suffixes(path)
    if suffix in (".jsonl", ".ndjson"):
        opener = lambda: _jsonl(path, compression)  # noqa: E731
    elif suffix == ".json":
        opener = lambda: _json(path, compression)  # noqa: E731
    elif suffix == ".csv":
        opener = csv_blocks(path, lambda: _Stream(path, compression))
    elif suffix == ".arrow":
        opener = lambda: arrow_blocks(path, compression and (lambda: _Stream(path, compression)))  # noqa: E731
    elif suffix == ".parquet":
        opener = lambda: parquet_blocks(_plain_copy(path, compression, work_dir))  # noqa: E731
    else:
        raise PreferenceDataError(f"{path}: unsupported file type {''.join(path.suffixes[-2:]) or path.name!r}; use "
                                  f"one of {', '.join(DATA_SUFFIXES)}, optionally compressed "
                                  f"({', '.join(COMPRESSIONS)})")
    return Source(name, str(path), opener)


def _plain_copy(path: Path, compression: str | None, work_dir: Callable[[], Path]) -> Path:
    """``path`` itself, or (compressed) its decompressed copy in the work folder (Parquet needs random access)."""
    if compression is None:
        return path
    target = work_dir() / f"decompressed-{abs(hash(str(path)))}.parquet"
    if not target.exists():
        with _Stream(path, compression) as s, open(target, "wb") as out:
            shutil.copyfileobj(s, out, 8 << 20)
    return target


# --------------------------------------------------------------------------------------------- expansion
def _listdir(folder: Path) -> list[Path]:
    """Data files of a folder (sorted); a link loop, a dangling link or no permission is a one-line error."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise _os_error(folder, e) from None
    files = []
    for entry in entries:
        path = Path(entry.path)
        if not is_data_file(path):
            continue
        try:
            if not entry.is_file():
                os.stat(path)  # raises for a link loop / dangling link; a folder with a data suffix is skipped
                continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PreferenceDataError(f"{path}: symbolic link loop in input folder {folder}") from None
            raise _os_error(path, e) from None
        files.append(path)
    return files


def _saved_dataset(path: Path, split: str) -> Source:
    def opener():
        import datasets

        try:
            obj = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError, pa.ArrowException) as e:
            raise PreferenceDataError(f"{path}: not a readable saved dataset ({str(e).splitlines()[0][:150]})") \
                from None
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a state.json / dataset_info.json that
            # parses but lacks what datasets reads from it
            raise PreferenceDataError(f"{path}: damaged saved dataset (its state.json or dataset_info.json lacks "
                                      f"{type(e).__name__} {str(e)[:100]})") from None
        return table_blocks(_dataset_of(obj, split, str(path)))

    return Source(path.name, str(path), opener)


def _hub_source(name: str, repo: str, split: str) -> Source:
    cache: list = []

    def opener():
        if not cache:
            import datasets

            try:
                cache.append(datasets.load_dataset(repo, split=split))
            except Exception as e:  # noqa: BLE001 - any hub failure becomes one line
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise PreferenceDataError(f"could not load {repo!r} from the Hugging Face Hub (offline or not "
                                          f"found?): {first[:200]}") from None
        return table_blocks(_dataset_of(cache[0], split, repo))

    return Source(name, repo, opener)


def _dataset_of(obj, split: str, name: str):
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise PreferenceDataError(f"{name}: no split {split!r}; splits are {', '.join(obj)}")
        obj = obj[split]
    return obj


def _path_sources(s: str, name: str | None, split: str, work_dir) -> list[Source]:
    p = Path(s).expanduser()
    if any(ch in s for ch in "*?["):
        try:
            files = sorted(Path(f) for f in _glob.glob(str(p), recursive=True))
        except OSError as e:
            raise _os_error(s, e) from None
        files = [f for f in files if f.is_file()]
        if not files:
            raise PreferenceDataError(f"no files match {s!r}")
        return [file_source(name or _stem(f), f, work_dir) for f in files]
    try:
        is_dir = p.is_dir()
        exists = is_dir or p.exists() or p.is_symlink()
    except OSError as e:
        raise _os_error(p, e) from None
    if is_dir:
        if any((p / f).exists() for f in _SAVED_DATASET):
            src = _saved_dataset(p, split)
            return [Source(name or src.name, src.desc, src.open)]
        files = _listdir(p)
        if not files:
            raise PreferenceDataError(f"{p}: folder has no data files ({', '.join(DATA_SUFFIXES)}, optionally "
                                      "compressed) and no saved dataset")
        return [file_source(name or _stem(f), f, work_dir) for f in files]
    if exists:
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            raise _os_error(p, e) from None
        if not stat.S_ISREG(mode):  # a pipe, FIFO or device (`<(zcat x.gz)`, /dev/stdin): it can be read only once
            spooled = spool_stream(p, work_dir)
            src = file_source(name or (_stem(p) if is_data_file(p) else p.name), spooled, work_dir)
            return [Source(src.name, str(p), src.open)]
        return [file_source(name or _stem(p), p, work_dir)]
    if _HUB_NAME.match(s) and not is_data_file(Path(s)):
        return [_hub_source(name or s.split("/")[-1], s, split)]
    raise PreferenceDataError(f"no such file or folder: {s}")


_MAGIC = ((b"\x1f\x8b", ".gz"), (b"BZh", ".bz2"), (b"\xfd7zXZ\x00", ".xz"), (b"\x28\xb5\x2f\xfd", ".zst"))


def _sniff_suffix(head: bytes) -> str:
    """The file name suffix of a stream without one, from its first bytes (compression, then data format)."""
    import lzma
    import zlib

    for magic, suffix in _MAGIC:
        if head.startswith(magic):
            inner = b""
            try:
                if suffix == ".gz":
                    inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1 << 16)
                elif suffix == ".xz":
                    inner = lzma.LZMADecompressor().decompress(head, 1 << 16)
                elif suffix == ".bz2":
                    import bz2

                    inner = bz2.BZ2Decompressor().decompress(head, 1 << 16)
            except (zlib.error, lzma.LZMAError, OSError, EOFError):
                inner = b""
            if not inner:
                raise PreferenceDataError(f"a {suffix} stream whose data format cannot be told from its start; "
                                          "name the file with its data suffix (e.g. .jsonl.gz)")
            return _sniff_suffix(inner) + suffix
    if head.startswith(b"PAR1"):
        return ".parquet"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return ".arrow"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"["):
        return ".json"
    if text.startswith(b"{"):
        import json

        first = text.split(b"\n", 1)[0]
        try:
            json.loads(first)
            return ".jsonl"  # a whole object on the first line: JSON lines
        except ValueError:
            return ".json"
    return ".csv"


def spool_stream(path: Path, work_dir: Callable[[], Path]) -> Path:
    """Copy a stream that can be read only once (a pipe, FIFO or device) into the work folder, reading it to its
    end exactly once; the copy keeps the stream's data suffix, or gets one from its first bytes."""
    folder = work_dir()
    target = folder / f"spooled-{len(list(folder.glob('spooled-*')))}"
    try:
        with open(path, "rb") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
    except OSError as e:
        raise _os_error(path, e) from None
    suffixes = "".join(path.suffixes[-2:]) if is_data_file(path) else None
    if suffixes is None:
        with open(target, "rb") as f:
            suffixes = _sniff_suffix(f.read(1 << 16))
    named = target.with_name(target.name + suffixes)
    target.rename(named)
    return named


def _stem(path: Path) -> str:
    """The source name of a file: its name without data and compression suffixes."""
    name = path.name
    suffix, compression = split_suffixes(path)
    if compression:
        name = Path(name).stem
    return Path(name).stem if suffix else name


def _memory_source(name: str, item, split: str) -> Source:
    if isinstance(item, list):  # rows that are not mappings are counted rejects (not_an_object)
        return Source(name, f"list of {len(item)} rows", lambda: python_rows_blocks((r, r) for r in item))
    if isinstance(item, (pa.Table, pa.RecordBatch)):
        table = pa.Table.from_batches([item]) if isinstance(item, pa.RecordBatch) else item
        return Source(name, "pyarrow.Table", lambda: table_blocks(table))
    try:
        import polars as pl

        if isinstance(item, pl.DataFrame):
            table = item.to_arrow()
            return Source(name, "polars.DataFrame", lambda: table_blocks(table))
    except ImportError:
        pass
    try:
        import datasets

        if isinstance(item, (datasets.Dataset, datasets.DatasetDict)):
            ds = _dataset_of(item, split, name)
            return Source(name, type(item).__name__, lambda: table_blocks(ds))
    except ImportError:
        pass
    raise PreferenceDataError(f"cannot read input of type {type(item).__name__}")


def expand_inputs(inputs, split: str, work_dir: Callable[[], Path]) -> list[Source]:
    """Sources of ``inputs`` (one, a list, or a ``{source_name: input}`` mapping; ``"name=path"`` names a path).

    Raises:
        PreferenceDataError: no inputs, a missing or unreadable path, a link loop, an unsupported file type.
    """
    if isinstance(inputs, Mapping):
        items = [(str(k), v) for k, v in inputs.items()]
    elif isinstance(inputs, (list, tuple)) and not (inputs and isinstance(inputs[0], Mapping)):
        items = [(None, v) for v in inputs]
    else:
        items = [(None, inputs)]
    if not items:
        raise PreferenceDataError("no inputs given")
    out: list[Source] = []
    for name, item in items:
        if isinstance(item, (str, os.PathLike)):
            s = str(item)
            if name is None and "=" in s and not Path(s).exists():
                name, s = s.split("=", 1)
            out.extend(_path_sources(s, name, split, work_dir))
        else:
            out.append(_memory_source(name or f"input{len(out)}", item, split))
    return out
