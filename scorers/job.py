"""The resumable scoring job: loaded pairs in, a scored folder out (layout: CONTRACTS.md section 2).

``score_preferences(dataset_or_inputs, output_dir, ScoringConfig(...))`` tokenizes the pairs exactly as
DPOTrainer does, scores them with the reference model (``TransformersBackend``), computes the difficulty signals and
writes, in input order, fixed-size parts ``parts/part-00000.arrow``... (Arrow IPC stream). Then ``rejects.arrow``,
``scoring.json`` and, last, ``_SUCCESS``.

Resume: each part is written to a temp file and renamed into place when complete, then a marker
``parts/part-NNNNN.done`` (its sha256 and row count) is written. A rerun with the same settings skips parts whose
marker matches; everything else is recomputed. A part's bytes depend only on its rows and the settings (batches are
formed within a part, deterministically; no timestamps), so a job killed at any moment (SIGKILL included) and rerun
ends byte-identical to an uninterrupted run. ``settings.json`` records what the results depend on; a rerun with
different settings refuses to mix results unless ``overwrite=True``, which starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from partitioner.rejects import read_arrow_stream, reason_counts, write_arrow_stream, write_rejects
from partitioner.schema import CHOSEN_LOGPS, DIFFICULTY, REJECTED_LOGPS, ROW_ID, SOURCE

from .signals import POLICY_CHOSEN_LOGPS, POLICY_REJECTED_LOGPS, REWARD_CHOSEN, REWARD_REJECTED, compute_signal
from .signals import parse_signals, to_difficulty
from .transformers_backend import LINEAR_KERNELS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
PARTS_DIR = "parts"
SETTINGS_FILE = "settings.json"
SCORING_FILE = "scoring.json"
SUCCESS_FILE = "_SUCCESS"
REJECTS_FILE = "rejects.arrow"


class ScoringError(ValueError):
    """The scoring job cannot go on as asked (one-line message)."""


@dataclass
class ScoringConfig:
    """How pairs are scored. The fields marked as settings are recorded; a rerun must match them."""

    model: str = field(default="bundled", metadata={"help": "Reference model: local path, hub id or 'bundled'."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path; default: the model's."})
    dtype: str = field(default="float32", metadata={"help": "float32 (TRL-exact), bfloat16 or float16."})
    max_length: int | None = field(default=1024, metadata={"help": "DPOConfig.max_length."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "DPOConfig.truncation_mode."})
    signals: list[str] = field(
        default_factory=lambda: ["ref_margin", "ref_margin_per_token"],
        metadata={"help": "Difficulty signals (scorers.signals.SIGNALS); the first is the difficulty by default."},
    )
    difficulty_signal: str | None = field(default=None, metadata={"help": "Signal used as `difficulty`."})
    batch_tokens: int = field(default=4096, metadata={"help": "Token budget per forward pass."})
    rows_per_part: int = field(default=256, metadata={"help": "Rows per output part (the resume unit)."})
    packed: bool = field(default=True, metadata={"help": "Compute each prompt once (block-causal packed rows)."})
    beta: float = field(default=0.1, metadata={"help": "beta of the implicit_reward signal."})
    policy_model: str | None = field(default=None, metadata={"help": "pi of implicit_reward (vs. the reference)."})
    reward_model: str | None = field(default=None, metadata={"help": "Sequence-classification reward model."})
    rating_columns: list[str] = field(
        default_factory=lambda: ["score_chosen", "score_rejected"], metadata={"help": "Columns of rating_gap."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random signal."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first N loaded rows."})
    load_options: dict = field(default_factory=dict, metadata={
        "help": "Keyword arguments of partitioner.loading.load_preferences for file inputs (format, column_mapping, "
                "source_column, split, drop_duplicates)."})
    overwrite: bool = field(default=False, metadata={"help": "Start over when the folder holds other results."})
    device: str | None = field(default=None, metadata={"help": "torch device; default cpu."})
    linear_kernel: str = field(default="auto", metadata={
        "help": "transformers backend: fp32 GEMM of the linear layers on CPU: auto (oneDNN where this torch has it), "
                "onednn or torch (torch's default, MKL)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    backend: str = field(default="transformers", metadata={
        "help": "Reference log-prob backend: transformers, vllm (offline engine) or vllm-server (a running server)."})
    server_url: str | None = field(default=None, metadata={"help": "vllm-server: the server's base URL."})
    server_model: str | None = field(default=None, metadata={"help": "vllm-server: served name, if not `model`."})
    vllm_options: dict = field(default_factory=dict, metadata={
        "help": "vllm/vllm-server: keyword options of VLLMBackend / VLLMServerBackend (scorers.vllm_backend)."})

    def __post_init__(self):
        from .models import DTYPES

        if isinstance(self.signals, str):
            self.signals = [s.strip() for s in self.signals.split(",") if s.strip()]
        sigs = parse_signals(self.signals)  # raises on unknown names
        self.signals = [s.name for s in sigs]
        if self.difficulty_signal is None:
            self.difficulty_signal = self.signals[0]
        if self.difficulty_signal not in self.signals:
            raise ValueError(f"difficulty_signal {self.difficulty_signal!r} is not among signals {self.signals}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        if self.rows_per_part < 1 or self.batch_tokens < 1:
            raise ValueError("rows_per_part and batch_tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if "implicit_reward" in self.signals and not self.policy_model:
            raise ValueError("signal implicit_reward needs policy_model (the model compared with the reference)")
        if "reward_model" in self.signals and not self.reward_model:
            raise ValueError("signal reward_model needs reward_model (a sequence-classification model path)")
        if len(self.rating_columns) != 2:
            raise ValueError("rating_columns must name two columns: chosen's and rejected's")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {self.linear_kernel!r}")
        if self.backend not in ("transformers", "vllm", "vllm-server"):
            raise ValueError(f"backend must be 'transformers', 'vllm' or 'vllm-server', got {self.backend!r}")
        if self.backend == "vllm-server" and not self.server_url:
            raise ValueError("backend vllm-server needs server_url (--server-url http://HOST:PORT)")


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdpo-curriculum")
    except PackageNotFoundError:
        return "0+unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _dataset_fingerprint(dataset) -> str:
    """Content hash of the rows to score (row ids are content hashes; other columns hashed when absent)."""
    h = hashlib.sha256()
    if ROW_ID in dataset.column_names:
        for rid in dataset[ROW_ID]:
            h.update(str(rid).encode() + b"\n")
    else:
        for batch in dataset.with_format("arrow").iter(batch_size=1000):
            h.update(json.dumps(batch.to_pylist(), sort_keys=True, default=str).encode())
    h.update(f"rows={len(dataset)}".encode())
    return h.hexdigest()[:16]


def _load_inputs(inputs, load_options: dict | None = None):
    """Dataset + loader rejects from paths (``partitioner.loading``) or a ``save_to_disk`` folder."""
    import datasets

    if isinstance(inputs, datasets.Dataset):
        return inputs, []
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if len(items) == 1 and Path(items[0]).is_dir() and (Path(items[0]) / "dataset_info.json").exists():
        return datasets.load_from_disk(str(items[0])), []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and not any(c in str(item) for c in "*?[") and "=" not in str(item):
            if not Path(item).exists() and not str(item).count("/") == 1:
                raise FileNotFoundError(f"input does not exist: {item}")
    from partitioner.loading import load_preferences_with_rejects

    dataset, report = load_preferences_with_rejects(items, **(load_options or {}))
    return dataset, list(report.rejects)


def score_preferences(dataset_or_inputs, output_dir, config: ScoringConfig | None = None, *,
                      executor: str = "local", ray_config=None) -> Path:
    """Score preference pairs into ``output_dir`` (resumable); see the module docstring.

    Args:
        dataset_or_inputs: a ``datasets.Dataset`` in the loader's canonical form (``row_id``, ``source``, ``prompt``,
            ``chosen``, ``rejected`` + pass-through columns), or inputs for ``partitioner.loading.load_preferences``
            (paths), or a ``save_to_disk`` folder of such a dataset.
        output_dir: the scored folder.
        config: see ``ScoringConfig``.
        executor: ``"local"`` (this process) or ``"ray"`` (a Ray Data actor pool, ``scorers.ray_executor``;
            same output); ``ray_config`` is its ``RayConfig``.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ScoringError: no rows to score, or the folder holds results made with other settings (without overwrite).
        ModelLoadError: the model or tokenizer path does not exist or cannot be loaded.
        TokenizationError: conversational data and a tokenizer without a chat template.
        FileNotFoundError: an input path does not exist.

    Assumptions:
        rows in = rows scored + rows rejected (loader + tokenizer rejects); checked before ``_SUCCESS`` is written.
        With ``limit``, loader rejects are all carried and only the first ``limit`` loaded rows are scored.
    """
    from partitioner.tokenization import TokenizeConfig, tokenize_preferences

    from .models import load_tokenizer, model_fingerprint

    config = config or ScoringConfig()
    if executor not in ("local", "ray"):
        raise ScoringError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray":
        from .ray_executor import import_ray

        import_ray()  # fail early with the install hint
    out = Path(output_dir)
    dataset, loader_rejects = _load_inputs(dataset_or_inputs, config.load_options)
    if config.limit is not None and config.limit < len(dataset):
        dataset = dataset.select(range(config.limit))
    if len(dataset) == 0:
        raise ScoringError("no rows to score: the dataset is empty")
    for col in ("prompt", "chosen", "rejected"):
        if col not in dataset.column_names:
            raise ScoringError(f"the dataset has no {col!r} column; load it with partitioner.loading first")

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    signals = parse_signals(config.signals)
    template = getattr(tokenizer, "chat_template", None)
    settings = {
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version(),
        "model": model_fingerprint(config.model),
        "dtype": config.dtype,
        "tokenizer": {
            "name_or_path": config.tokenizer or config.model,
            "max_length": config.max_length,
            "truncation_mode": config.truncation_mode,
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        },
        "signals": [s.meta() for s in signals],
        "difficulty": {"signal": config.difficulty_signal, "column": DIFFICULTY, "direction": "higher_is_harder"},
        "scoring": {
            "backend": config.backend,
            "packed": config.packed,
            "batch_tokens": config.batch_tokens,
            "linear_kernel": config.linear_kernel,
            "rows_per_part": config.rows_per_part,
            "beta": config.beta,
            "seed": config.seed,
            "policy_model": model_fingerprint(config.policy_model) if config.policy_model else None,
            "reward_model": model_fingerprint(config.reward_model) if config.reward_model else None,
            "rating_columns": list(config.rating_columns),
        },
        "input": {"fingerprint": _dataset_fingerprint(dataset), "rows": len(dataset),
                  "loader_rejects": len(loader_rejects)},
    }
    _prepare_folder(out, settings, config.overwrite)

    kept, tok_rejects = tokenize_preferences(
        dataset, tokenizer, TokenizeConfig(max_length=config.max_length, truncation_mode=config.truncation_mode)
    )
    rejects = loader_rejects + tok_rejects
    rows_in = len(dataset) + len(loader_rejects)
    parts_dir = out / PARTS_DIR
    n_parts = (len(kept) + config.rows_per_part - 1) // config.rows_per_part
    todo = [k for k in range(n_parts) if not _part_done(parts_dir, k)]
    logger.info("%d rows to score in %d parts (%d done before), %d rejected", len(kept), n_parts,
                n_parts - len(todo), len(rejects))
    if todo:
        if executor == "ray":
            from .ray_executor import score_parts_ray

            scored = score_parts_ray(kept, todo, config, ray_config)
        else:
            scored = _score_parts_local(kept, todo, config, signals)
        for k, table in scored:  # parts as they complete (in order locally, any order on Ray)
            path = write_arrow_stream(table, parts_dir / f"part-{k:05d}.arrow")
            marker = {"rows": table.num_rows, "sha256": _sha256(path)}
            _atomic_write_text(parts_dir / f"part-{k:05d}.done", json.dumps(marker))
    return _finish(out, settings, parts_dir, n_parts, rejects, rows_in, len(kept))


def _score_parts_local(kept, todo: list[int], config: ScoringConfig, signals):
    """Yield ``(k, scored part k)`` for each part in ``todo``, scored in this process."""
    scorer = _PartScorer(config, signals)
    try:
        for k in todo:
            lo, hi = k * config.rows_per_part, min((k + 1) * config.rows_per_part, len(kept))
            yield k, scorer.score_part(kept.select(range(lo, hi)))
    finally:
        scorer.close()


def _prepare_folder(out: Path, settings: dict, overwrite: bool) -> None:
    path = out / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise ScoringError(
                    f"{out} holds results scored with other settings ({', '.join(changed)} differ); "
                    "use a new output folder or overwrite=True (--overwrite) to start over"
                )
            logger.warning("%s: settings changed, starting over", out)
            _clear(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ScoringError(f"{out} is not empty and holds no scoring settings; use an empty folder or --overwrite")
        _clear(out)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (out / PARTS_DIR).glob(".*.tmp-*"):  # a killed writer's temp file
        stale.unlink(missing_ok=True)
    for stale in out.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    if not path.exists():
        (out / SUCCESS_FILE).unlink(missing_ok=True)
        _atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _clear(out: Path) -> None:
    for name in (PARTS_DIR,):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (SETTINGS_FILE, SCORING_FILE, SUCCESS_FILE, REJECTS_FILE):
        (out / name).unlink(missing_ok=True)
    if any(out.iterdir()):
        raise ScoringError(f"{out} holds other files; give an output folder of its own")


def _part_done(parts_dir: Path, k: int) -> bool:
    marker, part = parts_dir / f"part-{k:05d}.done", parts_dir / f"part-{k:05d}.arrow"
    if not (marker.exists() and part.exists()):
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return info.get("sha256") == _sha256(part)


class _PartScorer:
    """Scores one part: reference log-probs, optional policy / reward-model scores, signals, difficulty."""

    def __init__(self, config: ScoringConfig, signals):
        from .transformers_backend import TransformersBackend

        self.config, self.signals = config, signals
        kw = dict(dtype=config.dtype, max_length=config.max_length, truncation_mode=config.truncation_mode,
                  batch_tokens=config.batch_tokens, packed=config.packed, device=config.device,
                  progress=config.progress, linear_kernel=config.linear_kernel)
        if config.backend == "transformers":
            self.backend = TransformersBackend(config.model, **kw)
        else:
            from .vllm_backend import make_vllm_backend

            self.backend = make_vllm_backend(config)
        self.policy = TransformersBackend(config.policy_model, **kw) if config.policy_model else None
        self.reward = None
        if config.reward_model:
            from .reward_model import RewardModelScorer

            self.reward = RewardModelScorer(config.reward_model, dtype=config.dtype, device=config.device,
                                            batch_tokens=config.batch_tokens, progress=config.progress)

    def close(self):
        for b in (self.backend, self.policy, self.reward):
            if b is not None:
                b.close()

    def score_part(self, part):
        import pyarrow as pa

        table = part.with_format("arrow")[:]
        rows = part.to_list()
        scores = self.backend.score(rows)
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        new: dict[str, tuple[list, pa.DataType]] = {
            "chosen_logps": (scores["chosen_logps"], pa.float64()),
            "rejected_logps": (scores["rejected_logps"], pa.float64()),
            "chosen_tokens": (scores["chosen_tokens"], pa.int64()),
            "rejected_tokens": (scores["rejected_tokens"], pa.int64()),
        }
        if self.policy is not None:
            p = self.policy.score(rows)
            new[POLICY_CHOSEN_LOGPS] = (p["chosen_logps"], pa.float64())
            new[POLICY_REJECTED_LOGPS] = (p["rejected_logps"], pa.float64())
        if self.reward is not None:
            rc, rr = self.reward.score(rows)
            new[REWARD_CHOSEN] = (rc, pa.float64())
            new[REWARD_REJECTED] = (rr, pa.float64())
        cols.update({k: v for k, (v, _) in new.items()})
        c = self.config
        difficulty = None
        for s in self.signals:
            values = compute_signal(s, cols, beta=c.beta, seed=c.seed, rating_columns=tuple(c.rating_columns))
            new[s.column] = (values, pa.float64())
            if s.name == c.difficulty_signal:
                difficulty = to_difficulty(s, values)
        new[DIFFICULTY] = (difficulty, pa.float64())
        for name, (values, typ) in new.items():
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(pa.field(name, typ), pa.array(values, type=typ))
        return table.combine_chunks()


def _finish(out: Path, settings: dict, parts_dir: Path, n_parts: int, rejects: list, rows_in: int,
            n_kept: int) -> Path:
    from .stats import per_source_stats

    parts, tables = [], []
    for k in range(n_parts):
        path = parts_dir / f"part-{k:05d}.arrow"
        t = read_arrow_stream(path)
        parts.append({"file": f"{PARTS_DIR}/{path.name}", "rows": t.num_rows, "sha256": _sha256(path)})
        tables.append(t.select([SOURCE, CHOSEN_LOGPS, REJECTED_LOGPS]))
    rows_scored = sum(p["rows"] for p in parts)
    if rows_scored != n_kept or rows_in != rows_scored + len(rejects):
        raise AssertionError(f"row accounting broken: {rows_in} in != {rows_scored} scored + {len(rejects)} rejected")
    write_rejects(rejects, out / REJECTS_FILE)
    import pyarrow as pa

    stats = per_source_stats(pa.concat_tables(tables))
    meta = {k: settings[k] for k in ("schema_version", "library_version", "model", "dtype", "tokenizer", "signals",
                                     "difficulty")}
    meta.update(
        scoring=settings["scoring"],
        rows_in=rows_in,
        rows_scored=rows_scored,
        rows_rejected=len(rejects),
        reject_reasons=reason_counts(rejects),
        per_source=stats_dict(stats),
        parts=parts,
    )
    _atomic_write_text(out / SCORING_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    _atomic_write_text(out / SUCCESS_FILE, "")
    logger.info("scored %d rows into %s (%d rejected)", rows_scored, out, len(rejects))
    return out


def stats_dict(stats) -> dict:
    return {
        r["source"]: {k: r[k] for k in ("count", "reward_accuracy", "mean_margin", "median_margin")}
        for r in stats.iter_rows(named=True)
    }


def read_scored(output_dir) -> tuple:
    """``(dataset, metadata)`` of a complete scored folder: the parts concatenated (memory-mapped), scoring.json.

    Raises:
        ScoringError: the folder is not a complete scored folder (no ``_SUCCESS``) or a part's checksum differs.
    """
    import datasets

    out = Path(output_dir)
    if not (out / SUCCESS_FILE).exists() or not (out / SCORING_FILE).exists():
        raise ScoringError(f"{out} is not a complete scored folder (no {SUCCESS_FILE}); run or resume `sdpo score`")
    meta = json.loads((out / SCORING_FILE).read_text(encoding="utf-8"))
    parts = []
    for p in meta["parts"]:
        path = out / p["file"]
        if not path.exists() or _sha256(path) != p["sha256"]:
            raise ScoringError(f"{path} is missing or differs from its checksum in {SCORING_FILE}")
        parts.append(datasets.Dataset.from_file(str(path)))
    return datasets.concatenate_datasets(parts), meta


def config_dict(config: ScoringConfig) -> dict:
    return asdict(config)
