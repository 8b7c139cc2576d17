"""Row identity: the content hash of a pair (``row_id``) and the count of earlier copies of each pair.

``row_id`` is the first 16 hex digits of sha256 over the canonical JSON of ``[prompt, chosen, rejected]``
(:func:`pair_content_hash`). For text pairs without characters JSON escapes, that JSON is
``'["' + prompt + '","' + chosen + '","' + rejected + '"]'``, and :func:`text_pair_digests` hashes it straight from
the Arrow buffers (the same bytes, so the same ids) without building Python strings.

Duplicates are counted in a :class:`DuplicateIndex`: the 64-bit ids in sorted numpy runs plus a set of recent ones
(about 8 bytes an id, 16 MB for 2M rows, no growth spikes), updated a batch at a time.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import json

import numpy as np
import pyarrow as pa



def canonical_json(prompt, chosen, rejected) -> bytes:
    """The bytes :func:`pair_content_hash` hashes (raises UnicodeEncodeError for a lone surrogate)."""
    return json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True,
                      separators=(",", ":")).encode("utf-8")


def pair_content_hash(prompt, chosen, rejected) -> str:
    """16-hex content hash of a canonical pair: the same pair gets the same id in every run."""
    return hashlib.sha256(canonical_json(prompt, chosen, rejected)).hexdigest()[:16]


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, UTF-8 bytes)`` of a string array as numpy views (no copy for ``pa.string()``)."""
    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    return offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8))


def rows_with_bytes(arr: pa.Array, byte_test) -> np.ndarray:
    """Which strings of ``arr`` hold a byte for which ``byte_test(bytes) -> bool mask`` is true."""
    offsets, data = string_buffers(arr)
    out = np.zeros(len(arr), dtype=bool)
    mask = byte_test(data[offsets[0]:offsets[-1]])
    if mask.any():
        hits = np.flatnonzero(mask) + offsets[0]
        out[np.unique(np.searchsorted(offsets, hits, side="right") - 1)] = True
    return out


def _needs_escape(data: np.ndarray) -> np.ndarray:
    return (data < 0x20) | (data == 0x22) | (data == 0x5C)  # what json.dumps(ensure_ascii=False) escapes


def text_pair_digests(prompt: pa.Array, chosen: pa.Array, rejected: pa.Array, may_escape: bool = True) -> list[bytes]:
    """sha256 digests of the canonical JSON of non-null text pairs, as :func:`pair_content_hash` computes them.

    ``may_escape=False`` says no text holds a character JSON escapes (known from JSON source without a backslash).
    """
    cols = [c.cast(pa.string()) if c.type != pa.string() else c for c in (prompt, chosen, rejected)]
    escaped = np.zeros(len(cols[0]), dtype=bool)
    if may_escape:
        for col in cols:
            escaped |= rows_with_bytes(col, _needs_escape)
    (po, pd), (co, cd), (ro, rd) = ((o.tolist(), memoryview(d)) for o, d in map(string_buffers, cols))
    sha, join = hashlib.sha256, b'","'.join
    out = [sha(b'["' + join((pd[a:b], cd[c:d], rd[e:f])) + b'"]').digest()
           for a, b, c, d, e, f in zip(po, po[1:], co, co[1:], ro, ro[1:])]
    where = np.flatnonzero(escaped)
    if len(where):  # text with quotes, backslashes or control characters: the JSON encoder escapes them
        values = [c.take(pa.array(where)).to_pylist() for c in cols]
        for i, p, c, r in zip(where.tolist(), *values):
            out[i] = sha(canonical_json(p, c, r)).digest()
    return out


def digest_keys(digests: list[bytes]) -> tuple[np.ndarray, bytes]:
    """``(64-bit keys, hex of the 16-digit ids back to back)`` of sha256 digests."""
    prefixes = b"".join(d[:8] for d in digests)
    return np.frombuffer(prefixes, dtype=">u8").astype(np.uint64), binascii.hexlify(prefixes)


def row_id_array(hex_ids: bytes, occurrences: np.ndarray) -> pa.Array:
    """``row_id`` strings: the 16-digit id, with ``-N`` for the N-th earlier copy of the same pair."""
    n = len(occurrences)
    if not occurrences.any():
        offsets = np.arange(0, 16 * n + 1, 16, dtype=np.int32)
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(hex_ids))
    text = hex_ids.decode("ascii")
    return pa.array([text[16 * i:16 * i + 16] + (f"-{k}" if k else "") for i, k in enumerate(occurrences.tolist())],
                    type=pa.string())


class DuplicateIndex:
    """How many times each 64-bit id was seen, in about 8 bytes an id and without growth spikes.

    Ids are first kept in a set of recent ids; every RUN of them is frozen into a sorted numpy array (a *run*), which
    later batches search with ``searchsorted``. Counts of ids seen more than once live in a dict (few in real data).
    """

    RUN = 1 << 17

    def __init__(self):
        self.runs: list[np.ndarray] = []
        self.recent: set[int] = set()
        self.repeats: dict[int, int] = {}  # id -> count, for ids seen more than once

    def _in_runs(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[pos] == keys
        return found

    def occurrences(self, keys: np.ndarray) -> np.ndarray:
        """For each key in order: how many earlier keys (this batch and before) are equal to it."""
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        before = np.zeros(len(uniq), dtype=np.int64)
        listed = uniq.tolist()
        seen = self._in_runs(uniq)
        if self.recent:
            recent = self.recent
            seen |= np.fromiter((k in recent for k in listed), dtype=bool, count=len(listed))
        for i in np.flatnonzero(seen).tolist():  # ids seen in earlier batches (rare)
            before[i] = self.repeats.get(listed[i], 1)
            self.repeats[listed[i]] = int(before[i] + counts[i])
        for i in np.flatnonzero(~seen & (counts > 1)).tolist():  # new ids with copies in this batch
            self.repeats[listed[i]] = int(counts[i])
        self.recent.update(itertools.compress(listed, (~seen).tolist()))
        if len(self.recent) >= self.RUN:
            self.runs.append(np.sort(np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))))
            self.recent = set()
        if counts.max() == 1:  # no copies within the batch
            return before[inverse]
        order = np.argsort(inverse, kind="stable")
        starts = np.cumsum(counts) - counts
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys)) - np.repeat(starts, counts)
        return before[inverse] + rank
