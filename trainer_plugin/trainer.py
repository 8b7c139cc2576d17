"""``StepwiseDPOTrainer``: TRL's ``DPOTrainer`` that keeps reference log-probs it is given and tags its logs;
``PackedStepwiseDPOTrainer``: the same with the packed, prefix-shared forward (:mod:`trainer_plugin.packed`).

Given ``ref_chosen_logps``/``ref_rejected_logps`` columns with ``precompute_ref_log_probs=True`` (the
``precomputed`` reference mode), TRL would recompute them with its own reference; this trainer keeps them, and
skips what TRL does only for that recomputation: the weight hash that keys its cache and, under FSDP, loading a
whole reference model (:func:`scorers.compat.trl_init_with_given_ref_logps`).
"""

from __future__ import annotations

from trl import DPOTrainer

from scorers.compat import KeepGivenRefLogps, trl_init_with_given_ref_logps
from sdpo_core.columns import TRL_REF_CHOSEN, TRL_REF_REJECTED

from .packed import PackedForward


def has_ref_columns(dataset) -> bool:
    return dataset is not None and {TRL_REF_CHOSEN, TRL_REF_REJECTED} <= set(getattr(dataset, "column_names", ()))


class StepwiseDPOTrainer(KeepGivenRefLogps, DPOTrainer):
    """``DPOTrainer`` for one step of stepwise DPO: given reference log-probs are kept; logs carry
    ``stepwise/step`` (set :attr:`stepwise_step`)."""

    stepwise_step: int | None = None

    def __init__(self, *args, **kwargs):
        cfg = kwargs.get("args")
        given = (cfg is not None and cfg.precompute_ref_log_probs and has_ref_columns(kwargs.get("train_dataset"))
                 and (kwargs.get("eval_dataset") is None or has_ref_columns(kwargs.get("eval_dataset"))))
        if given:
            model = kwargs.get("model", args[0] if args else None)
            with trl_init_with_given_ref_logps(policy_is_loaded=not isinstance(model, str)):
                super().__init__(*args, **kwargs)
        else:
            super().__init__(*args, **kwargs)

    def log(self, logs, start_time=None):
        if self.stepwise_step is not None:
            logs = {**logs, "stepwise/step": self.stepwise_step}
        return super().log(logs, start_time)


class PackedStepwiseDPOTrainer(PackedForward, StepwiseDPOTrainer):
    """``StepwiseDPOTrainer`` with the packed forward (``packed_batch_tokens``: see :class:`PackedForward`)."""
