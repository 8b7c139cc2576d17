"""SelectiveDPO's difficulty (Gao et al. 2025, arXiv 2502.09650): each pair's held-out DPO loss, cross-fitted.

The pairs are dealt into K folds (seeded, stratified by source); for every fold j a model is trained with DPO on the
other K−1 folds (the stepwise driver, one step from M0, the run's ``DPOConfig``) and scores fold j. A pair's
difficulty is its DPO loss under the model that never saw it, against M0 as the reference:
``−log σ(β((log π_j(y_w) − log π_0(y_w)) − (log π_j(y_l) − log π_0(y_l))))``. SelectiveDPO keeps the easiest
share (0.5 in the paper) and trains on it easy→hard: partition the result with ``order='column'``,
``column='crossfit_dpo_loss'``, ``keep_fraction=0.5``.

Differences from the paper's code (glorgao/SelectiveDPO): it averages several reference runs per pair (seeds); here
one run per fold (``folds`` = K), whose cost is K trainings on (K−1)/K of the pairs, recorded in ``crossfit.json``.

Resumable: each fold's run is a stepwise run folder under ``work_dir`` (a rerun skips finished folds).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from partitioner.io import read_json, write_json
from sdpo_core.columns import CHOSEN_LOGPS, REJECTED_LOGPS, ROW_ID, SOURCE
from sdpo_core.config import check_ranges
from sdpo_core.errors import ConfigError

from .config import StepwiseConfig

CROSSFIT_LOSS = "crossfit_dpo_loss"  # the column written: the pair's held-out DPO loss (higher = harder)
CROSSFIT_RECORD = "crossfit.json"


@dataclass
class CrossFitConfig:
    """How the pairs are cross-fitted (SelectiveDPO's difficulty)."""

    folds: int = field(default=2, metadata={"min": 2, "help": "K: folds of the pairs (stratified by source); each "
                                            "fold's loss comes from a model trained on the other K-1."})
    fold_seed: int = field(default=0, metadata={"min": 0, "help": "Seed of the fold assignment."})

    def __post_init__(self):
        check_ranges(self)


def crossfit_folds(row_ids: list[str], sources: list[str] | None, folds: int, seed: int) -> list[int]:
    """Fold of each row: within each source a seeded permutation of its rows (sorted by row id) dealt round-robin."""
    fold = [0] * len(row_ids)
    groups: dict = {}
    for i, (rid, src) in enumerate(zip(row_ids, sources or [""] * len(row_ids))):
        groups.setdefault(src, []).append((rid, i))
    for g, src in enumerate(sorted(groups)):
        members = [i for _, i in sorted(groups[src])]
        for pos, j in enumerate(np.random.default_rng([seed, g]).permutation(len(members))):
            fold[members[j]] = pos % folds
    return fold


def _check_folds(folds: int, sources: list) -> None:
    """Refuse more folds than the pairs fill: within each source the pairs are dealt round-robin, so fold j holds
    pairs only if some source has more than j; with every fold filled (and K >= 2) each also has training pairs."""
    from collections import Counter

    largest = max(Counter(sources).values(), default=0)
    if folds > largest:
        raise ConfigError(f"folds {folds} is more than {len(sources)} pairs can fill (each source's pairs are dealt "
                          f"over the folds; the largest source has {largest}): use at most {largest} folds")


def cross_fitted_difficulty(dataset, model_path: str, *, args, work_dir, crossfit: CrossFitConfig | None = None,
                            config: StepwiseConfig | None = None, scoring: dict | None = None):
    """``dataset`` with a ``crossfit_dpo_loss`` column (see the module docstring).

    Args:
        dataset: tokenized pairs (a ``datasets.Dataset``, e.g. read from a scored folder); M0's ``chosen_logps`` /
            ``rejected_logps`` are used as the reference when present (they must be ``model_path``'s), else scored.
        model_path: M0 (a path or 'bundled').
        args: the ``trl.DPOConfig`` of every fold's training (``output_dir`` is replaced by ``work_dir/fold_j``).
        crossfit: folds and their seed (default: 2 folds, seed 0).
        config: the stepwise options of the fold runs (default: the precomputed reference).
        scoring: the settings the dataset's log-probs were scored with (a scored folder's ``scoring.json``, as
            ``partitioner.read_scored`` returns it): checked against ``model_path``, ``args`` and ``config``.

    Raises:
        ConfigError: more folds than the largest source's pairs (a fold would hold out none), or log-probs scored
            with another model, ``max_length``, ``truncation_mode`` or dtype than the fold runs use; one line.
        StepwiseInputError: ``config`` asks for more steps than a fold run's one chunk.
        All are raised before any model is loaded.
    """
    from trainer_plugin.driver import train_stepwise
    from trainer_plugin.reference import score_pairs, scores_differ
    from trainer_plugin.run_folder import load_step_model

    crossfit = crossfit or CrossFitConfig()
    sources = list(dataset[SOURCE]) if SOURCE in dataset.column_names else None
    _check_folds(crossfit.folds, sources or [""] * len(dataset))  # first: a refusal costs nothing
    config = config or StepwiseConfig(ref_mode="precomputed")
    config.steps_for(1)  # each fold run trains one chunk
    if scoring is not None and CHOSEN_LOGPS in dataset.column_names:
        why = scores_differ(scoring, model_path, args.max_length, args.truncation_mode, config.dtype)
        if why is not None:
            raise ConfigError(f"the pairs were {why}: the cross-fit's reference must be M0's log-probs under the "
                              "fold runs' settings")
    folds, seed = crossfit.folds, crossfit.fold_seed
    work = Path(work_dir)
    ids = list(dataset[ROW_ID])
    fold_of = crossfit_folds(ids, sources, folds, seed)
    losses = [math.nan] * len(ids)
    record = read_json(work / CROSSFIT_RECORD, "cross-fit record") if (work / CROSSFIT_RECORD).exists() else {}
    record.update(folds=folds, seed=seed, pairs=len(ids), fold_seconds=record.get("fold_seconds", {}))
    score = lambda m, rows: score_pairs(m, rows, max_length=args.max_length,  # noqa: E731
                                        truncation_mode=args.truncation_mode, batch_tokens=config.score_batch_tokens,
                                        packed_attention=config.packed_attention)
    if CHOSEN_LOGPS in dataset.column_names:
        m0_chosen, m0_rejected = list(dataset[CHOSEN_LOGPS]), list(dataset[REJECTED_LOGPS])
    else:
        from scorers.models import load_causal_lm

        m0_chosen, m0_rejected = score(load_causal_lm(model_path, dtype=config.dtype), dataset)
    beta = float(getattr(args, "beta", 0.1))
    for j in range(folds):
        train = [i for i, f in enumerate(fold_of) if f != j]
        held = [i for i, f in enumerate(fold_of) if f == j]
        run_dir = work / f"fold_{j}"
        fold_args = copy.deepcopy(args)
        fold_args.output_dir = str(run_dir)
        started = time.perf_counter()
        train_stepwise([dataset.select(train)], model_path, args=fold_args,
                       config=dataclasses.replace(config, held_out=None))
        if str(j) not in record["fold_seconds"]:
            record["fold_seconds"][str(j)] = time.perf_counter() - started
        chosen, rejected = score(load_step_model(run_dir, 1, model_path, dtype=config.dtype), dataset.select(held))
        for i, c, r in zip(held, chosen, rejected):
            margin = beta * ((c - m0_chosen[i]) - (r - m0_rejected[i]))
            losses[i] = float(np.logaddexp(0.0, -margin))  # −log σ(margin), stable
    work.mkdir(parents=True, exist_ok=True)
    record["train_seconds"] = sum(record["fold_seconds"].values())
    write_json(work / CROSSFIT_RECORD, record)
    if CROSSFIT_LOSS in dataset.column_names:
        dataset = dataset.remove_columns(CROSSFIT_LOSS)
    return dataset.add_column(CROSSFIT_LOSS, losses)
