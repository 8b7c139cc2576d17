"""Order preference rows easy -> hard, cut them into chunks and write the shards of a stepwise-DPO curriculum.

How it scales: only the small key columns (the order key, ``row_id``, ``source``) are read into memory and
sorted; rows are then copied into the shards in bounded batches straight from the memory-mapped input
(per input record batch ``take``, then one small re-order), so memory stays flat however large the input is.
When the input is a scored folder the mapping's resident pages are released after each output batch, so the
process never holds more than a few batches of the file in its resident set.

Orderings (``PartitionConfig.order``):
  ``easy_to_hard``  by the difficulty signal, easiest first (default; ``difficulty`` column, higher = harder)
  ``hard_to_easy``  the reverse
  ``random``        seeded permutation (the paper's ablation)
  ``by_source``     each source together, sources sorted by the reference model's reward accuracy on them
                    (share of rows with chosen_logps - rejected_logps > 0), highest = easiest first, as in sDPO
  ``column``        any numeric column, ascending or descending
Ties are broken by ``row_id``, so the order is deterministic and independent of the input's row order.

Chunkings: ``n`` equal chunks (``chunks``), explicit ``fractions`` (sum to 1), ``thresholds`` on the order key,
``quantiles`` of the order key, one chunk per source (``by_source``'s default); ``min_chunk_size`` merges a
too-small chunk into its neighbour; ``shuffle_within`` permutes rows inside each chunk (seeded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import CHOSEN_LOGPS, DIFFICULTY, REJECTED_LOGPS, ROW_ID, SOURCE
from .shards import (
    REJECTS,
    SCHEMA_VERSION,
    PartitionError,
    ShardWriter,
    library_version,
    prepare_output_dir,
    schema_columns,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)

ORDERS = ("easy_to_hard", "hard_to_easy", "random", "by_source", "column")
SCORE_ORDERS = ("easy_to_hard", "hard_to_easy", "by_source")
CHUNKINGS = ("auto", "equal", "fractions", "thresholds", "quantiles", "source")


class PartitionConfigError(PartitionError):
    """Settings that cannot produce a partition for this input (one-line message)."""


def _floats(value) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise PartitionConfigError(f"expected a list of numbers, got {value!r}") from e


@dataclass
class PartitionConfig:
    """How rows are ordered, chunked and written. Checked in ``__post_init__``; data-dependent checks at run."""

    order: str = field(default="easy_to_hard", metadata={"help": f"Curriculum order: one of {', '.join(ORDERS)}."})
    signal: str | None = field(
        default=None,
        metadata={"help": "Difficulty signal for easy_to_hard/hard_to_easy (a name from scoring.json); "
                  "default: the 'difficulty' column."},
    )
    column: str | None = field(default=None, metadata={"help": "Numeric column for order='column'."})
    ascending: bool = field(default=True, metadata={"help": "order='column': ascending (True) or descending."})
    seed: int = field(default=0, metadata={"help": "Seed of order='random' and shuffle_within."})
    chunking: str = field(
        default="auto",
        metadata={"help": f"One of {', '.join(CHUNKINGS)}; 'auto' picks from the options given "
                  "(fractions/thresholds/quantiles, 'source' for by_source, else 'equal')."},
    )
    chunks: int = field(default=3, metadata={"help": "Number of equal chunks (chunking='equal')."})
    fractions: list[float] | None = field(default=None, metadata={"help": "Chunk shares, e.g. 0.2,0.3,0.5 (sum 1)."})
    thresholds: list[float] | None = field(
        default=None, metadata={"help": "Cut points on the order key (increasing along the order)."}
    )
    quantiles: list[float] | None = field(
        default=None, metadata={"help": "Cut points as quantiles of the order key, e.g. 0.25,0.5,0.75."}
    )
    min_chunk_size: int = field(
        default=1, metadata={"help": "Chunks smaller than this are merged into the previous chunk (next for the first)."}
    )
    shuffle_within: bool = field(default=False, metadata={"help": "Seeded shuffle of the rows inside each chunk."})
    parquet: bool = field(default=False, metadata={"help": "Also write chunk-NNN.parquet copies."})
    fsync: bool = field(default=True, metadata={"help": "fsync shards before the manifest (survives power loss)."})
    batch_rows: int = field(default=8192, metadata={"help": "Rows per output record batch (bounds memory)."})
    overwrite: bool = field(default=True, metadata={"help": "Replace a previous partition in the output folder."})

    def __post_init__(self):
        if self.order not in ORDERS:
            raise PartitionConfigError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.chunking not in CHUNKINGS:
            raise PartitionConfigError(f"unknown chunking {self.chunking!r}; choose one of {', '.join(CHUNKINGS)}")
        self.fractions, self.thresholds, self.quantiles = map(_floats, (self.fractions, self.thresholds, self.quantiles))
        given = [n for n in ("fractions", "thresholds", "quantiles") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PartitionConfigError(f"give only one of fractions, thresholds, quantiles (got {', '.join(given)})")
        if self.chunking == "auto":
            self.chunking = given[0] if given else ("source" if self.order == "by_source" else "equal")
        elif self.chunking in ("fractions", "thresholds", "quantiles") and getattr(self, self.chunking) is None:
            raise PartitionConfigError(f"chunking {self.chunking!r} needs --{self.chunking}")
        if self.chunking == "source" and self.order != "by_source":
            raise PartitionConfigError("chunking 'source' (one chunk per source) needs order 'by_source'")
        if self.order == "column" and not self.column:
            raise PartitionConfigError("order 'column' needs a column name (--column)")
        if self.order != "column" and self.column:
            raise PartitionConfigError(f"--column is only used with order 'column', not {self.order!r}")
        if self.signal and self.order not in ("easy_to_hard", "hard_to_easy"):
            raise PartitionConfigError(f"--signal is only used with easy_to_hard/hard_to_easy, not {self.order!r}")
        if self.chunking == "equal" and (not isinstance(self.chunks, int) or self.chunks < 1):
            raise PartitionConfigError(f"chunks must be a positive integer, got {self.chunks!r}")
        if self.fractions is not None:
            if any(f <= 0 for f in self.fractions):
                raise PartitionConfigError(f"fractions must be positive, got {self.fractions}")
            if abs(sum(self.fractions) - 1.0) > 1e-6:
                raise PartitionConfigError(f"fractions must sum to 1, got {sum(self.fractions):g} ({self.fractions})")
        if self.quantiles is not None:
            q = self.quantiles
            if not q or any(not 0 < x < 1 for x in q) or any(b <= a for a, b in zip(q, q[1:])):
                raise PartitionConfigError(f"quantiles must be increasing and strictly between 0 and 1, got {q}")
        if self.thresholds is not None:
            t = self.thresholds
            if not t or any(b <= a for a, b in zip(t, t[1:])):
                raise PartitionConfigError(f"thresholds must be increasing, got {t}")
            if self.order in ("random", "by_source"):
                raise PartitionConfigError(f"thresholds need a score or column order, not {self.order!r}")
        if self.quantiles is not None and self.order in ("random", "by_source"):
            raise PartitionConfigError(f"quantiles need a score or column order, not {self.order!r}")
        if self.min_chunk_size < 1:
            raise PartitionConfigError(f"min_chunk_size must be >= 1, got {self.min_chunk_size}")
        if self.batch_rows < 1:
            raise PartitionConfigError(f"batch_rows must be >= 1, got {self.batch_rows}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- input


class _Input:
    """Rows to partition, as record batches (memory-mapped where the input is a file), plus what came with them."""

    def __init__(self, batches, schema, *, scoring=None, rejects=None, fingerprint=None, maps=(), rows_in=None):
        self.batches: list[pa.RecordBatch] = [b for b in batches if b.num_rows]
        self.schema: pa.Schema = schema
        self.scoring: dict | None = scoring
        self.rejects: pa.Table | None = rejects
        self.fingerprint: dict = fingerprint or {}
        self.maps: list[mmap.mmap] = list(maps)
        lengths = [b.num_rows for b in self.batches]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])
        self.rows_in = rows_in

    def column(self, name: str) -> pa.ChunkedArray:
        if name not in self.schema.names:
            raise KeyError(name)
        i = self.schema.get_field_index(name)
        return pa.chunked_array([b.column(i) for b in self.batches], type=self.schema.field(i).type)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.batches)

    def release(self) -> None:
        """Drop the mapped input pages from this process's resident set (the OS page cache keeps them)."""
        for m in self.maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass


def _map_stream(path: Path) -> tuple[list[pa.RecordBatch], pa.Schema, mmap.mmap | None]:
    size = path.stat().st_size
    if size == 0:
        raise PartitionError(f"{path} is empty, not an Arrow IPC stream")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:  # rows are taken at random positions: no read-ahead / fault-around (keeps the resident set small)
        m.madvise(mmap.MADV_RANDOM)
    except (AttributeError, OSError):
        pass
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(m)))
        batches = list(reader)
    except pa.ArrowInvalid as e:
        raise PartitionError(f"{path} is not an Arrow IPC stream: {str(e).splitlines()[0]}") from e
    return batches, reader.schema, m


def _read_scored_dir(path: Path) -> _Input:
    """A scored folder (CONTRACTS.md section 2): parts/*.arrow + scoring.json + rejects.arrow, complete."""
    meta_path = path / "scoring.json"
    if not meta_path.exists():
        raise PartitionError(f"{path} is not a scored folder (no scoring.json); run `sdpo score` first")
    if not (path / "_SUCCESS").exists():
        raise PartitionError(f"scored folder {path} is incomplete (no _SUCCESS); rerun `sdpo score` to finish it")
    scoring = json.loads(meta_path.read_text(encoding="utf-8"))
    parts = sorted((path / "parts").glob("part-*.arrow"))
    listed = [p["file"] for p in scoring.get("parts", [])]
    if listed:
        names = {Path(f).name for f in listed}
        parts = [p for p in parts if p.name in names]
        if len(parts) != len(names):
            raise PartitionError(f"scored folder {path} is missing parts listed in scoring.json")
    if not parts:
        raise PartitionError(f"scored folder {path} has no parts/part-*.arrow")
    batches, maps, schema = [], [], None
    for p in parts:
        b, s, m = _map_stream(p)
        if schema is not None and s != schema:
            raise PartitionError(f"{p.name} has different columns than {parts[0].name}")
        schema = s
        batches += b
        maps.append(m)
    rejects = None
    if (path / REJECTS).exists():
        from .rejects import read_arrow_stream

        rejects = read_arrow_stream(path / REJECTS)
    fingerprint = {
        "kind": "scored",
        "path": str(path.resolve()),
        "scoring_json_sha256": sha256_file(meta_path),
        "parts": [{k: p.get(k) for k in ("file", "rows", "sha256")} for p in scoring.get("parts", [])],
    }
    return _Input(batches, schema, scoring=scoring, rejects=rejects, fingerprint=fingerprint, maps=maps,
                  rows_in=scoring.get("rows_in"))


