"""Scoring on a Ray cluster with Ray Data: the local job's parts, scored by a pool of actors.

``score_preferences(..., executor="ray", ray=RayConfig(...))`` (CLI: ``sdpo score --executor ray``) runs the same
job as the local executor — same tokenization, same settings, same part loop, same writer — but the parts still to
do are scored remotely: the tokenized rows become a Ray Dataset (``ray.data.from_arrow``, one block per part, or per
``batch_rows`` slice of a part), ``map_batches`` runs them through an actor pool whose actors each hold one scorer
(the local job's ``PartScorer``: the reference backend, plus the policy / reward models when the signals need them),
and the driver puts each part's rows back in input order (by a row-index column), then writes the part exactly as the
local job does (temp file + rename, then its ``.done`` marker). ``scoring.json`` and ``_SUCCESS`` are written by the
same code. A folder scored on Ray is indistinguishable from one scored locally, and either executor resumes the
other's folder.

Exactness: with the default ``batch_rows=None`` an actor scores a whole part in one ``score`` call, as the local job
does, so the length-sorted forward batches are the same and the log-probs are the same floats whenever the actor's
numerics match the driver's (same model, dtype, device kind and torch kernels); with ``batch_rows`` smaller than a
part, a part is spread over several actors and the forward batches differ (values agree to float rounding).

Failure semantics: actors restart after a crash and their unfinished batches are retried (Ray Data's actor pools
default to ``max_restarts=-1`` and ``max_task_retries=-1``; both can be capped). The driver keys every returned row by
its input index, drops a row that comes back twice, and refuses to write a part with a row missing, so the output
has no lost or doubled rows. A driver crash loses only parts not yet written: a rerun skips parts whose ``.done``
marker matches and scores the rest.

Why not ``ray.data.llm``: its vLLM processor (Ray 2.60) does return ``prompt_logprobs`` and takes token ids
(``tokenized_prompt``), but it would be a second implementation of the collator's truncation and of reading the
actual token's log-prob; with ``ScoringConfig(backend="vllm")`` each actor here holds the same ``VLLMBackend`` as the
local job, so the two executors share every line that decides a number.

Assumptions:
    ``sdpo-curriculum`` (with the backend's dependencies) is importable on every node (installed there, or shipped by
    the caller's own ``ray.init(runtime_env=...)``; an already-initialized Ray is used as is). The tokenized rows of
    the parts to do are put in Ray's object store from the driver (which spills to disk when full).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from sdpo_core.config import check_ranges
from sdpo_core.errors import ConfigError, MissingDependencyError

from .folder import ScoringError
from .part_scorer import PartScorer

logger = logging.getLogger(__name__)

INSTALL_HINT = "executor='ray' needs Ray Data: pip install 'sdpo-curriculum[ray]'"
PART_COLUMN = "__sdpo_part"  # helper columns carried through the actors, never written
INDEX_COLUMN = "__sdpo_row"


class RayUnavailableError(MissingDependencyError):
    """Ray Data is not installed (one-line message with the install command)."""


def import_ray():
    """Import ``ray`` and ``ray.data`` or raise :class:`RayUnavailableError` with the install hint."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailableError(INSTALL_HINT) from e
    return ray


@dataclass
class RayConfig:
    """Where and how the Ray executor runs. Not part of the job's settings: results do not depend on it."""

    address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster address (e.g. 'ray://head:10001' or 'head:6379'); default: the Ray already "
                          "initialized in this process, else ray.init() (RAY_ADDRESS, a local cluster, or a new one)."},
    )
    concurrency: int = field(default=1, metadata={"min": 1, "help": "Actors in the pool (each holds one copy of the model)."})
    num_cpus: float = field(default=1.0, metadata={"min": 0, "help": "CPUs reserved per actor (torch threads follow it)."})
    num_gpus: float = field(default=0.0, metadata={"min": 0, "help": "GPUs per actor; > 0 scores on cuda."})
    batch_rows: int | None = field(
        default=None,
        metadata={"min": 1, "help": "Rows per actor call; default one whole part (same forward batches as the local job)."},
    )
    max_restarts: int | None = field(
        default=None, metadata={"help": "Actor restarts after a crash; default Ray Data's (-1: unlimited)."}
    )
    max_task_retries: int | None = field(
        default=None, metadata={"help": "Retries of a crashed actor's batch; default Ray Data's (-1: unlimited)."}
    )
    init_kwargs: dict = field(
        default_factory=dict, metadata={"help": "Extra ray.init arguments when this job starts/connects Ray."}
    )

    def __post_init__(self):
        check_ranges(self)
        for name in ("max_restarts", "max_task_retries"):
            v = getattr(self, name)
            if v is not None and v < -1:
                raise ConfigError(f"ray {name} must be -1 (unlimited) or >= 0, got {v}")


class _ScoringActor:
    """One Ray Data actor: builds the local job's part scorer once, then scores batches of rows with it."""

    def __init__(self, config):
        changes = {"progress": False}
        if config.device is None and _assigned_gpus():
            changes["device"] = "cuda"
        self.scorer = PartScorer(replace(config, **changes))

    def __call__(self, batch):
        import datasets
        import pyarrow as pa

        helpers = batch.select([PART_COLUMN, INDEX_COLUMN])
        rows = datasets.Dataset(batch.drop_columns([PART_COLUMN, INDEX_COLUMN]))
        table = self.scorer.score_part(rows)
        for name in (PART_COLUMN, INDEX_COLUMN):
            table = table.append_column(pa.field(name, pa.int64()), helpers.column(name))
        return table


