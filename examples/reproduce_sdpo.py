"""Does the curriculum help? The sDPO paper's comparisons (Kim et al. 2024, Tables 2-3, Figure 2), replicated.

M0 = the bundled SmolLM2-135M-Instruct; data = the bundled orca_dpo_pairs and LLaMA-Factory dpo_en_demo, one source
each. The pairs are split once, by ``split_seed``, into training pairs and held-out pairs that no arm trains on.
Every arm trains the same training pairs with the same ``DPOConfig`` (epochs, learning rate, β, batch); only how
the pairs are cut into steps differs (the ``arms`` of the config):

* ``dpo``: all pairs at once: a 1-chunk stepwise run, i.e. exactly one ``DPOTrainer`` with reference M0;
* ``sdpo_by_source``: one step per source, sources ordered by M0's reward accuracy (the paper's §3.2);
* ``sdpo_easy_to_hard_2`` / ``_3``: by each pair's M0 margin ``ref_margin``, easiest first, 2 and 3 steps;
* ``sdpo_random_2``: a random partition (the paper's ablation; a new one per seed);
* ``sdpo_hard_to_easy_2``: the reverse curriculum (a control).

Held-out metrics of every M(t) of every arm and seed (:func:`held_out_metrics`); results per (arm, seed) in
``OUTPUT/results/ARM/seed_S.json``, the summary in ``OUTPUT/summary.md`` / ``summary.json`` and two plots.

Usage (from the repository root; every run under the heavy-job lock on a shared machine)::

    python examples/reproduce_sdpo.py --config examples/configs/reproduce.yaml          # the full run
    python examples/reproduce_sdpo.py --config examples/configs/reproduce.yaml --quick  # a few minutes
    python examples/reproduce_sdpo.py --config examples/configs/reproduce.yaml --report # RESULTS.md + plots

Resumable: a rerun of the same command skips the finished (arm, seed) results and resumes an unfinished stepwise
run after its last completed step (``train_stepwise``'s own resume). Only public APIs of the package are used.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from partitioner.io import read_json, write_json
from partitioner.run import BUNDLED_DATA
from scorers.errors import ConfigError, UserError
from scorers.stats import margin_stats

logger = logging.getLogger("reproduce_sdpo")

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "reproduce.yaml"
BUNDLED_SOURCES = {"orca": str(BUNDLED_DATA / "orca_dpo_pairs.jsonl"),
                   "llamafactory_en": str(BUNDLED_DATA / "llamafactory_dpo_en_demo.json")}
DEFAULT_ARMS = {
    "dpo": {"order": "random", "chunks": 1},
    "sdpo_by_source": {"order": "by_source"},
    "sdpo_easy_to_hard_2": {"order": "easy_to_hard", "chunks": 2, "signal": "ref_margin"},
    "sdpo_easy_to_hard_3": {"order": "easy_to_hard", "chunks": 3, "signal": "ref_margin"},
    "sdpo_random_2": {"order": "random", "chunks": 2, "reseed": True},
    "sdpo_hard_to_easy_2": {"order": "hard_to_easy", "chunks": 2, "signal": "ref_margin"},
}
SIGNALS = ["ref_margin", "ref_margin_per_token"]
# Settings that change no number: a rerun may change them (more seeds or arms, keeping the models or not).
NOT_IDENTITY = ("output_dir", "seeds", "arms", "keep_models", "quick")


@dataclass
class ReproConfig:
    """The replication's settings (``examples/configs/reproduce.yaml``); the same for every arm."""

    output_dir: str = field(default="out/reproduce", metadata={"help": "Results folder (resumable)."})
    model: str = field(default="bundled", metadata={"help": "M0: path, hub id or 'bundled' (SmolLM2-135M)."})
    sources: dict | None = field(default=None, metadata={
        "help": "{source name: data file}; default: the bundled orca_dpo_pairs and dpo_en_demo."})
    max_length: int = field(default=256, metadata={"help": "DPOConfig.max_length of scoring, training, evaluation."})
    max_prompt_tokens: int = field(default=128, metadata={
        "help": "Only pairs whose prompt has at most this many tokens are used (room for the completions)."})
    train_per_source: int | None = field(default=36, metadata={
        "help": "Training pairs drawn from each source; null: every pair of the source that is not held out."})
    held_out_per_source: int = field(default=32, metadata={"help": "Held-out pairs drawn from each source."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/held-out split (made once)."})
    seeds: list = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "Training seeds: data order within chunks, the random partition, any random init."})
    arms: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_ARMS), metadata={
        "help": "{arm: PartitionConfig options}; 'reseed: true' draws the partition with the run's seed."})
    training: dict = field(default_factory=dict, metadata={"help": "DPOConfig options shared by every arm."})
    stepwise: dict = field(default_factory=lambda: {"ref_mode": "precomputed"}, metadata={
        "help": "StepwiseConfig options shared by every arm."})
    eval_batch_tokens: int = field(default=4096, metadata={"help": "Token budget per held-out scoring forward."})
    device: str | None = field(default=None, metadata={"help": "Device of the held-out evaluation (cpu default)."})
    driver_held_out: bool = field(default=False, metadata={
        "help": "Also give the held-out pairs to train_stepwise, which then logs γ_ref of every M(t) in "
                "steps.json (the harness evaluates every M(t) itself; this duplicates T+1 scoring passes)."})
    keep_models: bool = field(default=False, metadata={
        "help": "Keep every M(t)'s weights after its (arm, seed) result is written (540 MB each for SmolLM2)."})
    quick: dict = field(default_factory=dict, metadata={"help": "Overrides applied by --quick."})

    def __post_init__(self):
        self.sources = dict(self.sources or BUNDLED_SOURCES)
        if self.max_length < 8 or not 0 < self.max_prompt_tokens < self.max_length:
            raise ConfigError(f"need 8 <= max_length and 0 < max_prompt_tokens < max_length, got {self.max_length}, "
                              f"{self.max_prompt_tokens}")
        if (self.train_per_source is not None and self.train_per_source < 1) or self.held_out_per_source < 1:
            raise ConfigError("train_per_source and held_out_per_source must be >= 1")
        if not self.seeds or not self.arms:
            raise ConfigError("give at least one seed and one arm")
        for key in ("output_dir", "max_length", "seed"):
            if key in self.training:
                raise ConfigError(f"training.{key} is set by the harness; use the top-level option instead")

    @classmethod
    def from_yaml(cls, path, quick: bool = False, **overrides) -> ReproConfig:
        """The config of a YAML file (with its ``quick:`` overrides applied when ``quick``), then ``overrides``."""
        import yaml

        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
        if quick:
            for key, value in (raw.get("quick") or {}).items():
                raw[key] = {**raw.get(key, {}), **value} if key in ("training", "stepwise") else value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY}


