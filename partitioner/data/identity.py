"""Row identity: the content hash of a pair (``row_id``) and the count of earlier copies of each pair.

``row_id`` is the first 16 hex digits of sha256 over the canonical JSON of ``[prompt, chosen, rejected]``
(:func:`pair_content_hash`). For text pairs without characters JSON escapes, that JSON is
``'["' + prompt + '","' + chosen + '","' + rejected + '"]'``, and :func:`text_pair_digests` hashes it straight from
the Arrow buffers (the same bytes, so the same ids) without building Python strings.

Duplicates are counted in a :class:`DuplicateIndex`: an open-addressing hash table of the 64-bit ids in a numpy
array (8 bytes a slot, 75% full at most; 32 MB for 2M rows), updated a batch at a time.
"""

from __future__ import annotations

import binascii
import hashlib
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


def text_pair_digests(prompt: pa.Array, chosen: pa.Array, rejected: pa.Array) -> list[bytes]:
    """sha256 digests of the canonical JSON of non-null text pairs, as :func:`pair_content_hash` computes them."""
    cols = [c.cast(pa.string()) if c.type != pa.string() else c for c in (prompt, chosen, rejected)]
    escaped = rows_with_bytes(cols[0], _needs_escape) | rows_with_bytes(cols[1], _needs_escape) | rows_with_bytes(
        cols[2], _needs_escape)
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
    """How many times each 64-bit id was seen: an open-addressing table of the ids (numpy, linear probing, 8 bytes a
    slot, at most 75% full), plus a dict of the counts of ids seen more than once (few in real data)."""

    LOAD = 0.75

    def __init__(self, capacity: int = 1 << 16):
        self.keys = np.zeros(capacity, dtype=np.uint64)  # 0 = empty slot; the id 0 itself is counted apart
        self.size = 0
        self.repeats: dict[int, int] = {}  # id -> count, for ids seen more than once
        self.zeros = 0

    def _grow(self, needed: int) -> None:
        capacity = len(self.keys)
        while needed > self.LOAD * capacity:
            capacity *= 2
        if capacity == len(self.keys):
            return
        old = self.keys[self.keys != 0]
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.size = 0
        step = 1 << 16  # re-inserted a slice at a time: the probing temporaries stay small
        for lo in range(0, len(old), step):
            self._insert(old[lo:lo + step], np.ones(min(step, len(old) - lo), dtype=np.int64), count=False)

    def _insert(self, keys: np.ndarray, counts: np.ndarray, count: bool = True) -> np.ndarray:
        """Add distinct non-zero ``keys`` seen ``counts`` times each; returns each key's count before."""
        cap = np.uint64(len(self.keys))
        before = np.zeros(len(keys), dtype=np.int64)
        pending = np.arange(len(keys))
        slot = (keys % cap).astype(np.int64)
        while pending.size:
            s = slot[pending]
            held = self.keys[s]
            found = held == keys[pending]
            free = held == 0
            for i in pending[found].tolist():  # ids seen before: their counts live in the dict
                key = int(keys[i])
                before[i] = self.repeats.get(key, 1)
                self.repeats[key] = before[i] + int(counts[i])
            free_at = np.flatnonzero(free)
            self.keys[s[free_at]] = keys[pending[free_at]]  # keys wanting the same free slot: one of them lands
            landed = free_at[self.keys[s[free_at]] == keys[pending[free_at]]]
            winners = pending[landed]
            self.size += len(winners)
            if count:
                for i in winners[counts[winners] > 1].tolist():
                    self.repeats[int(keys[i])] = int(counts[i])
            done = found.copy()
            done[landed] = True
            # a key whose slot holds another key probes the next one; one that lost a free slot sees it taken next
            moved = ~found & ~free
            slot[pending[moved]] = (s[moved] + 1) % len(self.keys)
            pending = pending[~done]
        return before

    def occurrences(self, keys: np.ndarray) -> np.ndarray:
        """For each key in order: how many earlier keys (this batch and before) are equal to it."""
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        before = np.zeros(len(uniq), dtype=np.int64)
        nonzero = uniq != 0
        if not nonzero.all():  # the id 0 (the empty-slot marker) is counted apart
            before[~nonzero] = self.zeros
            self.zeros += int(counts[~nonzero][0])
        self._grow(self.size + int(nonzero.sum()))
        before[nonzero] = self._insert(uniq[nonzero], counts[nonzero])
        if counts.max() == 1:  # no copies within the batch
            return before[inverse]
        order = np.argsort(inverse, kind="stable")
        starts = np.cumsum(counts) - counts
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys)) - np.repeat(starts, counts)
        return before[inverse] + rank
