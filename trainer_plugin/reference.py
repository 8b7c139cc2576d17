"""Reference-model plumbing for stepwise DPO: frozen copies, hard weight refresh, and chunk scoring.

The reference of step t is M(t-1). Three ways to hold it (see ``driver.StepwiseConfig.ref_mode``):
a frozen in-memory copy (``frozen_copy``), precomputed log-probs (``score_pairs``), or, with PEFT, the merged
previous adapters under a fresh adapter (handled in the driver).
"""

from __future__ import annotations

import copy
import logging

import torch

logger = logging.getLogger(__name__)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False`` (the live reference M(t-1))."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def hard_refresh(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Copy the policy's weights into the reference in place (alpha=1 of TRL's ``SyncRefModelCallback``).

    Under DeepSpeed ZeRO-3 the parameters are gathered on rank 0, modified there and re-partitioned, as TRL does.

    Assumptions:
        ``policy`` and ``reference`` have the same architecture (parameters zip in the same order); ``policy``
        is unwrapped (no DDP/accelerate wrapper).
    """
    from accelerate.state import AcceleratorState

    def _copy():
        for ref_p, pol_p in zip(reference.parameters(), policy.parameters(), strict=True):
            ref_p.data.copy_(pol_p.data)

    try:
        plugin = AcceleratorState().deepspeed_plugin
    except Exception:  # noqa: BLE001 - no accelerator state initialised (plain python use)
        plugin = None
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        params = list(policy.parameters()) + list(reference.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if deepspeed.comm.get_rank() == 0:
                _copy()
    else:
        _copy()


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    dataset,
    *,
    pad_token_id: int,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> tuple[list[float], list[float]]:
    """Summed log-probs of chosen and rejected completions, exactly as ``DPOTrainer.compute_ref_log_probs``.

    Batches are built by TRL's own ``DataCollatorForPreference`` (same concatenation, truncation and completion
    mask); pairs are processed in length-sorted order and returned in input order. Token log-probs are taken with
    ``F.cross_entropy`` over the logits (no full log_softmax materialised).

    Args:
        dataset: rows with ``prompt_ids``/``chosen_ids``/``rejected_ids`` (a ``datasets.Dataset`` or list of dicts).

    Returns:
        ``(chosen_logps, rejected_logps)`` as Python float lists (float64 sums of fp32 token log-probs).
    """
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from partitioner.schema import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS

    collator = DataCollatorForPreference(
        pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    cols = (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS)
    if hasattr(dataset, "select_columns"):
        rows = dataset.select_columns(list(cols)).to_list()
    else:
        rows = [{c: r[c] for c in cols} for r in dataset]
    lengths = [len(r[PROMPT_IDS]) + max(len(r[CHOSEN_IDS]), len(r[REJECTED_IDS])) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen = [0.0] * len(rows)
    rejected = [0.0] * len(rows)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collator([rows[i] for i in idx])
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            mask = batch["completion_mask"].to(device)[:, 1:]
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
            labels = input_ids[:, 1:]
            tok = -torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, reduction="none"
            )
            sums = (tok * mask).double().sum(dim=1).cpu().tolist()
            n = len(idx)
            for j, i in enumerate(idx):
                chosen[i] = sums[j]
                rejected[i] = sums[n + j]
    finally:
        model.train(was_training)
    return chosen, rejected


def margin_stats(chosen: list[float], rejected: list[float]) -> dict:
    """Mean γ (chosen − rejected log-prob) and reward accuracy (share of pairs with γ > 0)."""
    if not chosen:
        return {"mean_margin": None, "reward_accuracy": None, "pairs": 0}
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "mean_margin": sum(margins) / len(margins),
        "reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "pairs": len(margins),
    }
