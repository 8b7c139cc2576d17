"""Stepwise DPO (sDPO) driver: one fresh TRL ``DPOTrainer`` per curriculum chunk.

For step t = 1..T the policy *and* the reference both start from M(t-1) (M0 = the given SFT model); the step
trains on chunk t with a new optimizer and LR schedule (as in the paper) and saves M(t) to ``output_dir/step_t/``
with a completion marker written last (:mod:`trainer_plugin.run_folder`). A rerun of the same command resumes
after the last completed step; seeds are derived per step (``args.seed + t - 1``), so a resumed run ends equal
to an uninterrupted one. How the reference is held is the ``ref_mode`` (:mod:`trainer_plugin.ref_modes`).
Under ``torchrun`` / ``accelerate launch`` every process runs this driver (:mod:`trainer_plugin.distributed`:
the main process writes, the scoring passes are split by rows).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from scorers.columns import ROW_ID
from scorers.compat import drop_trl_forward_patch, model_name_or_path
from scorers.stats import margin_stats

from .config import StepwiseConfig, StepwiseInputError
from .distributed import check_saves_whole, processes_of, weights_are_sharded
from .inputs import check_tokenizer, ensure_tokens, load_chunks, load_held_out
from .ref_modes import LiveReference, PeftReference, PrecomputedReference
from .ref_refresh import ReferenceSchedule, kl_probe
from .reference import score_pairs, scores_differ
from .run_folder import RunFolder

logger = logging.getLogger(__name__)


def train_stepwise(
    partition_dir,
    model,
    *,
    args,
    ref_mode: str | None = None,
    config: StepwiseConfig | None = None,
    tokenizer=None,
    eval_dataset=None,
    peft_config=None,
    callbacks: list | None = None,
    trainer_hook: Callable[[int, Any], None] | None = None,
) -> list[dict]:
    """Run stepwise DPO over a partition's chunks; returns the per-step records (also in ``steps.json``).

    Args:
        partition_dir: a partition folder (verified first) or a list of ``datasets.Dataset`` chunks in order.
        model: M0, a path/hub id/'bundled' or a loaded ``PreTrainedModel`` (trained in place).
        args: a ``trl.DPOConfig``; ``output_dir`` receives ``step_t/``, ``steps.json`` and ``run.json``. Each step
            gets a copy with ``seed = args.seed + t - 1`` and its own optimizer and LR schedule.
        ref_mode: overrides ``config.ref_mode``.
        eval_dataset: held-out pairs; γ_ref of every M(t) on it is logged.
        peft_config: LoRA config for ``ref_mode='peft'`` (default: built from ``config.lora_*``).
        trainer_hook: called as ``hook(t, trainer)`` after each step's trainer is built, before it trains.

    Raises:
        StepwiseInputError: bad partition (missing chunks, failed verification), tokenizer mismatch, or an output
            folder that belongs to another run; raised before any training starts.
    """
    from scorers.models import load_tokenizer

    config = config or StepwiseConfig()
    if ref_mode is not None:
        config = dataclasses.replace(config, ref_mode=ref_mode)
    if getattr(args, "sync_ref_model", False):
        raise StepwiseInputError("sync_ref_model cannot be combined with the stepwise driver (it sets the reference)")
    procs = processes_of(args)
    chunks, manifest = load_chunks(partition_dir)
    n_steps = config.steps_for(len(chunks))  # the count options against the partition, before any model loads
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    tokenizer = tokenizer or load_tokenizer(str(model_path) if model_path is not None else model_name_or_path(model.config))
    if config.check_tokenizer:
        check_tokenizer(tokenizer, chunks, manifest)
    # Chunks of an unscored partition are tokenized here, once, as DPOTrainer would (dropping pairs whose prompt
    # fills max_length): the reference scores, the rows each process scores and the rows TRL trains stay aligned.
    with procs.main_first():
        chunks = [ensure_tokens(c, tokenizer, args.max_length, args.truncation_mode) for c in chunks]
    if eval_dataset is None and config.held_out:
        eval_dataset = load_held_out(config.held_out)
    if eval_dataset is not None:
        with procs.main_first():  # tokenizing may write a datasets cache file beside the held-out file
            eval_dataset = ensure_tokens(eval_dataset, tokenizer, args.max_length, args.truncation_mode)

    def score_rows(m, tokenized):  # M's summed log-probs of chosen and rejected, as DPOTrainer's reference has them
        return score_pairs(m, tokenized, max_length=args.max_length, truncation_mode=args.truncation_mode,
                           batch_tokens=config.score_batch_tokens, packed_attention=config.packed_attention)

    split_score = procs.split_scoring(score_rows)  # each row scored once, on one process; every process gets all

    def score(m, dataset):
        # Tokenize (dropping, as DPOTrainer does, pairs whose prompt fills max_length) before the rows are split:
        # every process then splits the same kept rows, and the gathered scores stay aligned with them.
        return split_score(m, ensure_tokens(dataset, tokenizer, args.max_length, args.truncation_mode))
    if config.ref_refresh == "kl" and (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)):
        raise StepwiseInputError("ref_refresh 'kl' measures the KL with whole models: not under FSDP / DeepSpeed")
    mode = _reference_mode(config, score, _can_reuse_scores(manifest, model_path, args, config), peft_config)
    with procs.main_first():  # the main process checks and cleans the folder before the others read it
        run = RunFolder(args.output_dir, _identity(config, partition_dir, chunks, manifest, args),
                        dataclasses.asdict(config), write=procs.is_main)
    procs.agree(run.completed, "completed steps", run.path)
    k = len(run.completed)
    policy = _on_device(mode.load_policy(model, run, k, config.dtype), args, config)  # M(k): after step k
    if config.ref_refresh != "step":  # the reference is some M(j), not always M(t-1): a schedule picks j
        mode.schedule = _schedule(config, model_path, run, args, tokenizer, chunks)
    for t, orders in sorted(((int(t), o) for t, o in run.rescored_orders.items())):
        if t <= k:
            chunks = _apply_order(chunks, t, orders)

    for t in range(k + 1, n_steps + 1):
        if procs.is_main:
            logger.info("stepwise step %d/%d: %d pairs (%s mode)", t, n_steps, len(chunks[t - 1]), mode.name)
        started = time.perf_counter()
        decision = mode.schedule.decide(t, policy) if mode.schedule is not None else {"reference_step": t - 1}
        ref = mode.reference(t, policy, chunks[t - 1])  # sDPO: the reference of step t is M(t-1), the policy now
        record: dict = {"step": t, "chunk": t - 1, "rows": len(chunks[t - 1]), "ref_mode": mode.name, **decision,
                        "loss": "sft" if t > n_steps - config.sft_steps else "dpo",
                        "reference_source": ref.source, "ref_refresh_seconds": time.perf_counter() - started,
                        "reference": _reference_stats(config, score, policy, ref, eval_dataset)}

        trainer = _step_trainer(t, policy, ref, mode, args, eval_dataset, tokenizer, callbacks, run, config,
                                sft=record["loss"] == "sft")
        check_saves_whole(trainer)
        record["rows_trained"] = len(trainer.train_dataset)
        if record["rows_trained"] != len(chunks[t - 1]) and procs.is_main:
            logger.warning("step %d: TRL dropped %d pair(s) whose prompt fills max_length=%s", t,
                           len(chunks[t - 1]) - record["rows_trained"], args.max_length)
        if trainer_hook is not None:
            trainer_hook(t, trainer)
        result = trainer.train()
        record.update(optimizer_steps=trainer.state.global_step, train_runtime=result.metrics.get("train_runtime"),
                      train_loss=result.metrics.get("train_loss"), trl=_trl_metrics(trainer.state.log_history))
        if procs.is_main:
            logger.info("step %d %s", t, json.dumps({"stepwise/step": t, **_flat_stats(record["reference"]),
                                                     **record["trl"]}))

        trainer.save_model(str(run.step_dir(t)))  # with the tokenizer; every process takes part, the main one writes
        if run.write:
            mode.save_step(run.step_dir(t), ref)
        if weights_are_sharded(trainer):  # FSDP / ZeRO-3: each process holds a shard; M(t) is read back whole
            procs.wait()
            policy = _on_device(mode.load_policy(_reload_base(model, mode), run, t, config.dtype), args, config)
        else:
            policy = mode.after_step(trainer)  # M(t)
        drop_trl_forward_patch(policy)
        del trainer, ref
        gc.collect()

        if config.rescore_between_steps and t < len(chunks):
            chunks, orders = _rescore_remaining(score, policy, chunks, t)
            run.record_order(t, orders)
            record["rescored_remaining"] = sum(len(o) for o in orders)
        run.complete_step(t, record)

    final = {}
    if eval_dataset is not None and n_steps == len(run.records):
        final["held_out"] = margin_stats(*score(policy, eval_dataset))
    run.finish(final, mode.name)
    return run.records


def _on_device(policy, args, config):
    """``policy`` in the run's dtype on this process's device (where its scoring passes run)."""
    import torch

    if policy.dtype != getattr(torch, config.dtype):
        policy.to(getattr(torch, config.dtype))
    return policy.to(args.device)


def _reload_base(model, mode):
    """What ``mode.load_policy`` rebuilds M(t) from under sharded training: the path of M0 (a loaded M0 object
    was sharded in place by FSDP / ZeRO-3)."""
    if isinstance(model, (str, os.PathLike)):
        return model
    if mode.name == "peft":
        raise StepwiseInputError("ref_mode 'peft' under FSDP / DeepSpeed ZeRO-3 needs the model as a path, not a "
                                 "loaded model (M(t) is rebuilt from it and the saved adapters)")
    return None  # 'live' / 'precomputed' then load step_t from disk alone


def _load_saved_policy_m0(model_path, dtype: str):
    from scorers.models import load_causal_lm

    return load_causal_lm(str(model_path), dtype=dtype)


def _schedule(config, model_path, run, args, tokenizer, chunks) -> ReferenceSchedule:
    """The run's reference schedule: M(j) loaded from step_j (M0 from the model path); the KL probe is a seeded
    sample of ``kl_probe_rows`` training pairs of all chunks, fixed for the run."""
    from datasets import concatenate_datasets

    from scorers.divergence import mean_token_kl

    def load(j):
        if j == 0 and model_path is None:
            raise StepwiseInputError(f"ref_refresh {config.ref_refresh!r} needs the model as a path (M0 is reloaded "
                                     "from it)")
        return _on_device(_load_saved_policy_m0(model_path if j == 0 else run.step_dir(j), config.dtype), args, config)

    probe = kl_probe(concatenate_datasets(chunks), config.kl_probe_rows, args.seed)

    def kl(policy, reference):
        return mean_token_kl(policy, reference, probe, max_length=args.max_length,
                             truncation_mode=args.truncation_mode)

    return ReferenceSchedule(config, load, kl, run.records)


def _reference_mode(config: StepwiseConfig, score, reuse_scores: bool, peft_config):
    if config.ref_mode == "precomputed":
        return PrecomputedReference(score, reuse_scores)
    if config.ref_mode == "peft":
        if peft_config is None:
            from peft import LoraConfig

            peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                     target_modules=config.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
        return PeftReference(peft_config)
    return LiveReference()


def _identity(config, partition_dir, chunks, manifest, args) -> dict:
    """What identifies a run: a rerun into the same folder must match it."""
    return {
        "ref_mode": config.ref_mode,
        **({"ref_refresh": config.ref_refresh} if config.ref_refresh != "step" else {}),
        **({"kl_threshold": config.kl_threshold, "kl_probe_rows": config.kl_probe_rows}
           if config.ref_refresh == "kl" else {}),
        **({"sft_steps": config.sft_steps} if config.sft_steps else {}),
        "partition": str(Path(partition_dir).resolve()) if isinstance(partition_dir, (str, os.PathLike)) else None,
        "chunks": [len(c) for c in chunks],
        "manifest_created_at": (manifest or {}).get("created_at"),
        "seed": args.seed,
    }


def _reference_stats(config, score, policy, ref, eval_dataset) -> dict:
    """γ_ref and reward accuracy of M(t-1) on chunk t and on the held-out pairs."""
    stats: dict = {}
    if config.reference_stats:
        stats["chunk"] = margin_stats(*(ref.scores or score(policy, ref.train_dataset)))
    if eval_dataset is not None:
        stats["held_out"] = margin_stats(*score(policy, eval_dataset))
    return stats


def _step_trainer(t, policy, ref, mode, args, eval_dataset, tokenizer, callbacks, run, config, sft=False):
    """Step t's ``DPOTrainer``: policy and reference both M(t-1), a fresh optimizer and schedule; the packed
    forward unless ``config.packing`` is off. ``sft``: TRL's own ``loss_type='sft'`` (MixDPO's hardest chunks:
    the NLL of the chosen response, TRL's code; no DPO term, so the reference does not enter the loss)."""
    from .trainer import PackedStepwiseDPOTrainer, StepwiseDPOTrainer

    step_args = copy.deepcopy(args)
    step_args.output_dir = str(run.step_dir(t))
    step_args.seed = args.seed + t - 1
    if getattr(args, "data_seed", None) is not None:
        step_args.data_seed = args.data_seed + t - 1
    step_args.precompute_ref_log_probs = mode.precompute
    if sft:
        step_args.loss_type, step_args.loss_weights = ["sft"], None
    packed = ({"packed_batch_tokens": config.packed_batch_tokens, "packed_attention": config.packed_attention}
              if config.packing else {})
    trainer = (PackedStepwiseDPOTrainer if config.packing else StepwiseDPOTrainer)(
        **packed,
        model=policy,
        ref_model=ref.model,
        args=step_args,
        train_dataset=ref.train_dataset,
        eval_dataset=eval_dataset if step_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=mode.peft_config,
        callbacks=callbacks,
    )
    trainer.stepwise_step = t
    return trainer


