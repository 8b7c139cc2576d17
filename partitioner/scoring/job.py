"""The resumable scoring job: preference data in, a scored folder out (layout: CONTRACTS.md section 2).

``score_preferences(inputs, output_dir, ScoringConfig(...))`` loads and validates the pairs (the loader, whatever
the input is), tokenizes them exactly as DPOTrainer does, scores them with the reference model and writes, in
input order, fixed-size parts, then ``rejects.arrow``, ``scoring.json`` and, last, ``_SUCCESS``
(:mod:`partitioner.scoring.folder`).

Resume: a part is written atomically, then its ``.done`` marker. A rerun with the same settings skips parts whose
marker matches and computes the rest. A part's bytes depend only on its rows and the settings (batches are formed
within a part, deterministically; no timestamps), so a job killed at any moment (SIGKILL included) and rerun ends
byte-identical to an uninterrupted run. ``settings.json`` records what the numbers depend on
(:func:`partitioner.scoring.config.job_settings`); a rerun with other settings refuses to mix results unless
``overwrite=True``, which starts over.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from sdpo_core.columns import CANONICAL, ROW_ID

from .config import ScoringConfig, job_settings, pin_linear_kernel
from .folder import ScoringError, finish, part_done, prepare_folder, write_part
from .part_scorer import PartScorer

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


def _fingerprint(dataset) -> str:
    """Content hash of the rows to score (their ``row_id``s are content hashes)."""
    h = hashlib.sha256()
    for batch in dataset.with_format("arrow").iter(batch_size=65536):
        for rid in batch.column(ROW_ID).to_pylist():
            h.update(str(rid).encode() + b"\n")
    h.update(f"rows={len(dataset)}".encode())
    return h.hexdigest()[:16]


def score_preferences(inputs, output_dir, config: ScoringConfig | None = None, *, load=None, executor: str = "local",
                      ray_config=None) -> Path:
    """Score preference pairs into ``output_dir`` (resumable); see the module docstring.

    Args:
        inputs: anything ``partitioner.data.loading.load_preferences`` reads (files, globs, ``name=path``, a
            ``save_to_disk`` folder, a ``datasets.Dataset``, ...). Every input goes through the loader's validation
            and gets content-hash ``row_id``s; a dataset that already has ``row_id``/``source`` keeps its sources.
        output_dir: the scored folder.
        config: see ``ScoringConfig``.
        load: how the inputs are read (``partitioner.data.loading.LoadConfig``; default: detected layouts).
        executor: ``"local"`` (this process) or ``"ray"`` (a Ray Data actor pool,
            :mod:`partitioner.scoring.ray_executor`; same output); ``ray_config`` is its ``RayConfig``.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ScoringError: no rows to score, or the folder holds results made with other settings (without overwrite).
        PreferenceDataError: an input cannot be read or holds no known layout.
        ModelLoadError: the model or tokenizer path does not exist or cannot be loaded.
        TokenizationError: conversational data and a tokenizer without a chat template.

    Assumptions:
        rows in = rows scored + rows rejected (loader + tokenizer rejects); checked before ``_SUCCESS`` is written.
        With ``limit``, loader rejects are all carried and only the first ``limit`` loaded rows are scored.
    """
    from scorers.models import load_tokenizer

    from ..data.loading import load_preferences_with_rejects
    from ..data.rejects import combine_rejects
    from ..data.tokenization import TokenizeConfig, tokenize_preferences

    config = config or ScoringConfig()
    if executor not in EXECUTORS:
        raise ScoringError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray":
        from .ray_executor import import_ray

        import_ray()  # fail early with the install hint
    out = Path(output_dir)
    dataset, report = load_preferences_with_rejects(inputs, load)
    loader_rejects = report.rejects_table()
    if config.limit is not None and config.limit < len(dataset):
        dataset = dataset.select(range(config.limit))
    if len(dataset) == 0:
        raise ScoringError("no rows to score: the input is empty or has no usable pair")
    missing = [c for c in CANONICAL if c not in dataset.column_names]
    if missing:
        raise ScoringError(f"the loaded data has no {missing[0]!r} column")

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    settings = job_settings(config, tokenizer, {"fingerprint": _fingerprint(dataset), "rows": len(dataset),
                                                "loader_rejects": len(loader_rejects)})
    config, settings = pin_linear_kernel(config, settings, out)
    prepare_folder(out, settings, config.overwrite)

    kept, tok_rejects = tokenize_preferences(
        dataset, tokenizer, TokenizeConfig(max_length=config.max_length, truncation_mode=config.truncation_mode)
    )
    rejects = combine_rejects(loader_rejects, tok_rejects)
    rows_in = len(dataset) + len(loader_rejects)
    n_parts = (len(kept) + config.rows_per_part - 1) // config.rows_per_part
    todo = [k for k in range(n_parts) if not part_done(out, k)]
    logger.info("%d rows to score in %d parts (%d done before), %d rejected", len(kept), n_parts,
                n_parts - len(todo), len(rejects))
    if todo:
        if executor == "ray":
            from .ray_executor import score_parts_ray

            scored = score_parts_ray(kept, todo, config, ray_config)
        else:
            scored = _score_parts_local(kept, todo, config)
        for k, table in scored:  # parts as they complete (in order locally, any order on Ray)
            write_part(out, k, table)
    return finish(out, settings, n_parts, rejects, rows_in, len(kept))


def _score_parts_local(kept, todo: list[int], config: ScoringConfig):
    """Yield ``(k, scored part k)`` for each part in ``todo``, scored in this process."""
    scorer = PartScorer(config)
    try:
        for k in todo:
            lo, hi = k * config.rows_per_part, min((k + 1) * config.rows_per_part, len(kept))
            yield k, scorer.score_part(kept.select(range(lo, hi)))
    finally:
        scorer.close()
