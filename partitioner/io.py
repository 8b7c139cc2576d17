"""Files on disk, one implementation each: atomic writes, Arrow IPC streams, sha256, completion markers.

* Every file we write appears whole or not at all: it is written to a hidden temporary name beside its target
  (``.NAME.tmp-PID``), flushed and fsynced, then renamed into place, and the folder is fsynced. A failed write
  (a full disk, say) removes its temporary file and leaves the previous file as it was.
* Arrow files are IPC *streams* (what ``datasets.Dataset.from_file`` reads), hashed while they are written.
* A *completion marker* is a small JSON file written last, atomically: the work it stands for is complete when the
  marker exists and its recorded ``sha256`` values match (:func:`write_marker`, :func:`read_marker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from sdpo_core.errors import UserError

TMP_INFIX = ".tmp-"


class StorageError(UserError):
    """A file cannot be read or written as asked (one line: which file and why)."""


def library_version() -> str:
    """This package's installed version (``0+unknown`` when run from a source tree without installing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdpo-curriculum")
    except PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """sha256 of a file, read into one reused buffer (no copy per block)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to ``path``."""
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")


def remove_temp_files(folder: Path) -> None:
    """Delete temporary files a killed writer left in ``folder`` (never a finished file)."""
    for stale in Path(folder).glob(f".*{TMP_INFIX}*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingSink:
    """A write-only file object that hashes what passes through it (files are hashed while written)."""

    def __init__(self, f):
        self._f, self.sha = f, hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        self.sha.update(data)
        return self._f.write(data)

    def flush(self):
        self._f.flush()

    def close(self):
        self.closed = True

    def writable(self):
        return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = True):
    """Open ``path`` for binary writing under its temporary name; on success it is renamed into place.

    Yields a :class:`HashingSink`; its ``sha`` holds the digest of what was written. On any error the temporary
    file is removed and ``path`` is left as it was.

    Raises:
        StorageError: the folder cannot be written (no space left, no permission, not a folder...).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with f:
            sink = HashingSink(f)
            yield sink
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StorageError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged") \
                from e
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = True) -> str:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns its sha256."""
    with atomic_file(path, fsync=fsync) as sink:
        sink.write(data.encode("utf-8") if isinstance(data, str) else data)
    return sink.sha.hexdigest()


def write_json(path: str | os.PathLike, obj, fsync: bool = True, sort_keys: bool = False) -> str:
    """``obj`` as indented UTF-8 JSON, atomically; returns its sha256."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys, default=str) + "\n"
    return atomic_write(path, text, fsync=fsync)


def read_json(path: str | os.PathLike, what: str = "file") -> object:
    """A JSON file's content.

    Raises:
        StorageError: the file cannot be read or is not JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StorageError(f"cannot read {what} {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from e


def write_arrow_stream(table, path: str | os.PathLike, fsync: bool = True) -> str:
    """Write a ``pyarrow.Table`` as an Arrow IPC stream, atomically; returns its sha256 (hashed while written)."""
    import pyarrow as pa

    with atomic_file(path, fsync=fsync) as sink:
        with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
            writer.write_table(table)
    return sink.sha.hexdigest()


def read_arrow_stream(path: str | os.PathLike):
    """The ``pyarrow.Table`` in an Arrow IPC stream file.

    Raises:
        StorageError: the file is missing, unreadable, truncated or not an Arrow IPC stream.
    """
    import pyarrow as pa

    try:
        with pa.OSFile(str(path), "rb") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise StorageError(f"{path} is not a readable Arrow IPC stream: {str(e).splitlines()[0]}") from e


def write_marker(path: str | os.PathLike, info: dict) -> None:
    """Write a completion marker (JSON, atomically, last)."""
    write_json(path, info)


def read_marker(path: str | os.PathLike) -> dict | None:
    """A completion marker's content, or None when it is absent or unreadable (the work is then not complete)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_vouches_for(marker: dict | None, path: Path) -> bool:
    """Whether ``marker`` records ``path``'s current sha256 (``{"sha256": ...}``)."""
    return bool(marker) and path.is_file() and marker.get("sha256") == sha256_file(path)
