"""The replication's design: its settings (:class:`ReproConfig`, ``examples/configs/reproduce.yaml``) and the
seeded draws that fix which pairs and questions each model sees, before any model is loaded or trained.

* :func:`draw_sample`: the cross-fitted sample, per source, among the pairs whose prompt fits ``max_prompt_tokens``;
* :func:`assign_folds`: a repetition's fold of every sampled pair, stratified by source;
* :func:`training_ids`: fold k's training pairs, drawn from the other folds (the same for every arm);
* :func:`question_folds`, :func:`truthfulqa_questions`: the TruthfulQA questions and their folds.

Every draw depends only on its seeds and the data, so a rerun (or another arm) sees the same rows. Scoring,
training and evaluation are in ``reproduce_sdpo.py``, which imports these from here (and re-exports them).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from partitioner.io import sha256_file
from partitioner.run import BUNDLED_DATA
from sdpo_core.config import check_ranges
from sdpo_core.errors import ConfigError

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[1] / "shared" / "data"
DEFAULT_CONFIG = HERE / "configs" / "reproduce.yaml"
DEFAULT_SOURCES = {"orca": str(BUNDLED_DATA / "orca_dpo_pairs.jsonl"),
                   "llamafactory_en": str(BUNDLED_DATA / "llamafactory_dpo_en_demo.json"),
                   "hh_harmless": str(SHARED_DATA / "hh_rlhf_harmless" / "test.jsonl.gz")}
DEFAULT_TRUTHFULQA = str(SHARED_DATA / "truthfulqa" / "TruthfulQA.csv")
# Settings that change no number: a rerun may change them (more repetitions or arms, keeping the models or not).
NOT_IDENTITY = ("output_dir", "rows_dir", "repetitions", "arms", "keep_models", "quick", "pilot", "comparisons",
                "bootstrap", "pilot_rule", "primary_sources", "run_folds")
# What the report needs beside the identity (recorded in config.json as "analysis").
ANALYSIS = ("comparisons", "bootstrap", "pilot_rule", "primary_sources", "train_sources")


@dataclass
class ReproConfig:
    """The replication's settings (``examples/configs/reproduce.yaml``); the same for every arm."""

    output_dir: str = field(default="out/reproduce", metadata={"help": "Work folder (resumable)."})
    rows_dir: str | None = field(default=None, metadata={
        "help": "Folder of the per-row result tables (default OUTPUT_DIR/rows); --report reads them."})
    model: str = field(default="bundled", metadata={"help": "M0: path, hub id or 'bundled' (SmolLM2-135M)."})
    sources: dict | None = field(default=None, metadata={
        "help": "{source name: data file}; default: bundled orca_dpo_pairs and dpo_en_demo, shared HH harmless."})
    max_length: int = field(default=256, metadata={
        "help": "DPOConfig.max_length of scoring, training, evaluation.", "min": 8})
    max_prompt_tokens: int = field(default=128, metadata={
        "help": "Only pairs whose prompt has at most this many tokens are used (room for the completions; less than "
                "max_length).", "min": 1})
    sample_per_source: dict = field(default_factory=dict, metadata={
        "help": "{source: pairs in the cross-fitted sample}; a source not named: every eligible pair."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the sample (drawn once)."})
    folds: int = field(default=2, metadata={"help": "K: folds of the sample, stratified by source.", "min": 2})
    repetitions: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "One seed per repetition: its fold assignment, training subsamples and training seed."})
    train_per_source: int = field(default=40, metadata={
        "help": "Training pairs per source of each fold's models, drawn from the other folds (same for all arms).",
        "min": 1})
    train_sources: list[str] | None = field(default=None, metadata={
        "help": "Sources the models train on (default: every source); the others are only held out."})
    run_folds: list[int] | None = field(default=None, metadata={
        "help": "Folds whose models are trained and evaluated (default: all; the pilot runs one)."})
    gamma_probe_per_fold: int = field(default=96, metadata={
        "help": "Held-out rows of each fold on which γ_ref of every intermediate M(t) is measured.", "min": 1})
    truthfulqa: str | None = field(default=DEFAULT_TRUTHFULQA, metadata={"help": "TruthfulQA.csv; null: skip."})
    truthfulqa_questions: int | None = field(default=None, metadata={
        "help": "A fixed random subset of this many questions (truthfulqa_seed); null: all 817.", "min": 1})
    truthfulqa_seed: int = field(default=0, metadata={"help": "Seed of the TruthfulQA subset."})
    arms: dict = field(default_factory=dict, metadata={
        "help": "{arm: PartitionConfig options}; 'reseed: true' draws the partition with the repetition's seed; "
                "'stepwise: {...}' StepwiseConfig options and 'training: {...}' DPOConfig options of this arm only."})
    comparisons: dict = field(default_factory=dict, metadata={
        "help": "{family: {metrics: [...], strata: [...], pairs: ['A - B', ...]}}: every planned comparison, fixed "
                "before the run; each family is Holm-corrected on its own (reproduce_report.py)."})
    primary_sources: list[str] | None = field(default=None, metadata={
        "help": "Sources of the primary stratum, equally weighted (default: the training sources)."})
    bootstrap: dict = field(default_factory=lambda: {"resamples": 100000, "seed": 0}, metadata={
        "help": "Cluster bootstrap of the report: resamples and seed (recorded with the results)."})
    pilot_rule: dict = field(default_factory=dict, metadata={
        "help": "The pilot's choice rule (thresholds on the pilot arms' held-out metrics), written before the pilot."})
    training: dict = field(default_factory=dict, metadata={"help": "DPOConfig options shared by every arm."})
    stepwise: dict = field(default_factory=lambda: {"ref_mode": "precomputed"}, metadata={
        "help": "StepwiseConfig options shared by every arm."})
    eval_batch_tokens: int = field(default=4096, metadata={"help": "Token budget per evaluation forward.", "min": 1})
    device: str | None = field(default=None, metadata={"help": "Device of scoring and evaluation (cpu default)."})
    keep_models: bool = field(default=False, metadata={
        "help": "Keep every M(t)'s weights after its result is written (540 MB each for SmolLM2)."})
    quick: dict = field(default_factory=dict, metadata={"help": "Overrides applied by --quick."})
    pilot: dict = field(default_factory=dict, metadata={
        "help": "Overrides applied by --pilot: the learning-rate pilot's arms, repetition and fold."})

    def __post_init__(self):
        self.sources = dict(self.sources or DEFAULT_SOURCES)
        check_ranges(self)  # each option's declared minimum, as the product's configs check theirs
        if self.max_prompt_tokens >= self.max_length:
            raise ConfigError(f"max_prompt_tokens must be less than max_length, got {self.max_prompt_tokens} and "
                              f"{self.max_length}")
        if not self.repetitions or not self.arms:
            raise ConfigError("give at least one repetition and one arm")
        unknown = set(self.sample_per_source) - set(self.sources)
        if unknown:
            raise ConfigError(f"sample_per_source names unknown source(s) {', '.join(sorted(unknown))}")
        for key in ("output_dir", "max_length", "seed"):
            if key in self.training or any(key in (a.get("training") or {}) for a in self.arms.values()):
                raise ConfigError(f"training.{key} is set by the harness; use the top-level option instead")
        self.train_sources = sorted(self.train_sources or self.sources)
        self.primary_sources = sorted(self.primary_sources or self.train_sources)
        unknown = (set(self.train_sources) | set(self.primary_sources)) - set(self.sources)
        if unknown:
            raise ConfigError(f"train_sources/primary_sources name unknown source(s) {', '.join(sorted(unknown))}")
        if self.run_folds is not None and not set(self.run_folds) <= set(range(self.folds)):
            raise ConfigError(f"run_folds must be among 0..{self.folds - 1}, got {self.run_folds}")
        for name, fam in self.comparisons.items():
            for pair in fam.get("pairs", []):
                a, _, b = (x.strip() for x in str(pair).partition(" - "))
                if not a or not b:
                    raise ConfigError(f"comparison {pair!r} of family {name!r} is not 'A - B'")

    @classmethod
    def from_yaml(cls, path, quick: bool = False, pilot: bool = False, **overrides) -> ReproConfig:
        """The config of a YAML file (with its ``pilot:`` then ``quick:`` overrides applied when asked), then
        ``overrides``, read as ``sdpo --config`` reads a file (:func:`sdpo_cli.config_file.load_config`: bounded
        size, a repeated key refused, an unknown option refused) and every value converted by its field's type
        (:func:`sdpo_cli.options.converter`), the blocks' values too.

        Raises:
            ConfigError: an unknown option, a value of the wrong type or range, or an option given twice (one line).
        """
        import typing

        from sdpo_cli.config_file import load_config
        from sdpo_cli.options import converter

        hints = typing.get_type_hints(cls)
        converters = {f.name: converter(hints[f.name], f.name) for f in dataclasses.fields(cls)}
        raw = load_config(str(path), converters)
        for block, wanted in (("pilot", pilot), ("quick", quick)):
            for key, value in (raw.get(block) or {}).items() if wanted else ():
                if key not in converters:
                    raise ConfigError(f"unknown option {key!r} in the {block}: block of {path}")
                value = converters[key](value)
                raw[key] = {**raw.get(key, {}), **value} if key in ("training", "stepwise") else value
        raw.update({k: converters[k](v) for k, v in overrides.items() if v is not None})
        return cls(**raw)

    def folds_run(self) -> list[int]:
        return sorted(self.run_folds) if self.run_folds is not None else list(range(self.folds))

    def identity(self) -> dict:
        """The settings that fix every number of a run, its data named by content (:func:`content_fingerprint`):
        the same configuration run from another checkout or data folder is the same run."""
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY}
        ident["sources"] = {name: content_fingerprint(spec) for name, spec in self.sources.items()}
        if self.truthfulqa is not None:
            ident["truthfulqa"] = content_fingerprint(self.truthfulqa)
        return ident

    def analysis(self) -> dict:
        return {k: getattr(self, k) for k in ANALYSIS}

    @property
    def beta(self) -> float:
        return float(self.training.get("beta", 0.1))

    @property
    def truncation_mode(self) -> str:
        return self.training.get("truncation_mode", "keep_start")