def _table_of(data) -> pa.Table:
    """The Arrow table behind a ``datasets.Dataset`` (memory-mapped when the dataset is), or a ``pa.Table``."""
    if isinstance(data, pa.Table):
        return data
    if getattr(data, "_indices", None) is not None:
        data = data.flatten_indices()
    return data.data.table


def _row_ids_sha256(ids: pa.ChunkedArray) -> str:
    h = hashlib.sha256()
    for chunk in ids.chunks:
        h.update("\n".join(chunk.to_pylist()).encode())
        h.update(b"\n")
    return h.hexdigest()


def open_input(data, rejects=None) -> _Input:
    """Wrap a scored folder path, a ``datasets.Dataset`` or a ``pyarrow.Table`` as partitioner input.

    Raises:
        PartitionError: missing/incomplete scored folder, empty input, no ``row_id`` column.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if not path.is_dir():
            raise PartitionError(f"input {path} is not a scored folder; load and score files first (sdpo partition FILES runs the scorer)")
        inp = _read_scored_dir(path)
    else:
        try:
            table = _table_of(data)
        except AttributeError as e:
            raise PartitionError(f"cannot partition a {type(data).__name__}: give a datasets.Dataset, a pyarrow.Table or a scored folder") from e
        # Keep datasets' feature metadata on the schema so shards load back with the same features.
        batches = table.to_batches()
        rej = rejects if rejects is None or isinstance(rejects, pa.Table) else None
        if rejects is not None and rej is None:
            from .rejects import rejects_table

            rej = rejects_table(list(rejects))
        fp = {"kind": type(data).__name__, "rows": table.num_rows, "columns": table.column_names}
        if ROW_ID in table.column_names and table.num_rows:
            fp["row_ids_sha256"] = _row_ids_sha256(table.column(ROW_ID))
        inp = _Input(batches, table.schema, rejects=rej, fingerprint=fp)
    if inp.num_rows == 0:
        raise PartitionError("input has no rows to partition")
    if ROW_ID not in inp.schema.names:
        raise PartitionError(f"input has no '{ROW_ID}' column; load it with partitioner.loading.load_preferences")
    return inp


# -------------------------------------------------------------------------------------------------- ordering


def _numeric(inp: _Input, name: str, what: str) -> np.ndarray:
    if name not in inp.schema.names:
        raise PartitionConfigError(f"{what} column {name!r} not in input (columns: {', '.join(inp.schema.names)})")
    typ = inp.schema.field(name).type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
        raise PartitionConfigError(f"{what} column {name!r} is {typ}, not numeric")
    col = inp.column(name)
    if col.null_count:
        raise PartitionConfigError(f"{what} column {name!r} has {col.null_count} null values")
    values = col.to_numpy().astype(np.float64, copy=False)
    inp.release()
    bad = int(np.isnan(values).sum())
    if bad:
        raise PartitionConfigError(f"{what} column {name!r} has {bad} NaN values")
    return values


def _signal(inp: _Input, config: PartitionConfig) -> tuple[str, np.ndarray, str, bool]:
    """(signal name, values, column, higher_is_harder) for the score orders."""
    signals = {s["name"]: s for s in (inp.scoring or {}).get("signals", [])}
    name = config.signal or DIFFICULTY
    if name == DIFFICULTY:
        if DIFFICULTY not in inp.schema.names:
            raise PartitionConfigError(
                f"order {config.order!r} needs scores but the input has no '{DIFFICULTY}' column: score it first "
                "(sdpo score) or use --order random/column"
            )
        return DIFFICULTY, _numeric(inp, DIFFICULTY, "difficulty"), DIFFICULTY, True
    if name not in signals:
        avail = sorted(signals) + [DIFFICULTY]
        raise PartitionConfigError(f"unknown signal {name!r}; available: {', '.join(avail)}")
    spec = signals[name]
    col = spec.get("column", name)
    values = _numeric(inp, col, f"signal {name!r}")
    return name, values, col, spec.get("direction", "higher_is_harder") != "higher_is_easier"


def reward_accuracy_by_source(inp: _Input) -> dict[str, float]:
    """Share of rows with chosen_logps - rejected_logps > 0 per source (the reference model's reward accuracy)."""
    for c in (CHOSEN_LOGPS, REJECTED_LOGPS):
        if c not in inp.schema.names:
            raise PartitionConfigError(
                f"order 'by_source' needs scored input ('{c}' missing): score it first (sdpo score)"
            )
    margin = _numeric(inp, CHOSEN_LOGPS, "score") - _numeric(inp, REJECTED_LOGPS, "score")
    codes, names = _source_codes(inp)
    wins = np.bincount(codes, weights=(margin > 0).astype(np.float64), minlength=len(names))
    counts = np.bincount(codes, minlength=len(names))
    return {n: float(w / c) for n, w, c in zip(names, wins, counts) if c}


def _source_codes(inp: _Input) -> tuple[np.ndarray, list[str]]:
    if SOURCE not in inp.schema.names:
        return np.zeros(inp.num_rows, dtype=np.int32), [""]
    enc = pc.dictionary_encode(inp.column(SOURCE)).combine_chunks()
    inp.release()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int32), [str(s) for s in enc.dictionary.to_pylist()]


