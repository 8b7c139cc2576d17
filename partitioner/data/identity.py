"""Row identity: the content hash of a pair (``row_id``) and the count of earlier copies of each pair.

``row_id`` is the first 16 hex digits of sha256 over the canonical JSON of ``[prompt, chosen, rejected]``
(:func:`pair_content_hash`). For text pairs without characters JSON escapes, that JSON is
``'["' + prompt + '","' + chosen + '","' + rejected + '"]'``, and :func:`text_pair_digests` hashes it straight from
the Arrow buffers (the same bytes, so the same ids) without building Python strings.

Duplicates are counted in a :class:`DuplicateIndex`: an open-addressing hash table of the 64-bit ids in two numpy
arrays (12 bytes a slot, half full at most), updated a batch at a time.
"""

from __future__ import annotations

import binascii
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_NEEDS_ESCAPE = r'["\\\x00-\x1f]'  # what json.dumps(ensure_ascii=False) escapes in a string


def canonical_json(prompt, chosen, rejected) -> bytes:
    """The bytes :func:`pair_content_hash` hashes (raises UnicodeEncodeError for a lone surrogate)."""
    return json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True,
                      separators=(",", ":")).encode("utf-8")


def pair_content_hash(prompt, chosen, rejected) -> str:
    """16-hex content hash of a canonical pair: the same pair gets the same id in every run."""
    return hashlib.sha256(canonical_json(prompt, chosen, rejected)).hexdigest()[:16]


def _offsets_and_data(arr: pa.Array) -> tuple[list[int], memoryview]:
    arr = arr.cast(pa.string()) if arr.type != pa.string() else arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1].tolist()
    data = arr.buffers()[2]
    return offsets, memoryview(data if data is not None else b"")


def text_pair_digests(prompt: pa.Array, chosen: pa.Array, rejected: pa.Array) -> list[bytes]:
    """sha256 digests of the canonical JSON of non-null text pairs, as :func:`pair_content_hash` computes them."""
    cols = [prompt, chosen, rejected]
    escaped = np.zeros(len(prompt), dtype=bool)
    for col in cols:
        escaped |= pc.match_substring_regex(col, _NEEDS_ESCAPE).to_numpy(zero_copy_only=False)
    (po, pd), (co, cd), (ro, rd) = (_offsets_and_data(c) for c in cols)
    sha, join = hashlib.sha256, b'","'.join
    out = [sha(b'["' + join((pd[a:b], cd[c:d], rd[e:f])) + b'"]').digest()
           for a, b, c, d, e, f in zip(po, po[1:], co, co[1:], ro, ro[1:])]
    for i in np.flatnonzero(escaped).tolist():  # text with quotes, backslashes or control characters: json.dumps
        out[i] = sha(canonical_json(*(c[i].as_py() for c in cols))).digest()
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
    """How many times each 64-bit id was seen (numpy open addressing, linear probing, grown at half full)."""

    def __init__(self, capacity: int = 1 << 16):
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.counts = np.zeros(capacity, dtype=np.uint32)
        self.size = 0

    def _grow(self, needed: int) -> None:
        capacity = len(self.keys)
        while needed * 2 > capacity:
            capacity *= 2
        if capacity == len(self.keys):
            return
        used = self.counts > 0
        keys, counts = self.keys[used], self.counts[used]
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.counts = np.zeros(capacity, dtype=np.uint32)
        self.size = 0
        self._add_unique(keys, counts)

    def _add_unique(self, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Add ``counts`` to distinct ``keys``; returns each key's count before."""
        mask = len(self.keys) - 1
        counts = counts.astype(np.uint32)
        before = np.zeros(len(keys), dtype=np.int64)
        pending = np.arange(len(keys))
        slot = (keys & np.uint64(mask)).astype(np.int64)
        while pending.size:
            s = slot[pending]
            occupied = self.counts[s] > 0
            found = occupied & (self.keys[s] == keys[pending])
            hit = pending[found]
            before[hit] = self.counts[s[found]]
            self.counts[s[found]] += counts[hit]
            free = np.flatnonzero(~occupied)
            free_slots, first = np.unique(s[free], return_index=True)
            winners = pending[free[first]]
            self.keys[free_slots] = keys[winners]
            self.counts[free_slots] = counts[winners]
            self.size += len(winners)
            done = found.copy()
            done[free[first]] = True
            # a key whose slot holds another key probes the next one; one that lost a free slot sees it taken next
            collided = occupied & ~found
            slot[pending[collided]] = (s[collided] + 1) & mask
            pending = pending[~done]
        return before

    def occurrences(self, keys: np.ndarray) -> np.ndarray:
        """For each key in order: how many earlier keys (this batch and before) are equal to it."""
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        self._grow(self.size + len(uniq))
        before = self._add_unique(uniq, counts)
        order = np.argsort(inverse, kind="stable")
        starts = np.cumsum(counts) - counts
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys)) - np.repeat(starts, counts)
        return before[inverse] + rank
