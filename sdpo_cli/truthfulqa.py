"""``sdpo truthfulqa --model M --csv TruthfulQA.csv``: TruthfulQA MC1 / MC2 of a model, as lm-eval-harness scores it
(:mod:`sdpo_eval.truthfulqa`); per-question results to ``--output`` (JSON lines)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from scorers.flex_attention import packed_attention_field
from sdpo_core.config import check_ranges
from sdpo_core.option_fields import batch_tokens_field, device_field, dtype_field


@dataclass
class TruthfulQACommand:
    model: str = field(default="bundled", metadata={"help": "The model: a local folder, a hub id or 'bundled'."})
    csv: str | None = field(default=None, metadata={"help": "TruthfulQA.csv (817 questions)."})
    limit: int | None = field(default=None, metadata={"min": 1, "help": "Only the first N questions."})
    output: str | None = field(default=None, metadata={
        "help": "Write one JSON line per question (index, mc1, mc2, log-likelihood of every choice) here."})
    dtype: str = dtype_field()
    device: str | None = device_field()
    batch_tokens: int = batch_tokens_field()
    packed_attention: str = packed_attention_field()

    def __post_init__(self):
        check_ranges(self)


def add_arguments(options) -> None:
    options.add_dataclass(TruthfulQACommand, "TruthfulQA")


def run(values: dict) -> int:
    from scorers.models import load_causal_lm, load_tokenizer, resolve_model_path

    from partitioner.io import atomic_write
    from sdpo_eval.truthfulqa import load_truthfulqa, score_truthfulqa
    from .options import build

    cmd = build(TruthfulQACommand, values)
    if not cmd.csv:
        raise ConfigError("give the TruthfulQA CSV with --csv (TruthfulQA.csv: Question, Best Answer, Correct "
                          "Answers, Incorrect Answers)")
    questions = load_truthfulqa(cmd.csv, limit=cmd.limit)
    path = resolve_model_path(cmd.model)
    model = load_causal_lm(path, dtype=cmd.dtype, device=cmd.device)
    results = score_truthfulqa(model, questions, tokenizer=load_tokenizer(path), batch_tokens=cmd.batch_tokens,
                               packed_attention=cmd.packed_attention)
    if cmd.output:
        atomic_write(Path(cmd.output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    n = len(results)
    print(f"TruthfulQA on {n} question(s), model {path}: MC1 {sum(r['mc1'] for r in results) / n:.4f}, "
          f"MC2 {sum(r['mc2'] for r in results) / n:.4f}")
    return 0