def content_fingerprint(spec):
    """``sha256:<hex>`` of a local file's bytes (of a local folder: of its files' relative paths and contents, in
    sorted order); a list of them for a list; anything else (a hub id, a glob) as given."""
    if isinstance(spec, (list, tuple)):
        return [content_fingerprint(s) for s in spec]
    path = Path(spec)
    if path.is_file():
        return "sha256:" + sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(q for q in path.rglob("*") if q.is_file()):
            digest.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
        return "sha256:" + digest.hexdigest()
    return spec


# ------------------------------------------------------------------------------------------------- data set-up
def draw_sample(cfg: ReproConfig, tokenizer) -> tuple[dict, object]:
    """``({source: sorted sampled row ids}, loaded rows)``: per source ``sample_per_source`` pairs (or all) among
    those whose prompt fits ``max_prompt_tokens``, drawn by ``sample_seed`` from the row ids in sorted order."""
    from partitioner import TokenizeConfig, load_preferences, tokenize_preferences

    loaded = load_preferences(cfg.sources, drop_duplicates=True)  # a duplicate could be trained on and held out
    kept, _ = tokenize_preferences(loaded, tokenizer, TokenizeConfig(cfg.max_length, cfg.truncation_mode))
    prompt_len = np.array([len(p) for p in kept["prompt_ids"]])
    sample = {}
    for src in sorted(cfg.sources):
        ids = sorted(rid for rid, s, n in zip(kept["row_id"], kept["source"], prompt_len)
                     if s == src and n <= cfg.max_prompt_tokens)
        want = cfg.sample_per_source.get(src, len(ids))
        if len(ids) < want:
            raise ConfigError(f"source {src!r} has {len(ids)} pairs with a prompt of at most {cfg.max_prompt_tokens} "
                              f"tokens; sample_per_source asks for {want}")
        pick = np.random.default_rng(cfg.sample_seed).permutation(len(ids))[:want]
        sample[src] = sorted(ids[i] for i in pick)
    return sample, loaded