def _index_array(indices) -> np.ndarray:
    """Sort indices as the smallest signed integer array that holds them (4 bytes a row below 2**31 rows)."""
    arr = indices.to_numpy() if isinstance(indices, (pa.Array, pa.ChunkedArray)) else indices
    return arr.astype(np.int32 if len(arr) < 2**31 else np.int64)


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def _row_id_keys(inp: _Input):
    """Row ids as order-preserving uint64 when every id is the loader's 16-hex content hash, else the strings.

    Same-length lowercase hex compares like the number it spells, so the uint64 sorts exactly as the strings
    do, in 8 bytes a row instead of a string column.
    """
    col = inp.column(ROW_ID)
    out = np.empty(len(col), dtype=np.uint64)
    pos = 0
    for chunk in col.chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count or not pa.types.is_string(chunk.type):
            return col
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=n + 1, offset=chunk.offset * 4)
        if offsets[-1] - offsets[0] != 16 * n or not np.all(np.diff(offsets) == 16):
            return col
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8, count=16 * n, offset=int(offsets[0]))
        digits = _HEX[data].reshape(n, 16)
        if (digits == 255).any():
            return col
        value = np.zeros(n, dtype=np.uint64)
        for i in range(16):
            value = (value << np.uint64(4)) | digits[:, i].astype(np.uint64)
        out[pos:pos + n] = value
        pos += n
    inp.release()
    return out


