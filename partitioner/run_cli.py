"""``sdpo run``: the whole offline job — load, score with the reference model, partition, statistics.

With no arguments it runs on the embedded default: the bundled real data (``examples/data``: orca_dpo_pairs and
LLaMA-Factory's dpo_en_demo, one source each) and the bundled SmolLM2-135M-Instruct, ordered *by source* as in
the sDPO paper (each source one chunk, sources sorted by the reference model's reward accuracy on them).

Output (``--output-dir``, default ``out/run``): ``scored/`` (``sdpo score``'s folder), ``partition/`` (chunks +
manifest), ``stats.json`` (per-chunk statistics) and ``stats.png`` (their plot). Scoring is resumable: rerunning a killed job
continues from its finished parts.
"""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
BUNDLED_INPUTS = [
    f"orca={BUNDLED_DATA / 'orca_dpo_pairs.jsonl'}",
    f"llamafactory_en={BUNDLED_DATA / 'llamafactory_dpo_en_demo.json'}",
]


def add_arguments(p) -> None:
    from .partition import CHUNKINGS, ORDERS

    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="data files / globs / name=path (default: the bundled real data)")
    p.add_argument("--output-dir", "-o", default="out/run", help="job folder (default out/run)")
    p.add_argument("--model", default="bundled", help="reference model M0: path, hub id or 'bundled' (SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", help="float32 (TRL-exact) or bfloat16")
    p.add_argument("--max-length", type=int, default=1024, help="DPOConfig.max_length")
    p.add_argument("--signals", default="ref_margin,ref_margin_per_token,length_gap",
                   help="difficulty signals to compute (comma-separated)")
    p.add_argument("--difficulty-signal", default=None, help="signal used as `difficulty` (default: the first)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N loaded rows")
    p.add_argument("--order", default="by_source", choices=ORDERS, help="curriculum order (default by_source)")
    p.add_argument("--chunking", default="auto", choices=CHUNKINGS)
    p.add_argument("--chunks", type=int, default=3, help="equal chunks for score orders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start scoring over if settings changed")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    from .loading import add_loader_arguments

    add_loader_arguments(p)


def run(args) -> int:
    from scorers.job import ScoringConfig, score_preferences

    from .loading import loader_options
    from .partition import PartitionConfig, partition_preferences
    from .shards import read_manifest
    from .stats import partition_stats, plot_partition

    out = Path(args.output_dir)
    inputs = list(args.inputs) or BUNDLED_INPUTS
    signals = [s.strip() for s in args.signals.split(",") if s.strip()]
    scored = score_preferences(
        inputs,
        out / "scored",
        ScoringConfig(
            model=args.model, dtype=args.dtype, max_length=args.max_length, signals=signals,
            difficulty_signal=args.difficulty_signal, limit=args.limit, seed=args.seed, overwrite=args.overwrite,
            progress=args.progress, load_options=loader_options(args),
        ),
    )
    part = partition_preferences(
        scored, out / "partition",
        PartitionConfig(order=args.order, chunking=args.chunking, chunks=args.chunks, seed=args.seed),
        progress=args.progress,
    )
    manifest = read_manifest(part)
    stats = partition_stats(part)
    (out / "stats.json").write_text(json.dumps(stats.to_dicts(), indent=2, default=str))
    plot_partition(part, out / "stats.png")
    scoring = json.loads((Path(scored) / "scoring.json").read_text())
    print("reference model:", scoring["model"].get("name_or_path"), "| dtype", scoring["dtype"])
    print("per source (reward accuracy = share of pairs with chosen_logps > rejected_logps):")
    for src, s in scoring.get("per_source", {}).items():
        print(f"  {src:<20} n={s.get('count')}  reward_accuracy={s.get('reward_accuracy'):.3f}  "
              f"mean_margin={s.get('mean_margin'):.2f}")
    import polars as pl

    shown = [c for c in ("chunk", "rows", "share", "difficulty_mean", "difficulty_min", "difficulty_max",
                         "reward_accuracy", "mean_gamma", "sources") if c in stats.columns]
    with pl.Config(tbl_cols=-1, tbl_width_chars=160, fmt_str_lengths=60, float_precision=3, tbl_hide_dataframe_shape=True):
        print(stats.select(shown))
    print(f"{manifest['rows_in']} rows in = {manifest['rows_kept']} in {len(manifest['chunks'])} chunks + "
          f"{manifest['rows_rejected']} rejected {manifest.get('reject_reasons') or ''}")
    print(f"partition: {part}  (sdpo verify {part}; sdpo train {part} --model ...)  plot: {out / 'stats.png'}")
    return 0
