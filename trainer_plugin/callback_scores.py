"""The drop-in callback without a reference model: every training row's reference log-probs in one table.

With ``StepwiseConfig(ref_mode="precomputed")``, :class:`~trainer_plugin.callback.StepwiseReferenceCallback` takes a
DPOTrainer built with ``precompute_ref_log_probs=True`` and no ``ref_model``. TRL then keeps no reference model: in
its ``__init__`` it scores every training row once with the policy as it is (M0) into the ``ref_chosen_logps`` /
``ref_rejected_logps`` columns, and its loss reads those columns from each batch. :class:`ScoredReference` keeps
these values as chunk 1's reference and, at each chunk boundary, scores the next chunk's rows with the policy as it
is then, M(t-1), with the project's scorer (:func:`trainer_plugin.reference.score_pairs`: the model's device, no
gradients, eval mode, train mode restored), so a stock DPOTrainer trains chunk t against M(t-1).

How the batches get values scored after they were collated: the first batch of chunk t is collated before M(t-1)
exists (accelerate's dataloader fetches one batch ahead; dataloader workers and pinned memory copy further ahead),
so nothing written into the dataset or into collated tensors at a boundary would reach it. Instead the trainer's
two reference columns are replaced by each row's index in the training dataset (int64). TRL's collator stacks it
like any column, and the trainer's ``compute_loss`` (wrapped on the instance) swaps it for the table's current
values just before TRL's loss reads them. A row that the chunk-ordered sampler repeats to fill a step carries the
same index, so it gets the same values. The rows scored are exactly the rows TRL trains on: the trainer's own
dataset after its preparation, including any pair it dropped because the prompt fills ``max_length``. Float
columns, as in eval batches, pass through unchanged.

Several processes: each process scores every ``count``-th row of the chunk and the results are gathered in order
(:meth:`trainer_plugin.distributed.Processes.split_scoring`, as in the driver), so each row is scored once and every
process ends with the same table. The scorer runs the whole model on each process, which DDP replicas are, so FSDP
and DeepSpeed ZeRO-3, where each process holds only a shard, are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from sdpo_core.columns import TOKEN_COLUMNS, TRL_REF_CHOSEN, TRL_REF_REJECTED

from .distributed import processes_of, weights_are_sharded
from .reference import score_pairs

logger = logging.getLogger(__name__)

REF_COLUMNS = (TRL_REF_CHOSEN, TRL_REF_REJECTED)


class ScoredReference:
    """Reference log-probs of every row of ``trainer.train_dataset``, read at each ``compute_loss``.

    Binding changes the trainer: its training dataset's reference columns hold row indices and its
    ``compute_loss`` resolves them. ``table`` (rows x [chosen, rejected], float32, on the trainer's device) starts
    with the trainer's own columns (M0's).

    Raises:
        ValueError: the trainer holds a reference model, does not precompute reference log-probs, uses ``ld_alpha``
            (the scorer sums every completion token), shards the weights (FSDP, ZeRO-3), or has no reference columns.
    """

    def __init__(self, trainer, *, batch_tokens: int = 4096, packed_attention: str = "auto"):
        args = trainer.args
        if getattr(trainer, "ref_model", None) is not None or not args.precompute_ref_log_probs:
            raise ValueError("ref_mode 'precomputed' keeps no reference model in memory: build the DPOTrainer with "
                             "ref_model=None and precompute_ref_log_probs=True (TRL then scores M0's reference "
                             "log-probs once, in its __init__)")
        if getattr(args, "ld_alpha", None) is not None:
            raise ValueError("ref_mode 'precomputed' in the callback does not support ld_alpha (the scorer sums "
                             "every completion token); use ref_mode 'live'")
        if weights_are_sharded(trainer):
            raise ValueError("ref_mode 'precomputed' in the callback scores with the whole model on each process; "
                             "under FSDP / DeepSpeed ZeRO-3 use ref_mode 'live' or the stepwise driver")
        ds = trainer.train_dataset
        if not set(REF_COLUMNS) <= set(ds.column_names):
            raise ValueError(f"the trainer's training dataset has no {REF_COLUMNS} columns to start from")
        self.table = torch.tensor([ds[TRL_REF_CHOSEN], ds[TRL_REF_REJECTED]], dtype=torch.float32).T.contiguous()
        self.table = self.table.to(trainer.accelerator.device)
        self.rows = ds.select_columns(list(TOKEN_COLUMNS))  # what the scorer reads
        ids = list(range(len(ds)))
        trainer.train_dataset = ds.remove_columns(list(REF_COLUMNS)).add_column(TRL_REF_CHOSEN, ids) \
            .add_column(TRL_REF_REJECTED, ids)

        def score(model, rows):
            return score_pairs(model, rows, max_length=args.max_length, truncation_mode=args.truncation_mode,
                               batch_tokens=batch_tokens, packed_attention=packed_attention)

        self._score = processes_of(args).split_scoring(score)
        compute_loss = trainer.compute_loss

        def compute_loss_with_reference(model, inputs, *rest, **kwargs):
            return compute_loss(model, self.resolve(inputs), *rest, **kwargs)

        trainer.compute_loss = compute_loss_with_reference

    def score(self, model, rows: range) -> None:
        """Set the table's rows ``rows`` (a contiguous range: one chunk) to ``model``'s scores."""
        chosen, rejected = self._score(model, self.rows.select(rows))
        self.table[rows.start:rows.stop] = torch.tensor([chosen, rejected], dtype=torch.float32).T.to(self.table.device)

    def forget(self, rows: range) -> None:
        """Mark rows as not scored by the current reference: a batch that reads them fails instead of using stale
        values."""
        self.table[rows.start:rows.stop] = float("nan")

    def resolve(self, inputs):
        """``inputs`` with row indices in the reference columns replaced by the table's values.

        Raises:
            RuntimeError: a row was not scored by the current reference (no boundary scoring reached it).
        """
        ids = inputs.get(TRL_REF_CHOSEN) if isinstance(inputs, Mapping) else None
        if ids is None or torch.is_floating_point(ids):
            return inputs
        values = self.table[ids.to(self.table.device)]
        if torch.isnan(values).any():
            raise RuntimeError(f"training rows {ids.tolist()} have no reference log-probs of the current reference "
                               "(a chunk boundary was not scored)")
        return {**inputs, TRL_REF_CHOSEN: values[:, 0].to(ids.device), TRL_REF_REJECTED: values[:, 1].to(ids.device)}
