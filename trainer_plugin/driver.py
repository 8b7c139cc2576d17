"""Stepwise DPO (sDPO) driver: one fresh TRL ``DPOTrainer`` per curriculum chunk.

For step t = 1..T the policy *and* the reference both start from M(t-1) (M0 = the given SFT model); the step
trains on chunk t with a new optimizer and LR schedule (as in the paper) and saves M(t) to
``output_dir/step_t/`` with a completion marker ``_COMPLETE`` written last. A rerun of the same command resumes
after the last completed step; seeds are derived per step (``args.seed + t - 1``), so a resumed run ends equal
to an uninterrupted one.

Reference modes (``StepwiseConfig.ref_mode``):
  * ``live``: a frozen deep copy of M(t-1) is passed to TRL as ``ref_model`` (TRL is never left to reload the
    original checkpoint from ``config._name_or_path``).
  * ``precomputed``: chunk t is scored with M(t-1) before the trainer is built and handed to TRL as
    ``ref_chosen_logps``/``ref_rejected_logps`` with ``precompute_ref_log_probs=True``; no reference model is in
    memory during training. The scores are kept in ``step_t/reference_logps.arrow``.
  * ``peft``: before step t the previous adapters are merged into the base (the merged model is M(t-1)) and a
    fresh LoRA adapter is trained on top; TRL's reference (adapter disabled) is then M(t-1), never the bare base.
    ``step_t/`` holds the adapter of step t; ``load_step_model`` rebuilds M(t).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from partitioner.schema import (
    CHOSEN_IDS,
    CHOSEN_LOGPS,
    PROMPT_IDS,
    REJECTED_IDS,
    REJECTED_LOGPS,
    ROW_ID,
    TRL_REF_CHOSEN,
    TRL_REF_REJECTED,
)

from .reference import frozen_copy, margin_stats, score_pairs

logger = logging.getLogger(__name__)

REF_MODES = ("live", "precomputed", "peft")
MARKER = "_COMPLETE"
STEPS_FILE = "steps.json"
RUN_FILE = "run.json"


class StepwiseInputError(ValueError):
    """The partition, model or output folder cannot be used for stepwise training (one-line message)."""


@dataclass
class StepwiseConfig:
    """Settings of the stepwise driver (the ``DPOConfig`` beside it configures each step's ``DPOTrainer``)."""

    partition_dir: str | None = field(
        default=None, metadata={"help": "Partition folder (chunk-*.arrow + manifest.json) from `sdpo partition`."}
    )
    model_name_or_path: str = field(
        default="bundled", metadata={"help": "The SFT model M0: a local folder, a hub id, or 'bundled' (SmolLM2)."}
    )
    ref_mode: str = field(
        default="live",
        metadata={"help": "Reference of step t = M(t-1): 'live' (frozen copy), 'precomputed' (scored before the "
                  "step, no reference in memory) or 'peft' (LoRA on the merged previous steps)."},
    )
    dtype: str = field(default="float32", metadata={"help": "dtype the model is loaded in (float32, bfloat16)."})
    steps: int | None = field(
        default=None, metadata={"help": "Train only the first N chunks (default: all of them)."}
    )
    score_batch_tokens: int = field(
        default=4096, metadata={"help": "Token budget per forward of the reference scoring passes."}
    )
    reference_stats: bool = field(
        default=True,
        metadata={"help": "Log mean γ_ref and reward accuracy of M(t-1) on chunk t (in 'live'/'peft' mode this "
                  "costs one extra forward pass over the chunk; 'precomputed' has it for free)."},
    )
    held_out: str | None = field(
        default=None,
        metadata={"help": "Held-out pairs (an Arrow stream file or a partition folder) on which γ_ref of every "
                  "M(t) is logged (the paper's Figure-2 quantity)."},
    )
    reuse_partition_scores: bool = field(
        default=True,
        metadata={"help": "'precomputed' step 1: reuse the partition's chosen/rejected log-probs when they were "
                  "scored by the same model, max_length, truncation mode and dtype."},
    )
    check_tokenizer: bool = field(
        default=True, metadata={"help": "Refuse a model whose tokenizer differs from the partition's."}
    )
    rescore_between_steps: bool = field(
        default=False,
        metadata={"help": "Adaptive curriculum: after step t re-score the remaining chunks with M(t) and re-order "
                  "them easy→hard (chunk sizes kept); the new order is recorded in run.json."},
    )
    lora_r: int = field(default=16, metadata={"help": "'peft' mode: LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "'peft' mode: LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "'peft' mode: LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "'peft' mode: module names to adapt (default: all linear except lm_head)."}
    )

    def __post_init__(self):
        if self.ref_mode not in REF_MODES:
            raise ValueError(f"ref_mode must be one of {', '.join(REF_MODES)}, got {self.ref_mode!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.score_batch_tokens < 1:
            raise ValueError(f"score_batch_tokens must be >= 1, got {self.score_batch_tokens}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")


def _stepwise_trainer_class():
    """``DPOTrainer`` subclass: keeps given ref log-prob columns, tags logs with ``stepwise/step``."""
    from trl import DPOTrainer

    def has_ref_columns(ds) -> bool:
        return ds is not None and TRL_REF_CHOSEN in getattr(ds, "column_names", ()) and TRL_REF_REJECTED in \
            ds.column_names

    class StepwiseDPOTrainer(DPOTrainer):
        stepwise_step: int | None = None

        def __init__(self, *args, **kwargs):
            import trl.trainer.dpo_trainer as dpo_module

            cfg = kwargs.get("args")
            given = (
                cfg is not None and cfg.precompute_ref_log_probs and has_ref_columns(kwargs.get("train_dataset"))
                and (kwargs.get("eval_dataset") is None or has_ref_columns(kwargs.get("eval_dataset")))
            )
            if not given:
                super().__init__(*args, **kwargs)
                return
            # TRL hashes every weight (~0.5 s for 135M) only to key its own precompute cache, which we bypass.
            original = dpo_module.hash_module
            dpo_module.hash_module = lambda module: "stepwise-given-ref-logps"
            try:
                super().__init__(*args, **kwargs)
            finally:
                dpo_module.hash_module = original

        def _precompute_ref_logps(self, dataset, name, batch_size):
            # TRL recomputes (with the policy) even when the columns exist; ours were scored with M(t-1).
            if has_ref_columns(dataset):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def log(self, logs, start_time=None):
            if self.stepwise_step is not None:
                logs = {**logs, "stepwise/step": self.stepwise_step}
            return super().log(logs, start_time)

    return StepwiseDPOTrainer


# ----------------------------------------------------------------------------------------------- inputs


def _load_chunks(partition) -> tuple[list, dict | None]:
    """Chunks in curriculum order and the manifest (None for a list of Datasets); all checks before training."""
    if not isinstance(partition, (str, os.PathLike)):
        chunks = list(partition)
        if not chunks:
            raise StepwiseInputError("no chunks given")
        return chunks, None
    path = Path(partition)
    if not (path / "manifest.json").is_file():
        raise StepwiseInputError(f"{path} is not a partition folder (no manifest.json); run `sdpo partition` first")
    from partitioner.shards import load_partition, read_manifest, verify_partition

    manifest = read_manifest(path)
    listed = manifest.get("chunks") or []
    if not listed:
        raise StepwiseInputError(f"partition {path} has no chunks in its manifest")
    missing = [c["file"] for c in listed if not (path / c["file"]).is_file()]
    if missing:
        raise StepwiseInputError(f"partition {path}: chunk file(s) missing: {', '.join(missing)}")
    try:
        verify_partition(path)
    except ValueError as e:
        raise StepwiseInputError(f"partition {path} fails verification: {str(e).splitlines()[0]}") from e
    return load_partition(path), manifest


def _chat_template_sha(tokenizer) -> str | None:
    import hashlib

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def check_tokenizer(tokenizer, chunks: list, manifest: dict | None, *, rows: int = 8) -> None:
    """Refuse a tokenizer that differs from the one the partition was scored with.

    Compares what the manifest recorded (chat template hash, vocab size when present), then re-tokenizes the first
    rows of chunk 1 and compares with the stored ``prompt_ids``/``chosen_ids``/``rejected_ids``.

    Raises:
        StepwiseInputError: one line naming both tokenizers.
    """
    from partitioner.tokenization import tokenize_row

    scored = ((manifest or {}).get("scoring") or {}).get("tokenizer") or {}
    name = scored.get("name_or_path", "the partition's tokenizer")
    ours = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    want_sha = scored.get("chat_template_sha256")
    have_sha = _chat_template_sha(tokenizer)
    if want_sha and have_sha and not (have_sha.startswith(want_sha) or want_sha.startswith(have_sha)):
        raise StepwiseInputError(
            f"tokenizer mismatch: the model's tokenizer {ours!r} has a different chat template than {name!r}, "
            "which scored the partition"
        )
    want_vocab = scored.get("vocab_size")
    if want_vocab is not None and int(want_vocab) != len(tokenizer):
        raise StepwiseInputError(
            f"tokenizer mismatch: the model's tokenizer {ours!r} has {len(tokenizer)} tokens, {name!r} had {want_vocab}"
        )
    first = chunks[0]
    if PROMPT_IDS not in first.column_names:
        return
    for row in first.select(range(min(rows, len(first)))):
        ids = tokenize_row(row, tokenizer)
        for col in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
            if list(ids[col]) != list(row[col]):
                raise StepwiseInputError(
                    f"tokenizer mismatch: the model's tokenizer {ours!r} tokenizes row {row.get(ROW_ID)} "
                    f"differently from {name!r}, which scored the partition"
                )


# ----------------------------------------------------------------------------------------------- state


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def completed_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps whose ``step_t/_COMPLETE`` marker exists, checked to be 1..k without gaps."""
    out = Path(output_dir)
    done = sorted(int(p.parent.name.split("_")[1]) for p in out.glob(f"step_*/{MARKER}"))
    if done != list(range(1, len(done) + 1)):
        raise StepwiseInputError(f"{out}: completed steps {done} are not 1..k; remove the stray step folders")
    return done


def load_step_model(output_dir, step: int, base_model: str, dtype: str = "float32"):
    """M(step) of a finished run: the saved model of that step, or (LoRA runs) base + merged adapters 1..step."""
    from scorers.models import load_causal_lm

    out = Path(output_dir)
    run = json.loads((out / RUN_FILE).read_text())
    if run["ref_mode"] != "peft":
        return load_causal_lm(str(out / f"step_{step}"), dtype=dtype)
    model = load_causal_lm(base_model, dtype=dtype)
    for s in range(1, step + 1):
        model = _merge_adapter(model, out / f"step_{s}")
    return model


def _merge_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def _unpatch_forward(model) -> None:
    """Drop TRL's per-instance fused-LM-head forward so the next trainer (or a deepcopy) starts clean."""
    model.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------------------------- steps


def _ensure_tokens(dataset, tokenizer, args):
    if PROMPT_IDS in dataset.column_names:
        return dataset
    from partitioner.tokenization import TokenizeConfig, tokenize_preferences

    kept, rejects = tokenize_preferences(dataset, tokenizer, TokenizeConfig(args.max_length, args.truncation_mode))
    if rejects:
        logger.warning("held-out set: %d pair(s) rejected by tokenization (prompt fills max_length)", len(rejects))
    return kept


def _score(model, dataset, tokenizer, args, config) -> tuple[list[float], list[float]]:
    return score_pairs(
        model,
        dataset,
        max_length=args.max_length,
        truncation_mode=args.truncation_mode,
        batch_tokens=config.score_batch_tokens,
    )


def _can_reuse_scores(manifest, model_path, args, config) -> bool:
    scoring = (manifest or {}).get("scoring") or {}
    tok = scoring.get("tokenizer") or {}
    if not (config.reuse_partition_scores and model_path and scoring.get("model")):
        return False
    from scorers.models import model_fingerprint

    same_model = model_fingerprint(model_path).get("content_hash") == scoring["model"].get("content_hash")
    return bool(
        same_model
        and tok.get("max_length") == args.max_length
        and tok.get("truncation_mode", "keep_start") == args.truncation_mode
        and scoring.get("dtype", "float32") == config.dtype
    )


def _trl_metrics(log_history: list[dict]) -> dict:
    """Mean of each TRL ``rewards/*``, ``logps/*`` and ``loss`` value logged during the step."""
    sums: dict[str, list[float]] = {}
    for entry in log_history:
        for k, v in entry.items():
            if (k.startswith(("rewards/", "logps/")) or k == "loss") and isinstance(v, (int, float)):
                sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _step_args(args, step: int, output_dir: Path, ref_mode: str):
    step_args = copy.deepcopy(args)
    step_args.output_dir = str(output_dir / f"step_{step}")
    step_args.seed = args.seed + step - 1
    if getattr(args, "data_seed", None) is not None:
        step_args.data_seed = args.data_seed + step - 1
    step_args.precompute_ref_log_probs = ref_mode == "precomputed"
    return step_args


def _rescore_remaining(policy, chunks, t, tokenizer, args, config) -> tuple[list, list[list[str]]]:
    """Re-order chunks t+1..T by M(t)'s margin (largest margin = easiest first), keeping the chunk sizes."""
    from datasets import concatenate_datasets

    rest = chunks[t:]
    if not rest:
        return chunks, []
    pool = concatenate_datasets(rest)
    c, r = _score(policy, pool, tokenizer, args, config)
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
    """Run stepwise DPO over a partition's chunks; returns the per-step summaries (also in ``steps.json``).

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
    import torch

    from scorers.models import load_causal_lm, load_tokenizer

    config = config or StepwiseConfig()
    if ref_mode is not None:
        config = dataclasses.replace(config, ref_mode=ref_mode)
    if getattr(args, "sync_ref_model", False):
        raise StepwiseInputError("sync_ref_model cannot be combined with the stepwise driver (it sets the reference)")
    out = Path(args.output_dir)
    chunks, manifest = _load_chunks(partition_dir)
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    if tokenizer is None:
        tok_src = str(model_path) if model_path is not None else model.config._name_or_path
        tokenizer = load_tokenizer(tok_src)
    if config.check_tokenizer:
        check_tokenizer(tokenizer, chunks, manifest)
    n_steps = len(chunks) if config.steps is None else min(config.steps, len(chunks))
    if eval_dataset is None and config.held_out:
        eval_dataset = _load_held_out(config.held_out)
    if eval_dataset is not None:
        eval_dataset = _ensure_tokens(eval_dataset, tokenizer, args)

    # Resume state: run.json identifies the run; steps with a marker are done.
    out.mkdir(parents=True, exist_ok=True)
    identity = {
        "ref_mode": config.ref_mode,
        "partition": str(Path(partition_dir).resolve()) if isinstance(partition_dir, (str, os.PathLike)) else None,
        "chunks": [len(c) for c in chunks],
        "manifest_created_at": (manifest or {}).get("created_at"),
        "seed": args.seed,
    }
    run_file = out / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    if run and {k: run.get(k) for k in identity} != identity:
        raise StepwiseInputError(f"{out} holds another stepwise run ({run_file}); use a new output_dir")
    run = {**identity, "rescored_orders": run.get("rescored_orders", {}), "config": asdict(config)}
    _write_json(run_file, run)
    done = completed_steps(out)
    for stray in out.glob("step_*"):
        if stray.is_dir() and not (stray / MARKER).exists():
            shutil.rmtree(stray)
    summaries = [json.loads((out / f"step_{s}" / MARKER).read_text()) for s in done]

    # M(k): the policy after the last completed step.
    dtype = getattr(torch, config.dtype)
    k = len(done)
    if model_path is not None:
        base = str(model_path)
        if k and config.ref_mode != "peft":
            policy = load_causal_lm(str(out / f"step_{k}"), dtype=config.dtype)
        else:
            policy = load_causal_lm(base, dtype=config.dtype)
    else:
        policy = model
        if k and config.ref_mode != "peft":
            from safetensors.torch import load_file

            policy.load_state_dict(load_file(str(out / f"step_{k}" / "model.safetensors")), strict=False)
    if config.ref_mode == "peft":
        for s in range(1, k + 1):
            policy = _merge_adapter(policy, out / f"step_{s}")
    if policy.dtype != dtype:
        policy.to(dtype)
    for t_str, orders in sorted(run["rescored_orders"].items(), key=lambda kv: int(kv[0])):
        if int(t_str) <= k:
            chunks = _apply_order(chunks, int(t_str), orders)

    if config.ref_mode == "peft" and peft_config is None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
    trainer_cls = _stepwise_trainer_class()

    for t in range(k + 1, n_steps + 1):
        chunk = chunks[t - 1]
        step_dir = out / f"step_{t}"
        record: dict = {"step": t, "chunk": t - 1, "rows": len(chunk), "ref_mode": config.ref_mode}
        logger.info("stepwise step %d/%d: %d pairs, reference = M(%d) (%s)", t, n_steps, len(chunk), t - 1,
                    config.ref_mode)

        # Reference of step t = M(t-1) = the policy as it is now.
        t0 = time.perf_counter()
        ref_model, ref_scores = None, None
        if config.ref_mode == "precomputed":
            chunk = _ensure_tokens(chunk, tokenizer, args)
            if t == 1 and CHOSEN_LOGPS in chunk.column_names and _can_reuse_scores(manifest, model_path, args, config):
                ref_scores = (list(chunk[CHOSEN_LOGPS]), list(chunk[REJECTED_LOGPS]))
                record["reference_source"] = "partition scores (same model M0)"
            else:
                ref_scores = _score(policy, chunk, tokenizer, args, config)
                record["reference_source"] = f"scored with M({t - 1})"
            chunk = _with_ref_columns(chunk, *ref_scores)
        elif config.ref_mode == "live":
            _unpatch_forward(policy)
            ref_model = frozen_copy(policy)
        record["ref_refresh_seconds"] = time.perf_counter() - t0

        stats: dict = {}
        if config.reference_stats:
            if ref_scores is None:
                ref_scores = _score(policy, _ensure_tokens(chunk, tokenizer, args), tokenizer, args, config)
            stats["chunk"] = margin_stats(*ref_scores)
        if eval_dataset is not None:
            stats["held_out"] = margin_stats(*_score(policy, eval_dataset, tokenizer, args, config))
        record["reference"] = stats

        step_args = _step_args(args, t, out, config.ref_mode)
        trainer = trainer_cls(
            model=policy,
            ref_model=ref_model,
            args=step_args,
            train_dataset=chunk,
            eval_dataset=eval_dataset if step_args.eval_strategy != "no" else None,
            processing_class=tokenizer,
            peft_config=peft_config if config.ref_mode == "peft" else None,
            callbacks=callbacks,
        )
        trainer.stepwise_step = t
        record["rows_trained"] = len(trainer.train_dataset)
        if record["rows_trained"] != len(chunk):
            logger.warning("step %d: TRL dropped %d pair(s) whose prompt fills max_length=%s", t,
                           len(chunk) - record["rows_trained"], step_args.max_length)
        if trainer_hook is not None:
            trainer_hook(t, trainer)
        result = trainer.train()
        record["optimizer_steps"] = trainer.state.global_step
        record["train_runtime"] = result.metrics.get("train_runtime")
        record["train_loss"] = result.metrics.get("train_loss")
        record["trl"] = _trl_metrics(trainer.state.log_history)
        logger.info("step %d %s", t, json.dumps({"stepwise/step": t, **_flat_stats(stats), **record["trl"]}))

        trained = trainer.accelerator.unwrap_model(trainer.model)
        trainer.save_model(str(step_dir))  # with the tokenizer (processing_class)
        if config.ref_mode == "precomputed":
            _save_reference_logps(step_dir / "reference_logps.arrow", chunk)
        if config.ref_mode == "peft":
            policy = trained.merge_and_unload()
        else:
            policy = trained
        _unpatch_forward(policy)
        del trainer, ref_model
        gc.collect()

        if config.rescore_between_steps and t < len(chunks):
            chunks, orders = _rescore_remaining(policy, chunks, t, tokenizer, args, config)
            run["rescored_orders"][str(t)] = orders
            _write_json(run_file, run)
            record["rescored_remaining"] = sum(len(o) for o in orders)
        _write_json(step_dir / MARKER, record)  # last: the step is complete
        summaries.append(record)
        _write_json(out / STEPS_FILE, {"steps": summaries})

    final: dict = {}
    if eval_dataset is not None and n_steps == len(summaries):
        final["held_out"] = margin_stats(*_score(policy, eval_dataset, tokenizer, args, config))
    _write_json(out / STEPS_FILE, {"steps": summaries, "final": final, "ref_mode": config.ref_mode})
    return summaries


def _flat_stats(stats: dict) -> dict:
    flat = {}
    for where, s in stats.items():
        flat[f"stepwise/gamma_ref_{where}"] = s["mean_margin"]
        flat[f"stepwise/reward_accuracy_ref_{where}"] = s["reward_accuracy"]
    return flat


def _with_ref_columns(chunk, chosen, rejected):
    for col in (TRL_REF_CHOSEN, TRL_REF_REJECTED):
        if col in chunk.column_names:
            chunk = chunk.remove_columns(col)
    return chunk.add_column(TRL_REF_CHOSEN, list(chosen)).add_column(TRL_REF_REJECTED, list(rejected))


def _save_reference_logps(path: Path, chunk) -> None:
    from partitioner.rejects import write_arrow_stream

    cols = [c for c in (ROW_ID, TRL_REF_CHOSEN, TRL_REF_REJECTED) if c in chunk.column_names]
    write_arrow_stream(chunk.select_columns(cols).data.table, path)


def _load_held_out(path: str):
    from datasets import Dataset, concatenate_datasets

    p = Path(path)
    if p.is_dir():
        if (p / "manifest.json").exists():
            from partitioner.shards import load_partition

            return concatenate_datasets(load_partition(p))
        raise StepwiseInputError(f"held-out folder {p} is not a partition (no manifest.json)")
    if not p.is_file():
        raise StepwiseInputError(f"held-out file does not exist: {p}")
    return Dataset.from_file(str(p))