def _can_reuse_scores(manifest, model_path, args, config) -> bool:
    """Whether the partition's scores are M0's reference log-probs under this run's settings."""
    scoring = (manifest or {}).get("scoring") or {}
    if not (config.reuse_partition_scores and model_path and scoring.get("model")):
        return False
    return scores_differ(scoring, model_path, args.max_length, args.truncation_mode, config.dtype) is None


def _trl_metrics(log_history: list[dict]) -> dict:
    """Mean of each TRL ``rewards/*``, ``logps/*`` and ``loss`` value logged during the step."""
    sums: dict[str, list[float]] = {}
    for entry in log_history:
        for k, v in entry.items():
            if (k.startswith(("rewards/", "logps/")) or k == "loss") and isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _flat_stats(stats: dict) -> dict:
    flat = {}
    for where, s in stats.items():
        flat[f"stepwise/gamma_ref_{where}"] = s["mean_margin"]
        flat[f"stepwise/reward_accuracy_ref_{where}"] = s["reward_accuracy"]
    return flat


def _rescore_remaining(score, policy, chunks, t) -> tuple[list, list[list[str]]]:
    """Re-order chunks t+1..T by M(t)'s margin (largest margin = easiest first), keeping the chunk sizes."""
    from datasets import concatenate_datasets

    rest = chunks[t:]
    pool = concatenate_datasets(rest)
    c, r = score(policy, pool)
    order = sorted(range(len(pool)), key=lambda i: -(c[i] - r[i]))
    new, start = list(chunks[:t]), 0
    for ch in rest:
        new.append(pool.select(order[start : start + len(ch)]))
        start += len(ch)
    return new, [list(ch[ROW_ID]) for ch in new[t:]]


def _apply_order(chunks, t, row_orders: list[list[str]]):
    """Re-create the recorded adaptive order of chunks t+1..T (resume of a rescored run)."""
    from datasets import concatenate_datasets

    pool = concatenate_datasets(chunks[t:])
    where = {rid: i for i, rid in enumerate(pool[ROW_ID])}
    return list(chunks[:t]) + [pool.select([where[r] for r in ids]) for ids in row_orders]