def assign_folds(sample: dict, folds: int, rep: int) -> dict:
    """``{row_id: fold}``: the library's source-stratified fold assignment
    (:func:`trainer_plugin.selective.crossfit_folds`, seeded by the repetition): within each source a seeded
    permutation of its row ids dealt round-robin (folds differ by <= 1 row)."""
    from trainer_plugin.selective import crossfit_folds

    ids = [rid for src in sorted(sample) for rid in sample[src]]
    sources = [src for src in sorted(sample) for _ in sample[src]]
    return dict(zip(ids, crossfit_folds(ids, sources, folds, rep)))


def training_ids(sample: dict, fold_of: dict, k: int, per_source: int, rep: int, sources=None) -> list[str]:
    """Fold k's training pairs: ``per_source`` per source of ``sources`` (default all) from the other folds (seeded;
    the same for every arm)."""
    out = []
    for i, src in enumerate(sorted(sample)):
        if sources is not None and src not in sources:
            continue
        pool = [rid for rid in sample[src] if fold_of[rid] != k]
        if len(pool) < per_source:
            raise ConfigError(f"source {src!r} has {len(pool)} pairs outside fold {k}; train_per_source is "
                              f"{per_source}")
        pick = np.random.default_rng([rep, k, i, 7]).permutation(len(pool))[:per_source]
        out += sorted(pool[j] for j in pick)
    return out


def question_folds(n_questions: int, folds: int, rep: int) -> list[int]:
    """Fold of each TruthfulQA question in a repetition (a seeded permutation dealt round-robin)."""
    fold = [0] * n_questions
    for pos, j in enumerate(np.random.default_rng([rep, 1000]).permutation(n_questions)):
        fold[j] = pos % folds
    return fold


def truthfulqa_questions(cfg: ReproConfig) -> list[dict]:
    from sdpo_eval.truthfulqa import load_truthfulqa

    if not cfg.truthfulqa:
        return []
    questions = load_truthfulqa(cfg.truthfulqa)
    if cfg.truthfulqa_questions is not None and cfg.truthfulqa_questions < len(questions):
        pick = np.random.default_rng(cfg.truthfulqa_seed).permutation(len(questions))[: cfg.truthfulqa_questions]
        questions = [questions[i] for i in sorted(pick)]
    return questions
