"""Does the curriculum help? The sDPO paper's comparisons (Kim et al. 2024), with cross-fitting and paired statistics.

M0 = the bundled SmolLM2-135M-Instruct; data = three real sources: the bundled orca_dpo_pairs and LLaMA-Factory
dpo_en_demo, and HH-RLHF harmless (``../shared/data``). A fixed sample of pairs per source is cut into ``folds``
folds, stratified by source; for every fold k, every arm trains a model on a fixed subsample of the *other* folds'
pairs (the same pairs for every arm) and is evaluated on fold k. So every sampled pair is held out exactly once per
repetition, and every arm is judged on the same rows: the comparisons are paired by row. A repetition is a new fold
assignment (its seed, also the training seed). The arms (fixed in the config, listed in ``examples/RESULTS.md``)
differ only in how the same training pairs are cut into steps and which reference each step uses.

Per held-out row the harness keeps the summed log-probs of chosen and rejected under M0 and under every arm's final
model; γ_ref (mean margin) of every intermediate M(t) on a fixed probe of each fold; and TruthfulQA MC1/MC2
(:mod:`sdpo_eval.truthfulqa`) of M0 and every final model, the questions cross-fitted over the folds the same way.
The per-row tables go to ``rows_dir`` (``examples/results/`` for the committed run; written by
``reproduce_rows.py``); ``--report`` rebuilds every number and plot of RESULTS.md from them
(``reproduce_report.py``), without training. The settings, and the seeded sample, folds and training pairs, are
``reproduce_design.py``'s.

Usage (from the repository root; under the heavy-job lock on a shared machine)::

    python examples/reproduce_sdpo.py --config examples/configs/reproduce.yaml          # the full run
    python examples/reproduce_sdpo.py --config examples/configs/reproduce.yaml --quick  # a few minutes
    python examples/reproduce_sdpo.py --config examples/configs/reproduce.yaml --report # RESULTS.md + plots

Resumable: a rerun of the same command skips finished (repetition, fold, arm) results and resumes an unfinished
stepwise run after its last completed step. Only public APIs of the package are used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from partitioner.io import read_json, write_json
from sdpo_core.errors import ConfigError, UserError

from reproduce_design import (DEFAULT_CONFIG, HERE, ReproConfig, assign_folds, draw_sample, question_folds,
                              training_ids, truthfulqa_questions)

logger = logging.getLogger("reproduce_sdpo")

SIGNALS = ["ref_margin", "ref_margin_per_token", "prompt_perplexity"]  # the last: 2D-Curri-DPO's complexity axis


# ------------------------------------------------------------------------------------------------- data set-up
def score_rows(cfg: ReproConfig, rows, folder: Path):
    """M0's scores of ``rows`` (a resumable scored folder), read back as a dataset."""
    from partitioner import ScoringConfig, read_scored, score_preferences

    scoring = ScoringConfig(model=cfg.model, max_length=cfg.max_length, signals=SIGNALS, progress=False,
                            truncation_mode=cfg.truncation_mode, device=cfg.device)
    return read_scored(score_preferences(rows, folder, scoring))[0]