def _assigned_gpus() -> bool:
    try:
        import ray

        return bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not inside a Ray worker
        return False


def _blocks(kept, todo: list[int], rows_per_part: int, batch_rows: int):
    """Arrow tables to score: each part of ``todo`` cut into slices of ``batch_rows``, with part and row index."""
    import pyarrow as pa

    table = kept.with_format("arrow")[:] if len(kept) else None
    n = len(kept)
    for k in todo:
        lo, hi = k * rows_per_part, min((k + 1) * rows_per_part, n)
        for s in range(lo, hi, batch_rows):
            e = min(s + batch_rows, hi)
            block = table.slice(s, e - s)
            block = block.append_column(pa.field(PART_COLUMN, pa.int64()), pa.array([k] * (e - s), pa.int64()))
            block = block.append_column(pa.field(INDEX_COLUMN, pa.int64()), pa.array(range(s, e), pa.int64()))
            yield block


class PartAssembler:
    """Collects scored rows by part; hands back each part, rows in input order, once all its rows are in.

    A row that comes back twice (a retried batch whose first result also arrived) is kept once.
    """

    def __init__(self, kept_len: int, todo: list[int], rows_per_part: int):
        self.expected = {k: min((k + 1) * rows_per_part, kept_len) - k * rows_per_part for k in todo}
        self.pending: dict[int, list] = {k: [] for k in todo}  # part -> scored sub-tables
        self.seen: dict[int, set[int]] = {k: set() for k in todo}  # part -> row indices received
        self.duplicates = 0

    def add(self, table):
        """Add a scored block; yields ``(k, table)`` for each part it completes."""
        import pyarrow as pa
        import pyarrow.compute as pc

        for k in sorted(set(table.column(PART_COLUMN).to_pylist())):
            sub = table.filter(pc.equal(table.column(PART_COLUMN), k))
            if k not in self.pending:  # part already complete (or not asked for)
                self.duplicates += sub.num_rows
                continue
            seen, mask = self.seen[k], []
            for i in sub.column(INDEX_COLUMN).to_pylist():
                mask.append(i not in seen)
                seen.add(i)
            if not all(mask):
                self.duplicates += mask.count(False)
                sub = sub.filter(pa.array(mask))
            self.pending[k].append(sub)
            if len(seen) == self.expected[k]:
                del self.seen[k]
                yield k, self._assemble(self.pending.pop(k))

    @staticmethod
    def _assemble(tables: list):
        import pyarrow as pa
        import pyarrow.compute as pc

        t = pa.concat_tables(tables)
        t = t.take(pc.sort_indices(t, sort_keys=[(INDEX_COLUMN, "ascending")]))
        return t.drop_columns([PART_COLUMN, INDEX_COLUMN]).combine_chunks()

    def missing(self) -> dict[int, int]:
        return {k: self.expected[k] - len(self.seen[k]) for k in self.pending}


def score_parts_ray(kept, todo: list[int], config, ray_config: RayConfig | None = None):
    """Score parts ``todo`` of the tokenized rows ``kept`` on Ray; yields ``(part index, table)`` as parts complete.

    Each table equals what the local job's ``PartScorer.score_part`` returns for that part (rows in input order).

    Raises:
        RayUnavailableError: Ray Data is not installed.
        ScoringError: rows of a part never came back (e.g. retries exhausted).
    """
    ray = import_ray()
    import ray.data

    rc = ray_config or RayConfig()
    started = False
    if not ray.is_initialized():
        kwargs = dict(rc.init_kwargs)
        if rc.address is None:  # may start a Ray here: no dashboard (Ray client addresses take no such option)
            kwargs.setdefault("include_dashboard", False)
        ray.init(address=rc.address, **kwargs)
        started = True  # ours to shut down (a cluster is only disconnected from)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(config.progress)
        batch_rows = rc.batch_rows or config.rows_per_part
        ds = ray.data.from_arrow(list(_blocks(kept, todo, config.rows_per_part, batch_rows)))
        remote_args = {k: v for k, v in (("max_restarts", rc.max_restarts), ("max_task_retries", rc.max_task_retries))
                       if v is not None}
        with _quiet_deprecations():
            ds = ds.map_batches(
                _ScoringActor,
                fn_constructor_kwargs={"config": config},
                batch_size=batch_rows,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=rc.concurrency),
                num_cpus=rc.num_cpus,
                num_gpus=rc.num_gpus or None,
                **remote_args,
            )
        assembler = PartAssembler(len(kept), todo, config.rows_per_part)
        logger.info("scoring %d parts on Ray with %d actor(s) (%s CPU, %s GPU each)", len(todo), rc.concurrency,
                    rc.num_cpus, rc.num_gpus)
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield from assembler.add(block)
        except Exception as e:
            if not type(e).__module__.startswith("ray."):
                raise
            raise ScoringError(f"scoring on Ray failed ({_root_cause(e)}); the parts written so far are kept: "
                               "rerun to resume") from e
        if assembler.duplicates:
            logger.warning("Ray returned %d row(s) twice (retried batches); each was kept once", assembler.duplicates)
        missing = {k: n for k, n in assembler.missing().items() if n}
        if missing:
            raise ScoringError(f"Ray returned no scores for {sum(missing.values())} row(s) of parts "
                               f"{sorted(missing)}; rerun to resume")
    finally:
        if started:
            ray.shutdown()


def _root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost exception under Ray's wrappers (``__cause__`` / ``.cause``)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class _quiet_deprecations:
    """Ray >= 2.5x warns that ``max_restarts``/``max_task_retries`` via ray_remote_args are deprecated."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