# --------------------------------------------------------------------------------------------- held-out metrics
def held_out_metrics(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, beta: float) -> dict:
    """Held-out metrics of a model M from its summed log-probs, against the reference M0 (per pair arrays).

    * ``preference_accuracy``: share of pairs with log M(chosen) > log M(rejected) (summed over the completion);
      ``preference_accuracy_per_token`` the same on per-token means; ``gamma`` the mean margin (γ of M as a
      reference, the paper's Figure-2 quantity, via ``scorers.stats.margin_stats``);
    * ``reward_accuracy`` / ``reward_margin``: TRL's ``rewards/accuracies`` and ``rewards/margins`` with
      rewards β·(log M − log M0), i.e. the DPO implicit reward of M against M0;
    * ``dpo_loss``: TRL's sigmoid DPO loss against M0, mean over pairs (log 2 at M = M0);
    * ``drift_chosen`` (``_per_token``): mean log-ratio log M − log M0 on the chosen responses.
    """
    c, r, c0, r0 = (np.asarray(x, dtype=np.float64) for x in (chosen, rejected, ref_chosen, ref_rejected))
    ct, rt = (np.maximum(np.asarray(x, dtype=np.float64), 1.0) for x in (chosen_tokens, rejected_tokens))
    stats = margin_stats(c, r)
    chosen_rewards, rejected_rewards = beta * (c - c0), beta * (r - r0)
    delta = chosen_rewards - rejected_rewards
    return {
        "pairs": stats["pairs"],
        "preference_accuracy": stats["reward_accuracy"],
        "preference_accuracy_per_token": float((c / ct > r / rt).mean()),
        "gamma": stats["mean_margin"],
        "reward_accuracy": float((chosen_rewards > rejected_rewards).mean()),
        "reward_margin": float(delta.mean()),
        "dpo_loss": float(np.logaddexp(0.0, -delta).mean()),  # -log sigmoid(delta), stable
        "drift_chosen": float((c - c0).mean()),
        "drift_chosen_per_token": float(((c - c0) / ct).mean()),
    }


