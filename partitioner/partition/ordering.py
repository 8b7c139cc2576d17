"""The curriculum order: a permutation of the input rows, and the order key along it.

Keys are sorted in memory (row ids as order-preserving uint64 where they are the loader's 16-hex content hashes);
rows are never touched here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdpo_core.columns import CHOSEN_LOGPS, DIFFICULTY, REJECTED_LOGPS, ROW_ID, SOURCE, Direction
from sdpo_core.stats import margin_stats_by

from .folder import PartitionConfigError  # "PartitionConfig" annotations: config.py imports this registry
from .inputs import PartitionInput


def numeric_column(inp: PartitionInput, name: str, what: str) -> np.ndarray:
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


def _signal(inp: PartitionInput, config: "PartitionConfig", name: str | None = None) -> tuple[str, np.ndarray, str, bool]:
    """(signal name, values, column, higher_is_harder) for the score orders (``name`` default: ``config.signal``)."""
    signals = {s["name"]: s for s in (inp.scoring or {}).get("signals", [])}
    name = name or config.signal or DIFFICULTY
    if name == DIFFICULTY:
        if DIFFICULTY not in inp.schema.names:
            raise PartitionConfigError(
                f"order {config.order!r} needs scores but the input has no '{DIFFICULTY}' column: score it first "
                "(sdpo score) or use --order random/column"
            )
        return DIFFICULTY, numeric_column(inp, DIFFICULTY, "difficulty"), DIFFICULTY, True
    if name not in signals:
        avail = sorted(signals) + [DIFFICULTY]
        raise PartitionConfigError(f"unknown signal {name!r}; available: {', '.join(avail)}")
    spec = signals[name]
    col = spec.get("column", name)
    values = numeric_column(inp, col, f"signal {name!r}")
    return name, values, col, spec.get("direction", Direction.HIGHER_IS_HARDER) != Direction.HIGHER_IS_EASIER


def reward_accuracy_by_source(inp: PartitionInput) -> dict[str, float]:
    """The reference model's reward accuracy per source (share of rows with chosen_logps > rejected_logps)."""
    for c in (CHOSEN_LOGPS, REJECTED_LOGPS):
        if c not in inp.schema.names:
            raise PartitionConfigError(
                f"order 'by_source' needs scored input ('{c}' missing): score it first (sdpo score)"
            )
    codes, names = source_codes(inp)
    stats = margin_stats_by(codes, numeric_column(inp, CHOSEN_LOGPS, "score"), numeric_column(inp, REJECTED_LOGPS, "score"),
                            names=names)
    return {name: s["reward_accuracy"] for name, s in stats.items()}


def source_codes(inp: PartitionInput) -> tuple[np.ndarray, list[str]]:
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


def _row_id_keys(inp: PartitionInput):
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


def _by_signal(inp: PartitionInput, config: "PartitionConfig", row_ids, info: dict, *, hardest_first: bool):
    name, values, col, higher_is_harder = _signal(inp, config)
    desc = hardest_first == higher_is_harder
    perm = _argsort(values, row_ids, descending=desc)
    direction = Direction.HIGHER_IS_HARDER if higher_is_harder else Direction.HIGHER_IS_EASIER
    info.update(signal=name, column=col, ascending=not desc, direction=direction.value)
    return perm, values[perm], info


def _by_column(inp: PartitionInput, config: "PartitionConfig", row_ids, info: dict):
    values = numeric_column(inp, config.column, "order")
    perm = _argsort(values, row_ids, descending=not config.ascending)
    info.update(column=config.column, ascending=config.ascending)
    return perm, values[perm], info


def _random(inp: PartitionInput, config: "PartitionConfig", row_ids, info: dict):
    base = _argsort(None, row_ids)
    perm = base[np.random.default_rng(config.seed).permutation(len(base))]
    return perm, None, info


def _by_source(inp: PartitionInput, config: "PartitionConfig", row_ids, info: dict):
    acc = reward_accuracy_by_source(inp)
    codes, names = source_codes(inp)
    ranked = sorted(acc, key=lambda s: (-acc[s], s))
    rank_of_code = np.array([ranked.index(n) if n in acc else len(ranked) for n in names], dtype=np.float64)
    within = numeric_column(inp, DIFFICULTY, "difficulty") if DIFFICULTY in inp.schema.names else None
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