def _argsort(key: np.ndarray | None, row_ids, descending: bool = False) -> np.ndarray:
    """Stable order by key (asc/desc), ties by row_id ascending."""
    if isinstance(row_ids, np.ndarray):
        keys = [row_ids] if key is None else [row_ids, -key if descending else key]
        return _index_array(np.lexsort(keys))
    cols = {"r": row_ids}
    sort_keys = [("r", "ascending")]
    if key is not None:
        cols = {"k": pa.array(key), **cols}
        sort_keys = [("k", "descending" if descending else "ascending")] + sort_keys
    return _index_array(pc.sort_indices(pa.table(cols), sort_keys=sort_keys))


def compute_order(inp: _Input, config: PartitionConfig) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Row positions in curriculum order, the order key aligned with them (or None), and the manifest's 'ordering'."""
    row_ids = _row_id_keys(inp)
    info: dict = {"order": config.order, "seed": config.seed}
    if config.order in ("easy_to_hard", "hard_to_easy"):
        name, values, col, higher_is_harder = _signal(inp, config)
        desc = (config.order == "hard_to_easy") == higher_is_harder
        perm = _argsort(values, row_ids, descending=desc)
        info.update(signal=name, column=col, ascending=not desc,
                    direction="higher_is_harder" if higher_is_harder else "higher_is_easier")
        return perm, values[perm], info
    if config.order == "column":
        values = _numeric(inp, config.column, "order")
        perm = _argsort(values, row_ids, descending=not config.ascending)
        info.update(column=config.column, ascending=config.ascending)
        return perm, values[perm], info
    if config.order == "random":
        base = _argsort(None, row_ids)
        perm = base[np.random.default_rng(config.seed).permutation(len(base))]
        return perm, None, info
    # by_source
    acc = reward_accuracy_by_source(inp)
    codes, names = _source_codes(inp)
    ranked = sorted(acc, key=lambda s: (-acc[s], s))
    rank_of_code = np.array([ranked.index(n) if n in acc else len(ranked) for n in names], dtype=np.float64)
    within = _numeric(inp, DIFFICULTY, "difficulty") if DIFFICULTY in inp.schema.names else None
    if isinstance(row_ids, np.ndarray):
        perm = _index_array(np.lexsort([row_ids] + ([within] if within is not None else []) + [rank_of_code[codes]]))
    else:
        table = {"s": pa.array(rank_of_code[codes])}
        keys = [("s", "ascending")]
        if within is not None:
            table["d"] = pa.array(within)
            keys.append(("d", "ascending"))
        table["r"] = row_ids
        keys.append(("r", "ascending"))
        perm = _index_array(pc.sort_indices(pa.table(table), sort_keys=keys))
    info.update(sources=ranked, reward_accuracy={s: acc[s] for s in ranked},
                within_source="difficulty ascending" if within is not None else "row_id")
    return perm, (rank_of_code[codes])[perm], info


