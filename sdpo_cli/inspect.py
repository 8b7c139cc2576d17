"""``sdpo inspect INPUT...``: load and validate preference data; print formats, row accounting and rejects."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from partitioner.data.loading import LoadConfig
from partitioner.data.tokenization import TokenizeConfig
from sdpo_core.config import section
from sdpo_core.errors import ConfigError

from .options import build


@dataclass
class InspectCommand:
    rejects: str | None = field(default=None, metadata={"help": "Write the rejected rows to this Arrow file."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Also tokenize as DPOTrainer does with this tokenizer (path, hub id or 'bundled')."})
    json: bool = field(default=False, metadata={"help": "Print the report as JSON."})
    load: LoadConfig = section(LoadConfig)
    tokenize: TokenizeConfig = section(TokenizeConfig)


def add_arguments(options) -> None:
    options.add_positional("inputs", "files, globs, folders or Hub names; name=path to name a source", many=True,
                           metavar="INPUT")
    options.add_dataclass(InspectCommand, "report")


def run(values: dict) -> int:
    from sdpo_core.columns import CHOSEN_IDS, CHOSEN_TRUNCATED, PROMPT_IDS, REJECTED_IDS, REJECTED_TRUNCATED

    from partitioner.data.loading import load_preferences_with_rejects
    from partitioner.data.rejects import combine_rejects, write_rejects

    if not values.get("inputs"):
        raise ConfigError("give at least one INPUT (a file, glob, folder or Hub name)")
    cmd = build(InspectCommand, values)
    dataset, report = load_preferences_with_rejects(values["inputs"], cmd.load)
    out = report.as_dict()
    rejects = [report.rejects_table()]
    if cmd.tokenizer:
        from scorers.models import load_tokenizer

        from partitioner.data.tokenization import tokenize_preferences

        tok = load_tokenizer(cmd.tokenizer)
        tokenized, tok_rejects = tokenize_preferences(dataset, tok, cmd.tokenize)
        rejects.append(tok_rejects)
        lengths = {}
        for col in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
            ns = [len(x) for x in tokenized[col]] or [0]
            lengths[col.replace("_ids", "")] = {"median": statistics.median(ns), "max": max(ns)}
        out["tokenized"] = {
            "tokenizer": cmd.tokenizer,
            "max_length": cmd.tokenize.max_length,
            "rows_kept": len(tokenized),
            "rows_rejected": len(tok_rejects),
            "rows_truncated": sum(a or b for a, b in zip(tokenized[CHOSEN_TRUNCATED], tokenized[REJECTED_TRUNCATED])),
            "token_lengths": lengths,
        }
    if cmd.rejects:
        write_rejects(combine_rejects(*rejects), cmd.rejects)
    if cmd.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    # Multi-response rows expand to several pairs each: then a pairs column (otherwise pairs = kept rows)
    expanded = any(s["pairs"] != s["rows_kept"] for s in out["sources"])

    def pairs(d) -> str:
        return f" {d['pairs']:>7}" if expanded else ""

    print(f"{'source':<24} {'format':<24} {'in':>7} {'kept':>7}{' pairs'.rjust(8) if expanded else ''} "
          f"{'rejected':>8} {'dups':>5}  reasons")
    for s in out["sources"]:
        reasons = ", ".join(f"{k}={v}" for k, v in s["reject_reasons"].items())
        print(f"{s['source']:<24} {str(s['format']):<24} {s['rows_in']:>7} {s['rows_kept']:>7}{pairs(s)} "
              f"{s['rows_rejected']:>8} {s['duplicates']:>5}  {reasons}")
    print(f"{'total':<49} {out['rows_in']:>7} {out['rows_kept']:>7}{pairs(out)} {out['rows_rejected']:>8}")
    if "tokenized" in out:
        t = out["tokenized"]
        print(f"tokenized with {t['tokenizer']} (max_length {t['max_length']}): {t['rows_kept']} kept, "
              f"{t['rows_rejected']} rejected (prompt_too_long), {t['rows_truncated']} truncated; "
              + ", ".join(f"{k} median {v['median']} max {v['max']}" for k, v in t["token_lengths"].items()))
    if cmd.rejects:
        print(f"rejects written to {cmd.rejects}")
    return 0
