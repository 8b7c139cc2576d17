"""Stepwise DPO (sDPO) driver: one fresh TRL ``DPOTrainer`` per curriculum chunk.

For step t = 1..T the policy *and* the reference both start from M(t-1) (M0 = the given SFT model); the step
trains on chunk t with a new optimizer and LR schedule (as in the paper) and saves M(t) to ``output_dir/step_t/``
with a completion marker written last (:mod:`trainer_plugin.run_folder`). A rerun of the same command resumes
after the last completed step; seeds are derived per step (``args.seed + t - 1``), so a resumed run ends equal
to an uninterrupted one. How the reference is held is the ``ref_mode`` (:mod:`trainer_plugin.ref_modes`).
Under ``torchrun`` / ``accelerate launch`` every process runs this driver (:mod:`trainer_plugin.distributed`:
the main process writes, the scoring passes are split by rows).

:func:`train_stepwise` is three parts: :meth:`_StepwiseRun.prepare` (inputs, checks, run folder, resume point,
reference schedule), :meth:`_StepwiseRun.step` (train chunk t, save M(t), record) and :meth:`_StepwiseRun.finish`
(the final records).
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

from scorers.compat import drop_trl_forward_patch, model_name_or_path
from sdpo_core.columns import ROW_ID
from sdpo_core.stats import margin_stats

from .config import StepwiseConfig, StepwiseInputError
from .distributed import Processes, check_saves_whole, processes_of, weights_are_sharded
from .inputs import check_tokenizer, ensure_tokens, load_chunks, load_held_out
from .ref_modes import LiveReference, reference_mode
from .ref_refresh import REFRESH_RULES, ReferenceSchedule, kl_probe
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
        callbacks: as ``DPOTrainer``'s (``TrainerCallback`` instances or classes), given to every step's trainer.
            An entry that is any other callable is called with each step's trainer once it is built and returns
            the ``TrainerCallback`` added to that trainer: how TRL's callbacks that take the trainer run here
            (``functools.partial(trl.LogCompletionsCallback, num_prompts=8)``). Such a callback is added after the
            trainer's ``__init__``: its ``on_init_end`` is not called, ``on_train_begin`` and the later events are.

    Raises:
        StepwiseInputError: bad partition (missing chunks, failed verification), tokenizer mismatch, or an output
            folder that belongs to another run; raised before any training starts.
    """
    config = config or StepwiseConfig()
    if ref_mode is not None:
        config = dataclasses.replace(config, ref_mode=ref_mode)
    run = _StepwiseRun.prepare(partition_dir, model, args, config, tokenizer, eval_dataset, peft_config, callbacks)
    for t in range(len(run.folder.completed) + 1, run.n_steps + 1):
        run.step(t)
    return run.finish()