# ------------------------------------------------------------------------------------------------- data set-up
def make_split(cfg: ReproConfig, tokenizer) -> dict:
    """Per source: ``held_out_per_source`` held-out and ``train_per_source`` training row ids, drawn by
    ``split_seed`` among the pairs whose prompt fits ``max_prompt_tokens`` (ordered by row id first, so the split
    depends on the pairs, not on the file order). Held-out ids are drawn first: more or fewer training pairs never
    change the held-out set."""
    from partitioner import TokenizeConfig, load_preferences, tokenize_preferences

    loaded = load_preferences(cfg.sources, drop_duplicates=True)  # a duplicate could land in both splits
    kept, _ = tokenize_preferences(loaded, tokenizer, TokenizeConfig(cfg.max_length, cfg.training.get(
        "truncation_mode", "keep_start")))
    prompt_len = np.array([len(p) for p in kept["prompt_ids"]])
    split: dict = {"split_seed": cfg.split_seed, "held_out": {}, "train": {}, "candidates": {}}
    for src in sorted(cfg.sources):
        ids = sorted(rid for rid, s, n in zip(kept["row_id"], kept["source"], prompt_len)
                     if s == src and n <= cfg.max_prompt_tokens)
        need = cfg.held_out_per_source + (cfg.train_per_source or 1)
        if len(ids) < need:
            raise ConfigError(f"source {src!r} has {len(ids)} pairs with a prompt of at most {cfg.max_prompt_tokens} "
                              f"tokens; {need} needed (held_out_per_source + train_per_source)")
        perm = [ids[i] for i in np.random.default_rng(cfg.split_seed).permutation(len(ids))]
        split["held_out"][src] = perm[: cfg.held_out_per_source]
        split["train"][src] = perm[cfg.held_out_per_source:need if cfg.train_per_source else None]
        split["candidates"][src] = len(ids)
    split["_loaded"] = loaded  # not written: the rows, for scoring
    return split


def prepare(cfg: ReproConfig, out: Path) -> dict:
    """The split (``split.json``, made once) and M0's scores of the training and held-out pairs (resumable)."""
    from partitioner import ScoringConfig, read_scored, score_preferences
    from scorers.models import load_tokenizer

    started = time.perf_counter()
    split = make_split(cfg, load_tokenizer(cfg.model))
    loaded = split.pop("_loaded")
    split_file = out / "split.json"
    if split_file.exists() and read_json(split_file, "split") != split:
        raise UserError(f"{split_file} holds another split; use a new output_dir")
    write_json(split_file, split)
    index = {rid: i for i, rid in enumerate(loaded["row_id"])}
    scoring = ScoringConfig(model=cfg.model, max_length=cfg.max_length, signals=SIGNALS, progress=False,
                            truncation_mode=cfg.training.get("truncation_mode", "keep_start"), device=cfg.device)
    data = {}
    for part in ("train", "held_out"):
        rows = loaded.select([index[rid] for src in sorted(split[part]) for rid in split[part][src]])
        data[part] = read_scored(score_preferences(rows, out / "scored" / part, scoring))[0]
    logger.info("split: %s training and %s held-out pairs per source (%s candidates); M0 scored in %.0fs",
                cfg.train_per_source, cfg.held_out_per_source, split["candidates"], time.perf_counter() - started)
    data["setup_seconds"] = time.perf_counter() - started
    return data


