"""Reference-model plumbing for stepwise DPO: frozen copies, the hard weight refresh, and chunk scoring.

The reference of step t is M(t-1); :mod:`trainer_plugin.ref_modes` holds it in one of three ways, with these.
"""

from __future__ import annotations

import copy
import logging

import torch

from sdpo_core.columns import TOKEN_COLUMNS

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

    Called on every process. DDP: each process copies its own full replica (DDP keeps the policy replicas equal).
    FSDP: each process copies its own shards (FSDP2 shards every parameter along dim 0 whatever the wrapping, so
    the policy's and the reference's shards line up; FSDP1 with the same wrap policy, as TRL prepares the reference).
    DeepSpeed ZeRO-3: the parameters are gathered on rank 0, modified there and re-partitioned, as TRL does.

    Assumptions:
        ``policy`` and ``reference`` have the same architecture (parameters zip in the same order); ``policy``
        is unwrapped (no DDP/accelerate wrapper).

    Raises:
        ValueError: a reference parameter is shaped or sharded differently from the policy's.
    """
    from accelerate.state import AcceleratorState

    def _copy():
        for (name, ref_p), pol_p in zip(reference.named_parameters(), policy.parameters(), strict=True):
            if ref_p.shape != pol_p.shape or getattr(ref_p, "placements", None) != getattr(pol_p, "placements", None):
                raise ValueError(f"reference parameter {name} is laid out unlike the policy's "
                                 f"({tuple(ref_p.shape)} vs {tuple(pol_p.shape)}); cannot refresh it in place")
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


def scores_differ(scoring: dict, model_path: str, max_length, truncation_mode: str, dtype: str) -> str | None:
    """Why the ``chosen_logps``/``rejected_logps`` a scored folder (or a partition of one) records, under its
    ``scoring`` settings (``scoring.json``), are not ``model_path``'s reference log-probs as DPOTrainer would compute
    them with these settings; ``None`` when they are."""
    from scorers.models import model_fingerprint

    scored_by, tok = scoring.get("model") or {}, scoring.get("tokenizer") or {}
    if model_fingerprint(model_path).get("content_hash") != scored_by.get("content_hash"):
        return f"scored with model {scored_by.get('name_or_path')}, not {model_path}"
    for name, scored, wanted in (("max_length", tok.get("max_length"), max_length),
                                 ("truncation_mode", tok.get("truncation_mode", "keep_start"), truncation_mode),
                                 ("dtype", scoring.get("dtype", "float32"), dtype)):
        if scored != wanted:
            return f"scored with {name} {scored}, not {wanted}"
    return None


def score_pairs(
    model: torch.nn.Module,
    dataset,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    batch_tokens: int = 4096,
    packed_attention: str = "auto",
) -> tuple[list[float], list[float]]:
    """Summed log-probs of chosen and rejected completions under ``model``, as DPOTrainer's reference computes them.

    Uses the scorer's backend (``scorers.transformers_backend.TransformersBackend``: TRL's truncation, sums over
    the completion tokens the collator keeps). The model's train/eval mode is restored afterwards.

    Args:
        dataset: rows with ``prompt_ids``/``chosen_ids``/``rejected_ids`` (a ``datasets.Dataset`` or list of dicts).
        packed_attention: the packed layout's attention kernel (``StepwiseConfig.packed_attention``).

    Returns:
        ``(chosen_logps, rejected_logps)`` as Python float lists, in input order.
    """
    from scorers.transformers_backend import TransformersBackend

    rows = dataset.select_columns(list(TOKEN_COLUMNS)).to_list() if hasattr(dataset, "select_columns") else list(dataset)
    was_training = model.training
    try:
        backend = TransformersBackend(model, max_length=max_length, truncation_mode=truncation_mode,
                                      batch_tokens=batch_tokens, progress=False, packed_attention=packed_attention)
        out = backend.score(rows)
    finally:
        model.train(was_training)
    return out["chosen_logps"], out["rejected_logps"]