# ------------------------------------------------------------------------------------------------- one model
def dpo_args(cfg: ReproConfig, output_dir: Path, seed: int, arm: str | None = None):
    """The arms' shared DPOConfig, with ``arm``'s own ``training:`` options (the pilot's learning rates) on top."""
    from trl import DPOConfig

    base = {"bf16": False, "use_cpu": True, "gradient_checkpointing": False, "report_to": [],
            "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True}
    own = cfg.arms[arm].get("training", {}) if arm else {}
    return DPOConfig(**{**base, **cfg.training, **own, "output_dir": str(output_dir), "max_length": cfg.max_length,
                        "seed": seed})


def model_scores(cfg: ReproConfig, model, rows) -> dict:
    """Summed log-probs of chosen and rejected under ``model`` (fp32, on ``cfg.device``), per row of ``rows``."""
    from trainer_plugin.reference import score_pairs

    chosen, rejected = score_pairs(model, rows, max_length=cfg.max_length, batch_tokens=cfg.eval_batch_tokens,
                                   truncation_mode=cfg.truncation_mode)
    return {"chosen_logps": [float(x) for x in chosen], "rejected_logps": [float(x) for x in rejected]}


def load_model(cfg: ReproConfig, run_dir: Path, t: int):
    from trainer_plugin.run_folder import load_step_model

    model = load_step_model(run_dir, t, cfg.model, dtype="float32")  # every model evaluated in fp32, as M0 was
    return model.to(cfg.device) if cfg.device else model


def arm_partition(cfg: ReproConfig, out: Path, scored_train: Path, rep: int, k: int, arm: str) -> Path:
    """The arm's partition of fold k's training pairs (made once: a stepwise run is tied to its partition).

    An arm with ``crossfit: {folds: K}`` first gets SelectiveDPO's cross-fitted difficulty of the training pairs
    (``trainer_plugin.selective``: K fold models trained on the other folds' pairs, with the arms' DPOConfig and the
    repetition's seed), as the column ``crossfit_dpo_loss`` its partition can order and filter by.
    """
    from partitioner import PartitionConfig, partition_preferences

    spec = {key: v for key, v in cfg.arms[arm].items() if key not in ("stepwise", "crossfit", "training")}
    reseed, fixed_seed = spec.pop("reseed", False), spec.pop("seed", 0)
    folder = out / "partitions" / f"rep{rep}" / f"fold{k}" / arm
    if not (folder / "manifest.json").exists():
        data = scored_train
        if "crossfit" in cfg.arms[arm]:
            data = crossfit_table(cfg, out, scored_train, rep, k, arm)
        partition_preferences(data, folder, PartitionConfig(**spec, seed=rep if reseed else fixed_seed),
                              progress=False)
    return folder


def crossfit_table(cfg: ReproConfig, out: Path, scored_train: Path, rep: int, k: int, arm: str):
    """Fold k's scored training pairs with their cross-fitted DPO loss (resumable under ``out/crossfit``)."""
    from partitioner import read_scored
    from trainer_plugin.selective import CrossFitConfig, cross_fitted_difficulty

    crossfit = CrossFitConfig(**{"fold_seed": rep, **cfg.arms[arm]["crossfit"]})
    work = out / "crossfit" / f"rep{rep}" / f"fold{k}" / arm
    return cross_fitted_difficulty(read_scored(scored_train)[0], cfg.model, args=dpo_args(cfg, work, rep, arm),
                                   work_dir=work, crossfit=crossfit)


def run_model(cfg: ReproConfig, out: Path, rep: int, k: int, arm: str, data: dict, command: str) -> dict:
    """Train (or resume) one arm on fold k's training pairs, then evaluate it on fold k; returns its result."""
    from sdpo_eval.truthfulqa import score_truthfulqa
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    part = arm_partition(cfg, out, data["scored_train"][k], rep, k, arm)
    run_dir = out / "runs" / f"rep{rep}" / f"fold{k}" / arm
    started = time.perf_counter()
    stepwise = StepwiseConfig(**{**cfg.stepwise, **cfg.arms[arm].get("stepwise", {})})
    records = train_stepwise(part, cfg.model, args=dpo_args(cfg, run_dir, rep, arm), config=stepwise)
    trained = time.perf_counter()
    held, probe = data["held"][k], data["probe"][k]
    probe_scores = []
    for t in range(1, len(records)):  # intermediate models: the probe only; the final model: the whole fold
        probe_scores.append(model_scores(cfg, load_model(cfg, run_dir, t), probe))
    final = load_model(cfg, run_dir, len(records))
    scores = model_scores(cfg, final, held)
    evaluated = time.perf_counter()
    questions = [q for q, f in zip(data["questions"], data["question_folds"]) if f == k]
    tqa = [{key: r[key] for key in ("index", "mc1", "mc2")} for r in score_truthfulqa(
        final, questions, tokenizer=data["tokenizer"], batch_tokens=cfg.eval_batch_tokens)] if questions else []
    del final
    done = time.perf_counter()
    return {
        "repetition": rep, "fold": k, "arm": arm, "spec": cfg.arms[arm], "partition": str(part.relative_to(out)),
        "chunks": [r["rows"] for r in records], "optimizer_steps": [r.get("optimizer_steps") for r in records],
        "train_loss": [r.get("train_loss") for r in records],
        "reference_source": [r.get("reference_source") for r in records],
        "reference_step": [r.get("reference_step") for r in records],
        "kl_to_reference": [r.get("kl_to_reference") for r in records],
        "step_loss": [r.get("loss", "dpo") for r in records],
        **crossfit_cost(out, rep, k, arm),
        "row_id": list(held["row_id"]), **scores,
        "probe_row_id": list(probe["row_id"]), "probe_scores": probe_scores,
        "truthfulqa": tqa,
        "train_pairs": sum(r["rows"] for r in records), "eval_rows": len(held) + len(probe) * (len(records) - 1),
        "train_seconds": trained - started, "eval_seconds": evaluated - trained, "truthfulqa_seconds": done - evaluated,
        "command": command,
    }


def crossfit_cost(out: Path, rep: int, k: int, arm: str) -> dict:
    """The cross-fitting's training time of a SelectiveDPO arm (``{}`` for the others)."""
    record = out / "crossfit" / f"rep{rep}" / f"fold{k}" / arm / "crossfit.json"
    return {"crossfit_seconds": read_json(record, "cross-fit record")["train_seconds"]} if record.exists() else {}


# ----------------------------------------------------------------------------------------------------- the run
def prepare(cfg: ReproConfig, out: Path) -> dict:
    """The sample, M0's scores and TruthfulQA answers (once), and every repetition's folds and training sets."""
    from sdpo_eval.truthfulqa import score_truthfulqa
    from scorers.models import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    sample, loaded = draw_sample(cfg, tokenizer)
    sample_file = out / "sample.json"
    if sample_file.exists() and read_json(sample_file, "sample") != sample:
        raise UserError(f"{sample_file} holds another sample; use a new output_dir")
    write_json(sample_file, sample)
    index = {rid: i for i, rid in enumerate(loaded["row_id"])}
    ordered = [rid for src in sorted(sample) for rid in sample[src]]
    m0 = score_rows(cfg, loaded.select([index[r] for r in ordered]), out / "scored" / "sample")
    scored_seconds = time.perf_counter() - started
    questions = truthfulqa_questions(cfg)
    m0_tqa_file = out / "m0_truthfulqa.json"
    if questions and not m0_tqa_file.exists():
        t0 = time.perf_counter()
        answers = [{key: r[key] for key in ("index", "mc1", "mc2")} for r in score_truthfulqa(
            cfg.model, questions, tokenizer=tokenizer, batch_tokens=cfg.eval_batch_tokens, device=cfg.device)]
        write_json(m0_tqa_file, {"answers": answers, "seconds": time.perf_counter() - t0})
    return {"tokenizer": tokenizer, "sample": sample, "loaded": loaded, "index": index, "m0": m0,
            "m0_truthfulqa": read_json(m0_tqa_file, "M0 TruthfulQA")["answers"] if questions else [],
            "questions": questions, "m0_scoring_seconds": scored_seconds}


def prepare_repetition(cfg: ReproConfig, out: Path, rep: int, data: dict) -> dict:
    fold_of = assign_folds(data["sample"], cfg.folds, rep)
    m0 = data["m0"]
    m0_index = {rid: i for i, rid in enumerate(m0["row_id"])}
    rep_data = {"fold_of": fold_of, "held": {}, "probe": {}, "scored_train": {}, "questions": data["questions"],
                "question_folds": question_folds(len(data["questions"]), cfg.folds, rep),
                "tokenizer": data["tokenizer"]}
    for k in cfg.folds_run():
        held_ids = [rid for rid in m0["row_id"] if fold_of[rid] == k]
        rep_data["held"][k] = m0.select([m0_index[r] for r in held_ids])
        probe = np.random.default_rng([rep, k, 99]).permutation(len(held_ids))[: cfg.gamma_probe_per_fold]
        rep_data["probe"][k] = rep_data["held"][k].select(sorted(int(i) for i in probe))
        train = training_ids(data["sample"], fold_of, k, cfg.train_per_source, rep, cfg.train_sources)
        folder = out / "scored" / f"rep{rep}_fold{k}_train"
        rows = data["loaded"].select([data["index"][r] for r in train])
        score_rows(cfg, rows, folder)
        rep_data["scored_train"][k] = folder
    return rep_data


def machine(cfg: ReproConfig) -> dict:
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"platform": platform.platform(), "processor": cpu, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def drop_models(run_dir: Path) -> None:
    """Remove the M(t) weights of a finished model; the records stay."""
    for weights in run_dir.glob("step_*/*.safetensors"):
        weights.unlink()


def run(cfg: ReproConfig, command: str = "reproduce_sdpo.run(config) from Python") -> Path:
    """The whole replication into ``cfg.output_dir`` (resumable), then its per-row tables into ``rows_dir``."""
    from reproduce_rows import export_rows

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    identity = json.loads(json.dumps(cfg.identity()))
    if config_file.exists() and read_json(config_file, "config")["identity"] != identity:
        raise UserError(f"{out} holds results of another configuration ({config_file}); use a new output_dir")
    write_json(config_file, {"identity": identity, "repetitions": cfg.repetitions, "arms": cfg.arms,
                             "analysis": cfg.analysis()})
    invocation = {"command": command, "started": time.time()}
    data = prepare(cfg, out)
    todo = [(rep, k, arm) for rep in cfg.repetitions for k in cfg.folds_run() for arm in cfg.arms]
    rep_data: dict = {}
    for i, (rep, k, arm) in enumerate(todo, 1):
        result_file = out / "results" / f"rep{rep}" / f"fold{k}" / f"{arm}.json"
        if result_file.exists():
            if read_json(result_file, "result")["spec"] != cfg.arms[arm]:
                raise UserError(f"{result_file} was made with another definition of arm {arm!r}")
            continue
        if rep not in rep_data:
            rep_data = {rep: prepare_repetition(cfg, out, rep, data)}
        logger.info("[%d/%d] repetition %d fold %d %s: training", i, len(todo), rep, k, arm)
        result = run_model(cfg, out, rep, k, arm, rep_data[rep], command)
        result["machine"] = machine(cfg)
        write_json(result_file, result)
        if not cfg.keep_models:
            drop_models(out / "runs" / f"rep{rep}" / f"fold{k}" / arm)
        logger.info("[%d/%d] repetition %d fold %d %s: %.0fs train (%d pairs) + %.0fs eval (%d rows) + %.0fs "
                    "TruthfulQA", i, len(todo), rep, k, arm, result["train_seconds"], result["train_pairs"],
                    result["eval_seconds"], result["eval_rows"], result["truthfulqa_seconds"])
    invocation.update(finished=time.time(), m0_scoring_seconds=data["m0_scoring_seconds"])
    with open(out / "invocations.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(invocation) + "\n")
    export_rows(out, Path(cfg.rows_dir or out / "rows"), cfg, data, machine(cfg))
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))  # reproduce_report and reproduce_rows beside this file
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s).")
    p.add_argument("--quick", action="store_true", help="Apply the config's quick: overrides (a few minutes).")
    p.add_argument("--pilot", action="store_true", help="Apply the config's pilot: overrides (the learning-rate "
                                                          "pilot, run before the replication).")
    p.add_argument("--output-dir", help="Work folder (overrides the config's).")
    p.add_argument("--rows-dir", help="Per-row tables folder (overrides the config's).")
    p.add_argument("--repetitions", help="Comma-separated repetition seeds (overrides the config's).")
    p.add_argument("--arms", help="Comma-separated arm names, a subset of the config's.")
    p.add_argument("--report", nargs="?", const=str(HERE / "RESULTS.md"), metavar="RESULTS_MD",
                   help="Do not train: rebuild the tables and plots of RESULTS_MD (default examples/RESULTS.md) from "
                        "the per-row tables in rows_dir.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = ReproConfig.from_yaml(a.config, quick=a.quick, pilot=a.pilot, output_dir=a.output_dir, rows_dir=a.rows_dir,
                                    repetitions=[int(s) for s in a.repetitions.split(",")] if a.repetitions else None)
        if a.arms:
            missing = set(a.arms.split(",")) - set(cfg.arms)
            if missing:
                raise ConfigError(f"unknown arm(s) {', '.join(sorted(missing))}; the config has {', '.join(cfg.arms)}")
            cfg.arms = {k: v for k, v in cfg.arms.items() if k in a.arms.split(",")}
        if a.report:
            from reproduce_report import write_report

            write_report(Path(cfg.rows_dir or Path(cfg.output_dir) / "rows"), Path(a.report))
        else:
            run(cfg, command=shlex.join(["python", *sys.argv]))
    except UserError as e:
        print(f"reproduce_sdpo: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