def arm_partition(cfg: ReproConfig, out: Path, arm: str, seed: int) -> Path:
    """The arm's partition of the training pairs (made once: a stepwise run is tied to its partition)."""
    from partitioner import PartitionConfig, partition_preferences

    spec = dict(cfg.arms[arm])
    reseed, fixed_seed = spec.pop("reseed", False), spec.pop("seed", 0)
    folder = out / "partitions" / (f"{arm}-seed{seed}" if reseed else arm)
    if not (folder / "manifest.json").exists():
        partition_preferences(out / "scored" / "train", folder,
                              PartitionConfig(**spec, seed=seed if reseed else fixed_seed), progress=False)
    return folder


# ------------------------------------------------------------------------------------------------- one arm/seed
def dpo_args(cfg: ReproConfig, output_dir: Path, seed: int):
    from trl import DPOConfig

    base = {"bf16": False, "use_cpu": True, "gradient_checkpointing": False, "report_to": [],
            "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True}
    return DPOConfig(**{**base, **cfg.training, "output_dir": str(output_dir), "max_length": cfg.max_length,
                        "seed": seed})


def evaluate_step(cfg: ReproConfig, run_dir: Path, t: int, held) -> dict:
    """Held-out metrics of M(t) (cached in ``run_dir/held_out_step_t.json``)."""
    cache = run_dir / f"held_out_step_{t}.json"
    if cache.exists():
        return read_json(cache, "held-out metrics")
    from trainer_plugin.reference import score_pairs
    from trainer_plugin.run_folder import load_step_model

    model = load_step_model(run_dir, t, cfg.model, dtype="float32")  # every model evaluated in fp32, as M0 was
    if cfg.device:
        model.to(cfg.device)
    chosen, rejected = score_pairs(model, held, max_length=cfg.max_length, batch_tokens=cfg.eval_batch_tokens,
                                   truncation_mode=cfg.training.get("truncation_mode", "keep_start"))
    metrics = m0_relative(held, chosen, rejected, cfg.training.get("beta", 0.1))
    write_json(cache, metrics)
    return metrics


def m0_relative(held, chosen, rejected, beta: float) -> dict:
    return held_out_metrics(chosen, rejected, held["chosen_logps"], held["rejected_logps"], held["chosen_tokens"],
                            held["rejected_tokens"], beta)


def run_arm(cfg: ReproConfig, out: Path, arm: str, seed: int, data: dict, command: str) -> dict:
    """Train (or resume) one arm with one seed, evaluate every M(t) on the held-out pairs; returns its result."""
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    part = arm_partition(cfg, out, arm, seed)
    run_dir = out / "runs" / arm / f"seed_{seed}"
    held = data["held_out"]
    started = time.perf_counter()
    records = train_stepwise(part, cfg.model, args=dpo_args(cfg, run_dir, seed), config=StepwiseConfig(**cfg.stepwise),
                             eval_dataset=held if cfg.driver_held_out else None)
    trained = time.perf_counter()
    beta = cfg.training.get("beta", 0.1)
    models = [m0_relative(held, held["chosen_logps"], held["rejected_logps"], beta)]
    models += [evaluate_step(cfg, run_dir, t, held) for t in range(1, len(records) + 1)]
    return {
        "arm": arm, "seed": seed, "spec": cfg.arms[arm], "partition": str(part.relative_to(out)),
        "chunks": [r["rows"] for r in records], "optimizer_steps": [r.get("optimizer_steps") for r in records],
        "train_loss": [r.get("train_loss") for r in records],
        "reference_chunk": [(r.get("reference") or {}).get("chunk") for r in records],
        "driver_held_out": [(r.get("reference") or {}).get("held_out") for r in records],
        "models": models,  # M0, M1, ..., M(T) on the held-out pairs
        "final": models[-1],
        "train_seconds": trained - started, "eval_seconds": time.perf_counter() - trained,
        "command": command, "machine": machine(cfg),
    }


def drop_models(run_dir: Path) -> None:
    """Remove the M(t) weights of a finished (arm, seed); the records and metrics stay."""
    for weights in run_dir.glob("step_*/*.safetensors"):
        weights.unlink()


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
    return {"platform": platform.platform(), "processor": cpu,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__}


# ----------------------------------------------------------------------------------------------------- the run
def run(cfg: ReproConfig, command: str = "reproduce_sdpo.run(config) from Python") -> Path:
    """The whole replication into ``cfg.output_dir`` (resumable); returns the folder. Ends with the summary.

    ``command`` is recorded with the results (the command line, when run as a script).
    """
    from reproduce_report import write_summary

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    if config_file.exists() and read_json(config_file, "config")["identity"] != json.loads(json.dumps(cfg.identity())):
        raise UserError(f"{out} holds results of another configuration ({config_file}); use a new output_dir")
    write_json(config_file, {"identity": cfg.identity(), "seeds": cfg.seeds, "arms": cfg.arms})
    invocation = {"command": command, "started": time.time()}
    data = prepare(cfg, out)
    todo = [(seed, arm) for seed in cfg.seeds for arm in cfg.arms]
    for i, (seed, arm) in enumerate(todo, 1):
        result_file = out / "results" / arm / f"seed_{seed}.json"
        if result_file.exists():
            if read_json(result_file, "result")["spec"] != cfg.arms[arm]:
                raise UserError(f"{result_file} was made with another definition of arm {arm!r}")
            logger.info("[%d/%d] %s seed %d: done before, skipped", i, len(todo), arm, seed)
            continue
        logger.info("[%d/%d] %s seed %d: training", i, len(todo), arm, seed)
        result = run_arm(cfg, out, arm, seed, data, command)
        write_json(result_file, result)
        if not cfg.keep_models:
            drop_models(out / "runs" / arm / f"seed_{seed}")
        f = result["final"]
        logger.info("[%d/%d] %s seed %d: %.0fs train + %.0fs eval; held-out preference accuracy %.3f, γ %.2f -> "
                    "%.2f", i, len(todo), arm, seed, result["train_seconds"], result["eval_seconds"],
                    f["preference_accuracy"], result["models"][0]["gamma"], f["gamma"])
    invocation.update(finished=time.time(), setup_seconds=data["setup_seconds"])
    with open(out / "invocations.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(invocation) + "\n")
    write_summary(out)
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))  # reproduce_report beside this file
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s).")
    p.add_argument("--quick", action="store_true", help="Apply the config's quick: overrides (a few minutes).")
    p.add_argument("--output-dir", help="Results folder (overrides the config's).")
    p.add_argument("--seeds", help="Comma-separated seeds (overrides the config's).")
    p.add_argument("--arms", help="Comma-separated arm names, a subset of the config's.")
    p.add_argument("--report", nargs="?", const=str(HERE / "RESULTS.md"), metavar="RESULTS_MD",
                   help="Do not train: write the summary of the results folder, its tables into RESULTS_MD "
                        "(default examples/RESULTS.md) and its plots beside it.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = ReproConfig.from_yaml(a.config, quick=a.quick, output_dir=a.output_dir,
                                    seeds=[int(s) for s in a.seeds.split(",")] if a.seeds else None)
        if a.arms:
            missing = set(a.arms.split(",")) - set(cfg.arms)
            if missing:
                raise ConfigError(f"unknown arm(s) {', '.join(sorted(missing))}; the config has {', '.join(cfg.arms)}")
            cfg.arms = {k: v for k, v in cfg.arms.items() if k in a.arms.split(",")}
        if a.report:
            from reproduce_report import write_report

            write_report(Path(cfg.output_dir), Path(a.report))
        else:
            run(cfg, command=shlex.join(["python", *sys.argv]))
    except UserError as e:
        print(f"reproduce_sdpo: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
