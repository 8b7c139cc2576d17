"""``sdpo inspect``: load and validate preference data; print formats, row accounting and rejects."""

from __future__ import annotations

import json
import statistics


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", help="files, globs, folders or Hub names; name=path to name a source")
    from .loading import add_loader_arguments

    add_loader_arguments(p)
    p.add_argument("--rejects", default=None, help="write rejected rows to this Arrow file")
    p.add_argument("--tokenizer", default=None, help="also tokenize as DPOTrainer does (path, hub id or 'bundled')")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from .loading import load_preferences_with_rejects, loader_options
    from .rejects import write_rejects

    dataset, report = load_preferences_with_rejects(args.inputs, **loader_options(args))
    out = report.as_dict()
    rejects = list(report.rejects)
    if args.tokenizer:
        from scorers.models import load_tokenizer

        from .schema import CHOSEN_IDS, CHOSEN_TRUNCATED, PROMPT_IDS, REJECTED_IDS, REJECTED_TRUNCATED
        from .tokenization import TokenizeConfig, tokenize_preferences

        tok = load_tokenizer(args.tokenizer)
        tokenized, tok_rejects = tokenize_preferences(dataset, tok, TokenizeConfig(max_length=args.max_length))
        rejects += tok_rejects
        lengths = {}
        for col in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
            ns = [len(x) for x in tokenized[col]] or [0]
            lengths[col.replace("_ids", "")] = {"median": statistics.median(ns), "max": max(ns)}
        out["tokenized"] = {
            "tokenizer": args.tokenizer,
            "max_length": args.max_length,
            "rows_kept": len(tokenized),
            "rows_rejected": len(tok_rejects),
            "rows_truncated": sum(a or b for a, b in zip(tokenized[CHOSEN_TRUNCATED], tokenized[REJECTED_TRUNCATED])),
            "token_lengths": lengths,
        }
    if args.rejects:
        write_rejects(rejects, args.rejects)
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"{'source':<24} {'format':<24} {'in':>7} {'kept':>7} {'rejected':>8} {'dups':>5}  reasons")
    for s in out["sources"]:
        reasons = ", ".join(f"{k}={v}" for k, v in s["reject_reasons"].items())
        print(f"{s['source']:<24} {str(s['format']):<24} {s['rows_in']:>7} {s['rows_kept']:>7} "
              f"{s['rows_rejected']:>8} {s['duplicates']:>5}  {reasons}")
    print(f"{'total':<49} {out['rows_in']:>7} {out['rows_kept']:>7} {out['rows_rejected']:>8}")
    if "tokenized" in out:
        t = out["tokenized"]
        print(f"tokenized with {t['tokenizer']} (max_length {t['max_length']}): {t['rows_kept']} kept, "
              f"{t['rows_rejected']} rejected (prompt_too_long), {t['rows_truncated']} truncated; "
              + ", ".join(f"{k} median {v['median']} max {v['max']}" for k, v in t["token_lengths"].items()))
    if args.rejects:
        print(f"rejects written to {args.rejects}")
    return 0
