"""The Markdown tables of the replication report (``reproduce_report.py`` computes the numbers; this lays them out)."""

from __future__ import annotations

import json

from reproduce_report import METRICS, PRIMARY, VALUE_METRICS, _num


def header_lines(tables: dict, summary: dict) -> list[str]:
    run = tables["run"]
    ident = run["config"]["identity"]
    analysis = summary["analysis"]
    planned = run["config"]["repetitions"]
    reps = sorted({int(r["repetition"]) for r in tables["arms"]})
    runs = sorted({(int(r["repetition"]), int(r["fold"])) for r in tables["arms"]})
    unrun = [rep for rep in planned if rep not in reps]
    boot = analysis.get("bootstrap") or {}
    return [
        f"Sample: {len(tables['m0'])} pairs ({', '.join(f'{s} {n}' for s, n in sorted(run['sample'].items()))}), "
        f"every one held out once per repetition over {ident['folds']} folds stratified by source; "
        f"{len(reps)} repetition(s) (seeds {', '.join(map(str, reps))}), so {len(runs) or '–'} independent training "
        f"runs per arm" + (f" (planned: {len(planned)} repetitions; not run: {', '.join(map(str, unrun))})"
                           if unrun else "") + f". Each run's models train on {ident['train_per_source']} pairs per training source "
        f"({', '.join(analysis.get('train_sources') or sorted(run['sample']))}) from the other fold (the same pairs "
        f"for every arm); max_length {ident['max_length']}, prompts of at most {ident['max_prompt_tokens']} tokens; "
        f"model {ident['model']}.",
        f"Same for every arm: {json.dumps(ident.get('training', {}), sort_keys=True)}; stepwise "
        f"{json.dumps(ident.get('stepwise', {}))}.",
        f"Primary stratum: {', '.join(analysis['primary_sources'])}, equally weighted. Cluster bootstrap: "
        f"{boot.get('resamples')} resamples, seed {boot.get('seed')} (comparison i uses seed + i).",
        "",
    ]


def pilot_lines(pilot: dict) -> list[str]:
    lines = ["**Pilot** (dpo only, pilot repetition, one fold; primary stratum; the rule is the config's "
             "`pilot_rule`, written before the pilot):", "",
             "| arm | learning rate | epochs | DPO loss vs M0 | own accuracy (M0's) | chosen change per token | "
             "loss ok | accuracy ok | no collapse |", "|---" * 9 + "|"]
    for r in pilot["rows"]:
        c = r["checks"]
        lines.append(f"| {r['arm']} | {r['learning_rate']:g} | {r['epochs']} | {r['dpo_loss']:.4f} | "
                     f"{r['own_accuracy']:.3f} ({r['m0_own_accuracy']:.3f}) | {r['chosen_change_per_token']:+.4f} | "
                     + " | ".join("yes" if c[k] else "no" for k in ("loss", "accuracy", "no_collapse")) + " |")
    lines += ["", f"Pilot choice: **{pilot['chosen']}** ({pilot['how']}).", ""]
    return lines


def value_lines(summary: dict) -> list[str]:
    lines = ["**Values** (mean over runs of each run's stratified mean; [between-run sd]; M0's reward accuracy "
             "and loss vs itself are 0 and log 2 by definition):", ""]
    for stratum in summary["strata"]:
        lines += [f"*Stratum {stratum}*" + (" (the primary)" if stratum == PRIMARY else "") + ":", "",
                  "| model | " + " | ".join(METRICS[k][0] for k in VALUE_METRICS) + " |",
                  "|---" * (len(VALUE_METRICS) + 1) + "|"]
        for model, by_stratum in summary["values"].items():
            cells = [f"{METRICS[k][1].format(m)} [{abs(sd):.4f}]" for k in VALUE_METRICS
                     for m, sd in [by_stratum[stratum][k]]]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def comparison_lines(summary: dict) -> list[str]:
    levels = {}
    for c in summary["comparisons"]:
        levels.setdefault(c["family"], (sum(e["family"] == c["family"] for e in summary["comparisons"]),
                                        c["corrected_level"]))
    within = "; ".join(f"{name}: {n} comparisons, level {lv:.4f}" for name, (n, lv) in levels.items())
    lines = [
        "**Paired differences** (A − B on the same rows of the same runs): mean [95% interval] [corrected: 95% "
        "with Bonferroni within its family], both over runs then rows (cluster bootstrap); the row-only 95% interval "
        "(runs held fixed); each run's difference and their sd; p: the cluster bootstrap's, Holm-adjusted within its "
        f"family ({within}). **Finding** only where the Holm-adjusted p < 0.05 and the corrected interval excludes "
        "zero; elsewhere no difference detected. Lower is better for the DPO loss; higher for the others.",
        "",
        "| family | A − B | metric | stratum | difference [95%] [corrected] | row-only 95% | runs (sd) | p | p (Holm) "
        "| finding |",
        "|---" * 10 + "|",
    ]
    for c in summary["comparisons"]:
        title, _, dform, scale = METRICS[c["metric"]]
        unit = " pt" if "pt" in dform else ""
        lo, hi = c["ci95"]
        clo, chi = c["ci_corrected"]
        rlo, rhi = c["ci95_rows_only"]
        diff = (f"{_num(dform, c['mean'], scale)} [{_num(dform, lo, scale)}, {_num(dform, hi, scale)}] "
                f"[{_num(dform, clo, scale)}, {_num(dform, chi, scale)}]{unit}")
        runs = ", ".join(_num(dform, v, scale) for v in c["run_values"])
        lines.append(f"| {c['family']} | {c['a']} − {c['b']} | {title} | {c['stratum']} | {diff} | "
                     f"[{_num(dform, rlo, scale)}, {_num(dform, rhi, scale)}] | {runs} "
                     f"({_num(dform.replace('+', ''), c['between_run_sd'], scale)}) | {c['p_value']:.2g} | "
                     f"{c['p_holm']:.2g} | {'**yes**' if c['finding'] else 'no difference detected'} |")
    return lines


def run_facts(run: dict) -> str:
    models = run["models"]
    train = sum(m["train_seconds"] for m in models)
    pairs = sum(m["train_pairs"] for m in models)
    evals = sum(m["eval_seconds"] for m in models)
    rows = sum(m["eval_rows"] for m in models)
    wall = sum(i["finished"] - i["started"] for i in run["invocations"])
    return "\n".join([
        f"Cost: {len(models)} models; training {train / 60:.1f} min for {pairs} training pairs (each chunk's pairs "
        f"once a step; {train / max(pairs, 1):.2f} s per pair, re-scoring each chunk with M(t-1) and every epoch "
        f"included); evaluation {evals / 60:.1f} min for {rows} model-rows ({evals / max(rows, 1):.3f} s per row, "
        f"model loading included); M0 scoring {run['m0_scoring_seconds'] / 60:.1f} min; wall time of the "
        f"{len(run['invocations'])} invocation(s): {wall / 60:.1f} min.",
        "Command(s): " + "; ".join(f"`{c}`" for c in run["commands"]) + ".",
        "Machine: " + json.dumps(run["machine"], sort_keys=True) + ".",
    ])