@dataclasses.dataclass
class _StepwiseRun:
    """A stepwise run between its steps: the inputs, the reference mode, the run folder and the policy M(t)."""

    model: Any  # M0 as given: what M(t) is rebuilt from under sharded training
    model_path: str | os.PathLike | None
    args: Any
    config: StepwiseConfig
    procs: Processes
    tokenizer: Any
    chunks: list  # in training order (a resumed adaptive run's recorded order)
    eval_dataset: Any
    score: Callable  # (model, dataset) -> (chosen, rejected) summed log-probs, split over the processes
    mode: LiveReference
    folder: RunFolder
    n_steps: int
    policy: Any  # M(k) after k completed steps
    callbacks: list | None  # given to every step's trainer
    callback_makers: list  # called with each step's trainer: its own callback

    @classmethod
    def prepare(cls, partition_dir, model, args, config, tokenizer, eval_dataset, peft_config, callbacks):
        """Load and check the inputs, open the run folder and load M(k), k the steps it has completed.

        Raises:
            StepwiseInputError: see :func:`train_stepwise`; every check runs before a model is trained.
        """
        from scorers.models import load_tokenizer

        if getattr(args, "sync_ref_model", False):
            raise StepwiseInputError("sync_ref_model cannot be combined with the stepwise driver (it sets the "
                                     "reference)")
        procs = processes_of(args)
        chunks, manifest = load_chunks(partition_dir)
        n_steps = config.steps_for(len(chunks))  # the count options against the partition, before any model loads
        model_path = model if isinstance(model, (str, os.PathLike)) else None
        tokenizer = tokenizer or load_tokenizer(str(model_path) if model_path is not None
                                                else model_name_or_path(model.config))
        if config.check_tokenizer:
            check_tokenizer(tokenizer, chunks, manifest)
        chunks, eval_dataset = _tokenized(procs, chunks, eval_dataset, tokenizer, args, config)
        score = _scorer(procs, tokenizer, args, config)
        measures_kl = REFRESH_RULES[config.ref_refresh].measures_kl
        if measures_kl and (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)):
            raise StepwiseInputError("ref_refresh 'kl' measures the KL with whole models: not under FSDP / DeepSpeed")
        mode = reference_mode(config, score, _can_reuse_scores(manifest, model_path, args, config), peft_config)
        with procs.main_first():  # the main process checks and cleans the folder before the others read it
            folder = RunFolder(args.output_dir, _identity(config, partition_dir, chunks, manifest, args),
                               dataclasses.asdict(config), write=procs.is_main)
        procs.agree(folder.completed, "completed steps", folder.path)
        k = len(folder.completed)
        policy = _on_device(mode.load_policy(model, folder, k, config.dtype), args, config)  # M(k): after step k
        if config.ref_refresh != "step":  # the reference is some M(j), not always M(t-1): a schedule picks j
            mode.schedule = _schedule(config, model_path, folder, args, tokenizer, chunks)
        chunks = folder.resumed_order(chunks)  # an adaptive run's order after its completed steps
        shared, makers = _split_callbacks(callbacks)
        return cls(model, model_path, args, config, procs, tokenizer, chunks, eval_dataset, score, mode, folder,
                   n_steps, policy, shared, makers)

    def step(self, t: int) -> None:
        """Train M(t-1) on chunk t against the step's reference, save M(t) and complete the step's record."""
        config, chunk = self.config, self.chunks[t - 1]
        if self.procs.is_main:
            logger.info("stepwise step %d/%d: %d pairs (%s mode)", t, self.n_steps, len(chunk), self.mode.name)
        started = time.perf_counter()
        schedule = self.mode.schedule
        decision = schedule.decide(t, self.policy) if schedule is not None else {"reference_step": t - 1}
        ref = self.mode.reference(t, self.policy, chunk)  # sDPO: the reference of step t is M(t-1), the policy now
        record: dict = {"step": t, "chunk": t - 1, "rows": len(chunk), "ref_mode": self.mode.name, **decision,
                        "loss": "sft" if t > self.n_steps - config.sft_steps else "dpo",
                        "reference_source": ref.source, "ref_refresh_seconds": time.perf_counter() - started,
                        "reference": _reference_stats(config, self.score, self.policy, ref, self.eval_dataset)}

        trainer = _step_trainer(t, self.policy, ref, self.mode, self.args, self.eval_dataset, self.tokenizer,
                                self.callbacks, self.folder, config, sft=record["loss"] == "sft")
        check_saves_whole(trainer)
        record["rows_trained"] = len(trainer.train_dataset)
        if record["rows_trained"] != len(chunk) and self.procs.is_main:
            logger.warning("step %d: TRL dropped %d pair(s) whose prompt fills max_length=%s", t,
                           len(chunk) - record["rows_trained"], self.args.max_length)
        for make in self.callback_makers:
            trainer.add_callback(make(trainer))
        result = trainer.train()
        record.update(optimizer_steps=trainer.state.global_step, train_runtime=result.metrics.get("train_runtime"),
                      train_loss=result.metrics.get("train_loss"), trl=_trl_metrics(trainer.state.log_history))
        if self.procs.is_main:
            logger.info("step %d %s", t, json.dumps({"stepwise/step": t, **_flat_stats(record["reference"]),
                                                     **record["trl"]}))
        self._save_and_advance(t, trainer, ref)
        del trainer, ref
        gc.collect()

        if config.rescore_between_steps and t < len(self.chunks):
            self.chunks, orders = _rescore_remaining(self.score, self.policy, self.chunks, t)
            self.folder.record_order(t, orders)
            record["rescored_remaining"] = sum(len(o) for o in orders)
        self.folder.complete_step(t, record)

    def _save_and_advance(self, t: int, trainer, ref) -> None:
        """Save M(t) to ``step_t/`` (with the tokenizer; every process takes part, the main one writes) and make it
        the policy."""
        trainer.save_model(str(self.folder.step_dir(t)))
        if self.folder.write:
            self.mode.save_step(self.folder.step_dir(t), ref)
        if weights_are_sharded(trainer):  # FSDP / ZeRO-3: each process holds a shard; M(t) is read back whole
            self.procs.wait()
            m0 = _reload_base(self.model, self.mode)
            self.policy = _on_device(self.mode.load_policy(m0, self.folder, t, self.config.dtype), self.args,
                                     self.config)
        else:
            self.policy = self.mode.after_step(trainer)  # M(t)
        drop_trl_forward_patch(self.policy)

    def finish(self) -> list[dict]:
        """γ_ref of the last M(T) on the held-out pairs (when every step ran) and ``steps.json``'s final form."""
        final = {}
        if self.eval_dataset is not None and self.n_steps == len(self.folder.records):
            final["held_out"] = margin_stats(*self.score(self.policy, self.eval_dataset))
        self.folder.finish(final, self.mode.name)
        return self.folder.records


