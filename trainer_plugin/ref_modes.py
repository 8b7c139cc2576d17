"""The three ways to hold step t's reference, M(t-1): one small strategy object each, with the same methods.

* :class:`LiveReference` (``live``): a frozen deep copy of M(t-1) is TRL's ``ref_model``. (Left to itself,
  DPOTrainer would reload the *original* checkpoint from ``config._name_or_path`` at every step.)
* :class:`PrecomputedReference` (``precomputed``): chunk t is scored with M(t-1) before the step and handed to TRL
  as ``ref_chosen_logps``/``ref_rejected_logps``; no reference model is in memory while training. Step 1 reuses
  the partition's M0 scores when they were made by the same model and settings.
* :class:`PeftReference` (``peft``): before step t the adapters of steps < t are merged into the base, so TRL's
  adapter-disabled reference is M(t-1), never the bare base model; a fresh LoRA adapter trains on top.

Each has ``load_policy`` (M(k) when resuming after k steps), ``reference`` (the reference for step t, built from
the policy as it is now, M(t-1)), ``after_step`` (M(t) from the step's trainer) and ``save_step`` (what the mode
keeps in ``step_t/`` besides the trainer's own save).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from partitioner.io import write_arrow_stream
from scorers.compat import drop_trl_forward_patch
from sdpo_core.columns import CHOSEN_LOGPS, REJECTED_LOGPS, ROW_ID, TRL_REF_CHOSEN, TRL_REF_REJECTED

from .reference import frozen_copy

logger = logging.getLogger(__name__)

REFERENCE_LOGPS_FILE = "reference_logps.arrow"
Scorer = Callable[[object, object], tuple[list[float], list[float]]]  # (model, dataset) -> (chosen, rejected)


@dataclass
class StepReference:
    """Step t's reference: a live model for TRL (or None), the dataset to train on, M(t-1)'s scores if known."""

    model: object | None
    train_dataset: object
    scores: tuple[list[float], list[float]] | None
    source: str


def merge_adapter(model, adapter_dir: Path):
    """``model`` with the LoRA adapter saved in ``adapter_dir`` merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def with_ref_columns(chunk, chosen, rejected):
    """``chunk`` with TRL's precomputed reference columns set to these log-probs."""
    for col in (TRL_REF_CHOSEN, TRL_REF_REJECTED):
        if col in chunk.column_names:
            chunk = chunk.remove_columns(col)
    return chunk.add_column(TRL_REF_CHOSEN, list(chosen)).add_column(TRL_REF_REJECTED, list(rejected))


def _load_saved_policy(m0, step_dir: Path, dtype: str):
    """M(k) from ``step_dir``: loaded from disk (M0 given as a path, or None), or its weights loaded into M0."""
    from scorers.models import load_causal_lm

    if m0 is None or isinstance(m0, (str, Path)):
        return load_causal_lm(str(step_dir), dtype=dtype)
    from safetensors.torch import load_file

    m0.load_state_dict(load_file(str(step_dir / "model.safetensors")), strict=False)
    return m0


def _load_m0(m0, dtype: str):
    from scorers.models import load_causal_lm

    return load_causal_lm(str(m0), dtype=dtype) if isinstance(m0, (str, Path)) else m0


class LiveReference:
    """``schedule`` (set by the driver): ``None`` for sDPO (the reference of step t is M(t-1)); else a
    :class:`~trainer_plugin.ref_refresh.ReferenceSchedule` that picks M(j) (``ref_refresh`` 'never' or 'kl'); a
    reference copied from the policy is held by it for the steps that may reuse it."""

    name = "live"
    precompute = False
    peft_config = None
    schedule = None

    def load_policy(self, m0, run, k: int, dtype: str):
        return _load_saved_policy(m0, run.step_dir(k), dtype) if k else _load_m0(m0, dtype)

    def _label(self, t: int) -> str:
        j = t - 1 if self.schedule is None else self.schedule.current
        if self.schedule is not None and self.schedule.mode == "never":
            return "M0 (never refreshed)"
        return f"M({j})" if j == t - 1 else f"M({j}) (kept: KL below kl_threshold)"

    def reference(self, t: int, policy, chunk) -> StepReference:
        drop_trl_forward_patch(policy)
        if self.schedule is None:
            return StepReference(frozen_copy(policy), chunk, None, f"frozen copy of M({t - 1})")
        if self.schedule.is_policy(t):
            ref = frozen_copy(policy)
            self.schedule.keep(t - 1, ref)
        else:
            ref = self.schedule.model(self.schedule.current)
        return StepReference(ref, chunk, None, f"frozen copy of {self._label(t)}")

    def after_step(self, trainer):
        return trainer.accelerator.unwrap_model(trainer.model)

    def save_step(self, step_dir: Path, ref: StepReference) -> None:
        pass