def _levels(harder: np.ndarray, row_ids, levels: int) -> np.ndarray:
    """Equal-count levels 0..levels-1 of ``harder`` (0 = easiest; ties by row id, so levels are deterministic)."""
    rank = np.empty(len(harder), dtype=np.int64)
    rank[_argsort(harder, row_ids)] = np.arange(len(harder))
    return (rank * levels) // max(len(harder), 1)


def _grid_order(inp: PartitionInput, config: "PartitionConfig", row_ids, info: dict):
    """2D-Curri-DPO's grid: PC level x PD level, cells visited by ``grid_strategy``; within a cell by PD difficulty.

    The order key is the visited group (cell, or diagonal for ``sum_pd``), so chunking ``grid`` cuts at its changes.
    """
    pd_name, pd_values, pd_col, pd_harder = _signal(inp, config)
    pc_name, pc_values, pc_col, pc_harder = _signal(inp, config, config.complexity_signal)
    pd_diff = pd_values if pd_harder else -pd_values
    pc_diff = pc_values if pc_harder else -pc_values
    n_levels = config.grid_levels
    pd_level, pc_level = _levels(pd_diff, row_ids, n_levels), _levels(pc_diff, row_ids, n_levels)
    if config.grid_strategy == "sum_pd":
        group, within = pc_level + pd_level, pd_level
    elif config.grid_strategy == "pc_first":
        group, within = pc_level * n_levels + pd_level, pd_level
    else:  # pd_first
        group, within = pd_level * n_levels + pc_level, pc_level
    fine = (group * n_levels + within).astype(np.float64)
    # sort by (group, within, PD difficulty, row id): a lexsort of the fine cell and the PD difficulty
    step = _argsort(pd_diff, row_ids)  # PD difficulty, ties by row id
    perm = step[np.argsort(fine[step], kind="stable")].astype(step.dtype)
    info.update(signal=pd_name, column=pd_col, complexity_signal=pc_name, complexity_column=pc_col,
                grid_levels=n_levels, grid_strategy=config.grid_strategy,
                cells={f"pc{a}_pd{b}": int(((pc_level == a) & (pd_level == b)).sum())
                       for a in range(n_levels) for b in range(n_levels)})
    return perm, group[perm].astype(np.float64), info


@dataclass(frozen=True)
class Order:
    """A curriculum order (``PartitionConfig.order``)."""

    name: str
    help: str  # README.md's order table shows it
    needs_scores: bool  # reads the scored columns: a data file is scored first (partitioner.run)
    key_is_group: bool  # the order key is a group per row (source rank, grid cell): chunkings 'source'/'grid' cut it
    compute: Callable  # (input, config, row ids, manifest info) -> (permutation, key along it or None, info)


ORDERS = {o.name: o for o in (
    Order("easy_to_hard", "by the difficulty signal (`--signal`, default the `difficulty` column), easiest first",
          True, False, partial(_by_signal, hardest_first=False)),
    Order("hard_to_easy", "the reverse: hardest first", True, False, partial(_by_signal, hardest_first=True)),
    Order("random", "a seeded permutation (`--seed`; the paper's ablation)", False, False, _random),
    Order("by_source", "each source together, sources sorted by M0's reward accuracy on them, highest first (the "
          "paper's order)", True, True, _by_source),
    Order("column", "any numeric column (`--column`, `--ascending`)", False, False, _by_column),
    Order("grid_2d", "2D-Curri-DPO's grid of prompt-complexity × distinguishability levels (see its section)",
          True, True, _grid_order),
)}
ORDER_NAMES = tuple(ORDERS)


def compute_order(inp: PartitionInput, config: "PartitionConfig") -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Row positions in curriculum order, the order key aligned with them (or None), and the manifest's 'ordering'."""
    order = ORDERS.get(config.order)
    if order is None:
        raise PartitionConfigError(f"unknown order {config.order!r}; choose one of {', '.join(ORDERS)}")
    return order.compute(inp, config, _row_id_keys(inp), {"order": config.order, "seed": config.seed})