def _tokenized(procs, chunks, eval_dataset, tokenizer, args, config):
    """The chunks and the held-out pairs (``config.held_out`` when none are given) with TRL's token ids.

    Chunks of an unscored partition are tokenized here, once, as DPOTrainer would (dropping pairs whose prompt
    fills max_length): the reference scores, the rows each process scores and the rows TRL trains stay aligned.
    """
    with procs.main_first():
        chunks = [ensure_tokens(c, tokenizer, args.max_length, args.truncation_mode) for c in chunks]
    if eval_dataset is None and config.held_out:
        eval_dataset = load_held_out(config.held_out)
    if eval_dataset is not None:
        with procs.main_first():  # tokenizing may write a datasets cache file beside the held-out file
            eval_dataset = ensure_tokens(eval_dataset, tokenizer, args.max_length, args.truncation_mode)
    return chunks, eval_dataset


def _scorer(procs, tokenizer, args, config):
    """``score(model, dataset)``: the model's summed log-probs of chosen and rejected, as DPOTrainer's reference
    has them; each row is scored once, on one process, and every process gets all."""

    def score_rows(m, tokenized):
        return score_pairs(m, tokenized, max_length=args.max_length, truncation_mode=args.truncation_mode,
                           batch_tokens=config.score_batch_tokens, packed_attention=config.packed_attention)

    split_score = procs.split_scoring(score_rows)

    def score(m, dataset):
        # Tokenize (dropping, as DPOTrainer does, pairs whose prompt fills max_length) before the rows are split:
        # every process then splits the same kept rows, and the gathered scores stay aligned with them.
        return split_score(m, ensure_tokens(dataset, tokenizer, args.max_length, args.truncation_mode))

    return score


def _split_callbacks(callbacks) -> tuple[list | None, list]:
    """``callbacks`` as :func:`train_stepwise` takes them: ``(those every step's trainer is built with, the
    functions that make a callback for each step's trainer)``. A class is the trainer's to build, as DPOTrainer does."""
    from transformers import TrainerCallback

    def makes_one(c):
        return callable(c) and not isinstance(c, (type, TrainerCallback))

    if callbacks is None:
        return None, []
    return [c for c in callbacks if not makes_one(c)], [c for c in callbacks if makes_one(c)]


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


def _identity(config, partition_dir, chunks, manifest, args) -> dict:
    """What identifies a run: a rerun into the same folder must match it."""
    return {
        "ref_mode": config.ref_mode,
        **({"ref_refresh": config.ref_refresh} if config.ref_refresh != "step" else {}),
        **({"kl_threshold": config.kl_threshold, "kl_probe_rows": config.kl_probe_rows}
           if REFRESH_RULES[config.ref_refresh].measures_kl else {}),
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