# -------------------------------------------------------------------------------------------------- chunking


def chunk_sizes(n: int, config: PartitionConfig, key: np.ndarray | None, source_rank: np.ndarray | None = None) -> list[int]:
    """Sizes of consecutive chunks over ``n`` ordered rows (``key`` aligned with the order)."""
    mode = config.chunking
    if mode == "equal":
        if config.chunks > n:
            raise PartitionConfigError(f"cannot cut {n} rows into {config.chunks} chunks (more chunks than rows)")
        sizes = [len(a) for a in np.array_split(np.arange(n), config.chunks)]
    elif mode == "fractions":
        if len(config.fractions) > n:
            raise PartitionConfigError(f"cannot cut {n} rows into {len(config.fractions)} chunks (more chunks than rows)")
        bounds = np.rint(np.cumsum([0.0] + config.fractions) * n).astype(int)
        bounds[-1] = n
        sizes = np.diff(bounds).tolist()
    elif mode in ("thresholds", "quantiles"):
        if key is None:
            raise PartitionConfigError(f"chunking {mode!r} needs an order with a key")
        # key is non-decreasing along the order for ascending orders, non-increasing for descending ones
        ascending = bool(key[0] <= key[-1])
        cuts = np.quantile(key, config.quantiles) if mode == "quantiles" else np.asarray(config.thresholds)
        if ascending:
            bounds = np.searchsorted(key, cuts, side="left")
        else:
            cuts = cuts[::-1]
            bounds = np.searchsorted(-key, -cuts, side="left")
        bounds = np.concatenate([[0], bounds, [n]])
        sizes = np.diff(bounds).tolist()
        sizes = [s for s in sizes if s > 0]  # a cut outside the key's range gives no chunk
    else:  # source
        if source_rank is None:
            raise PartitionConfigError("chunking 'source' needs order 'by_source'")
        change = np.flatnonzero(np.diff(source_rank)) + 1
        sizes = np.diff(np.concatenate([[0], change, [n]])).tolist()
    sizes = [int(s) for s in sizes]
    if any(s == 0 for s in sizes):
        raise PartitionConfigError(f"chunking gives an empty chunk for {n} rows (sizes {sizes}); use fewer chunks")
    return merge_small(sizes, config.min_chunk_size)


def merge_small(sizes: list[int], minimum: int) -> list[int]:
    """Merge chunks smaller than ``minimum`` into the previous chunk (the next one for the first)."""
    sizes = list(sizes)
    i = 0
    while i < len(sizes) and len(sizes) > 1:
        if sizes[i] < minimum:
            j = i - 1 if i > 0 else 1
            sizes[j] += sizes[i]
            del sizes[i]
            i = max(j, 0) if j < i else i
        else:
            i += 1
    return sizes


# ---------------------------------------------------------------------------------------------------- writing


def _summary(values: np.ndarray | None) -> dict | None:
    if values is None or not len(values):
        return None
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}


BUCKET_BYTES = 48 << 20  # rows are distributed into buckets of about this size, then each bucket is sorted