class PrecomputedReference(LiveReference):
    name = "precomputed"
    precompute = True

    def __init__(self, score: Scorer, reuse_partition_scores: bool):
        self.score, self.reuse_partition_scores = score, reuse_partition_scores

    def reference(self, t: int, policy, chunk) -> StepReference:
        j = t - 1 if self.schedule is None else self.schedule.current
        if j == 0 and self.reuse_partition_scores and CHOSEN_LOGPS in chunk.column_names:
            scores, source = (list(chunk[CHOSEN_LOGPS]), list(chunk[REJECTED_LOGPS])), "partition scores (same " \
                "model M0)"
        elif j == t - 1:
            scores, source = self.score(policy, chunk), f"scored with M({t - 1})"
        else:
            scores, source = self.score(self.schedule.model(j), chunk), f"scored with {self._label(t)}"
        if self.schedule is not None:
            self.schedule.release()  # no reference model in memory while the step trains
        return StepReference(None, with_ref_columns(chunk, *scores), scores, source)

    def save_step(self, step_dir: Path, ref: StepReference) -> None:
        chunk = ref.train_dataset
        cols = [c for c in (ROW_ID, TRL_REF_CHOSEN, TRL_REF_REJECTED) if c in chunk.column_names]
        write_arrow_stream(chunk.select_columns(cols).data.table, step_dir / REFERENCE_LOGPS_FILE)


class PeftReference(LiveReference):
    name = "peft"

    def __init__(self, peft_config):
        self.peft_config = peft_config

    def load_policy(self, m0, run, k: int, dtype: str):
        policy = _load_m0(m0, dtype)
        for s in range(1, k + 1):
            policy = merge_adapter(policy, run.step_dir(s))
        return policy

    def reference(self, t: int, policy, chunk) -> StepReference:
        return StepReference(None, chunk, None, f"M({t - 1}): adapters of steps < {t} merged, new adapter disabled")

    def after_step(self, trainer):
        return trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()


def _peft_reference(config, score: Scorer, reuse_partition_scores: bool, peft_config=None) -> PeftReference:
    if peft_config is None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=config.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
    return PeftReference(peft_config)


@dataclass(frozen=True)
class ReferenceMode:
    """How step t's reference M(t-1) is held (``StepwiseConfig.ref_mode``)."""

    name: str
    help: str  # README.md's reference-mode table shows it
    build: Callable  # (config, score, reuse_partition_scores, peft_config) -> the strategy object


REFERENCE_MODES = {m.name: m for m in (
    ReferenceMode("live", "a frozen copy of M(t-1) is handed to TRL as `ref_model` (left to itself, DPOTrainer would "
                  "reload the original checkpoint as the reference at every step)",
                  lambda config, score, reuse, peft_config=None: LiveReference()),
    ReferenceMode("precomputed", "before step t, chunk t is scored with M(t-1) by the project's scorer and given to "
                  "TRL as `ref_chosen_logps`/`ref_rejected_logps`; no reference model in memory while training "
                  "(step 1 reuses the partition's M0 scores when they match)",
                  lambda config, score, reuse, peft_config=None: PrecomputedReference(score, reuse)),
    ReferenceMode("peft", "LoRA: before step t the adapters of steps < t are merged into the base, so TRL's "
                  "adapter-disabled reference is M(t-1), never the bare base model", _peft_reference),
)}


def reference_mode(config, score: Scorer, reuse_partition_scores: bool, peft_config=None) -> LiveReference:
    """The strategy object of ``config.ref_mode`` (a ``StepwiseConfig``; :data:`REFERENCE_MODES`); ``peft_config``
    defaults to a LoRA config built from ``config.lora_*``."""
    return REFERENCE_MODES[config.ref_mode].build(config, score, reuse_partition_scores, peft_config)