def _write_shards(inp: _Input, perm: np.ndarray, bounds: np.ndarray, out: Path, config: PartitionConfig,
                  progress: bool = True) -> list[dict]:
    """Copy rows into the chunk shards in curriculum order with bounded memory (an external distribution sort).

    Pass 1 reads the input front to back and appends each row to the bucket file of its final position
    (bucket ``b`` holds final positions ``[b*R, (b+1)*R)``); pass 2 reads one bucket at a time, puts its rows
    in order with one ``take`` per output batch and streams them into the shards. Memory: one input slice + one
    bucket + 8 bytes per row (the order and its inverse), whatever the input size. Small inputs (one bucket)
    are taken from the input directly. Output record batches have exactly ``batch_rows`` rows (fewer at the
    end of a chunk), independent of the bucketing.
    """
    n = len(perm)
    row_bytes = max(1, inp.nbytes() // max(n, 1))
    bucket_rows = int(max(config.batch_rows, min(n, BUCKET_BYTES // row_bytes)))
    n_buckets = -(-n // bucket_rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n if n_buckets > 1 else n, unit="row", desc="partition", disable=None)
    tmp = out / f".buckets-{os.getpid()}"
    writer, pending = None, []
    try:
        if n_buckets > 1:
            tmp.mkdir()
            pos = np.empty(n, dtype=perm.dtype)  # final position of each input row
            pos[perm] = np.arange(n, dtype=perm.dtype)
            writers = [pa.ipc.new_stream(str(tmp / f"{b:05d}.arrow"), inp.schema) for b in range(n_buckets)]
            step = 1 << 15
            for bi, batch in enumerate(inp.batches):
                base = int(inp.offsets[bi])
                for lo in range(0, batch.num_rows, step):
                    sub = batch.slice(lo, step)
                    bk = pos[base + lo: base + lo + sub.num_rows] // bucket_rows
                    order = np.argsort(bk, kind="stable")
                    sbk = bk[order]
                    cuts = np.flatnonzero(np.diff(sbk)) + 1
                    taken = sub.take(pa.array(order))
                    for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [len(sbk)]]).tolist()):
                        writers[int(sbk[a])].write_batch(taken.slice(a, b - a))
                    del taken, sub
                    inp.release()
                    if bar is not None:
                        bar.update(len(bk))
            for w in writers:
                w.close()
            del pos
        entries: list[dict] = []
        ci = 0
        for b in range(n_buckets):
            first = b * bucket_rows  # final position of the bucket's first row
            wanted = perm[first:first + bucket_rows]  # input rows in final order
            if n_buckets == 1:
                src, local = pa.Table.from_batches(inp.batches, schema=inp.schema), wanted
            else:
                path = tmp / f"{b:05d}.arrow"
                with pa.OSFile(str(path), "rb") as f:
                    src = pa.ipc.open_stream(f).read_all().combine_chunks()
                path.unlink()
                # the bucket holds its rows in input order: the k-th smallest input position is row k
                local = np.searchsorted(np.sort(wanted), wanted)
            done = 0
            while done < len(wanted):
                if writer is None:
                    writer = ShardWriter(out, ci, inp.schema, parquet=config.parquet, fsync=config.fsync)
                buffered = sum(t.num_rows for t in pending)
                take_n = min(int(bounds[ci + 1]) - (first + done), len(wanted) - done, config.batch_rows - buffered)
                pending.append(src.take(pa.array(local[done:done + take_n])))
                done += take_n
                if bar is not None:
                    bar.update(take_n)
                end_of_chunk = first + done == int(bounds[ci + 1])
                if buffered + take_n == config.batch_rows or end_of_chunk:
                    table = pending[0] if len(pending) == 1 else pa.concat_tables(pending)
                    writer.write(table.combine_chunks().to_batches()[0])
                    pending.clear()
                if end_of_chunk:
                    entries.append(writer.commit())
                    writer, ci = None, ci + 1
            del src
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return entries


def partition_preferences(data, output_dir: str | os.PathLike, config: PartitionConfig | None = None, *,
                          rejects=None, progress: bool = True) -> Path:
    """Order ``data`` into a curriculum and write it as chunk shards + ``rejects.arrow`` + ``manifest.json``.

    Args:
        data: a scored folder (path), or a ``datasets.Dataset`` / ``pyarrow.Table`` with a ``row_id`` column
            (the loader's output or scored rows).
        output_dir: the partition folder (created; a previous partition there is replaced).
        config: :class:`PartitionConfig` (default: easy_to_hard, 3 equal chunks).
        rejects: reject records or a REJECTS_SCHEMA table to carry over (Dataset input only; a scored folder
            brings its own ``rejects.arrow``).

    Returns:
        The partition folder.

    Raises:
        PartitionError / PartitionConfigError: one-line messages for bad settings or input (unknown signal,
        more chunks than rows, fractions not summing to 1, empty input, unscored input for a score order).
    """
    config = config or PartitionConfig()
    inp = open_input(data, rejects=rejects)
    perm, key, ordering = compute_order(inp, config)
    n = inp.num_rows
    sizes = chunk_sizes(n, config, key, source_rank=key if config.order == "by_source" else None)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # every kept row in exactly one chunk
    seen = np.zeros(n, dtype=bool)
    seen[perm] = True
    if bounds[-1] != n or len(perm) != n or not seen.all():  # n positions, all distinct: a permutation
        raise PartitionError("internal error: the chunks do not cover every row exactly once")
    del seen

    if config.shuffle_within:
        for ci in range(len(sizes)):
            lo, hi = bounds[ci], bounds[ci + 1]
            perm[lo:hi] = perm[lo:hi][np.random.default_rng([config.seed, ci]).permutation(hi - lo)]
    chunk_entries = []
    harder = _numeric(inp, DIFFICULTY, "difficulty") if DIFFICULTY in inp.schema.names else None
    codes, source_names = _source_codes(inp)
    for ci in range(len(sizes)):
        idx = perm[bounds[ci]:bounds[ci + 1]]
        counts = np.bincount(codes[idx], minlength=len(source_names))
        chunk_entries.append({
            "index": ci,
            "difficulty": _summary(harder[idx]) if harder is not None else None,
            "key": _summary(key[bounds[ci]:bounds[ci + 1]]) if key is not None else None,
            "sources": {source_names[i]: int(c) for i, c in enumerate(counts) if c},
        })
    del harder, codes, key
    inp.release()

    out = prepare_output_dir(output_dir, overwrite=config.overwrite)
    files = _write_shards(inp, perm, bounds, out, config, progress=progress)
    for entry, f in zip(chunk_entries, files):
        entry.update(f)
        # keep the manifest's key order readable: index, file, rows, sha256, ...
    chunk_entries = [{"index": e["index"], "file": e["file"], "rows": e["rows"], "sha256": e["sha256"],
                      **{k: v for k, v in e.items() if k not in ("index", "file", "rows", "sha256")}}
                     for e in chunk_entries]

    rej_table = inp.rejects
    from .rejects import REJECTS_SCHEMA, reason_counts, write_rejects

    if rej_table is None:
        rej_table = REJECTS_SCHEMA.empty_table()
    write_rejects(rej_table, out / REJECTS)
    rows_rejected = rej_table.num_rows
    rows_in = inp.rows_in if inp.rows_in is not None else n + rows_rejected
    if rows_in != n + rows_rejected:
        raise PartitionError(f"row accounting broken: rows_in {rows_in} != kept {n} + rejected {rows_rejected}")
    if sum(c["rows"] for c in chunk_entries) != n:
        raise PartitionError("internal error: rows written differ from rows kept")

    scoring = None
    if inp.scoring is not None:
        scoring = {k: v for k, v in inp.scoring.items() if k != "parts"}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [inp.fingerprint],
        "scoring": scoring,
        "ordering": ordering,
        "chunking": {
            "mode": config.chunking, "chunks": len(sizes), "requested_chunks": config.chunks if config.chunking == "equal" else None,
            "fractions": config.fractions, "thresholds": config.thresholds, "quantiles": config.quantiles,
            "min_chunk_size": config.min_chunk_size, "shuffle_within": config.shuffle_within,
            "batch_rows": config.batch_rows,
        },
        "seed": config.seed,
        "rows_in": int(rows_in),
        "rows_kept": int(n),
        "rows_rejected": int(rows_rejected),
        "reject_reasons": reason_counts(rej_table),
        "rejects_sha256": sha256_file(out / REJECTS),
        "columns": schema_columns(inp.schema),
        "chunks": chunk_entries,
    }
    write_manifest(out, manifest)
    logger.info("partitioned %d rows into %d chunks %s in %s", n, len(sizes), [c["rows"] for c in chunk_entries], out)
    return out
