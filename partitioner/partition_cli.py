"""``sdpo partition``: order scored pairs easy -> hard and cut them into Arrow shards + manifest.

INPUT is a scored folder (``sdpo score``), or the loader's inputs (files / globs / name=path): those are loaded
and, for the score-based orders (easy_to_hard, hard_to_easy, by_source), scored first into ``--scored-dir``
(default ``OUT.scored``) with ``--model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .partition import CHUNKINGS, ORDERS, SCORE_ORDERS, PartitionConfig, partition_preferences


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="a scored folder, or data files for the loader")
    parser.add_argument("--output-dir", "-o", required=False, help="the partition folder")
    parser.add_argument("--order", default="easy_to_hard", choices=ORDERS, help="curriculum order (default easy_to_hard)")
    parser.add_argument("--signal", default=None, help="difficulty signal from scoring.json (default: the difficulty column)")
    parser.add_argument("--column", default=None, help="numeric column for --order column")
    parser.add_argument("--descending", action="store_true", help="--order column: largest first")
    parser.add_argument("--chunking", default="auto", choices=CHUNKINGS, help="how to cut (default: from the options)")
    parser.add_argument("--chunks", type=int, default=3, help="number of equal chunks (default 3)")
    parser.add_argument("--fractions", default=None, help="chunk shares, e.g. 0.2,0.3,0.5 (sum 1)")
    parser.add_argument("--thresholds", default=None, help="cut points on the order key, e.g. -10,0")
    parser.add_argument("--quantiles", default=None, help="cut points as quantiles of the order key, e.g. 0.5,0.8")
    parser.add_argument("--min-chunk-size", type=int, default=1, help="merge smaller chunks into their neighbour")
    parser.add_argument("--seed", type=int, default=0, help="seed of --order random and --shuffle-within")
    parser.add_argument("--shuffle-within", action="store_true", help="seeded shuffle inside each chunk")
    parser.add_argument("--parquet", action="store_true", help="also write chunk-NNN.parquet")
    parser.add_argument("--model", default="bundled", help="reference model when INPUT must be scored first")
    parser.add_argument("--max-length", type=int, default=1024, help="DPOConfig.max_length when scoring first")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N loaded rows (scoring first)")
    parser.add_argument("--scored-dir", default=None, help="where to score loader inputs (default OUT.scored)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    from .loading import add_loader_arguments

    add_loader_arguments(parser)


def _is_scored(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "scoring.json").exists()


def run(args) -> int:
    from .loading import loader_options

    if not args.inputs:
        raise ValueError("give an INPUT: a scored folder or data files")
    if not args.output_dir:
        raise ValueError("give the partition folder with --output-dir/-o")
    config = PartitionConfig(
        order=args.order, signal=args.signal, column=args.column, ascending=not args.descending, seed=args.seed,
        chunking=args.chunking, chunks=args.chunks, fractions=args.fractions, thresholds=args.thresholds,
        quantiles=args.quantiles, min_chunk_size=args.min_chunk_size, shuffle_within=args.shuffle_within,
        parquet=args.parquet,
    )
    rejects = None
    if len(args.inputs) == 1 and _is_scored(args.inputs[0]):
        data = args.inputs[0]
    elif config.order in SCORE_ORDERS:
        try:
            from scorers.job import ScoringConfig, score_preferences
        except ImportError as e:
            raise ValueError(f"order {config.order!r} needs scores and the scorer is not available: {e}") from e
        data = args.scored_dir or f"{str(args.output_dir).rstrip('/')}.scored"
        score_preferences(list(args.inputs), data,
                          ScoringConfig(model=args.model, max_length=args.max_length, limit=args.limit,
                                        progress=args.progress, load_options=loader_options(args)))
    else:
        from .loading import load_preferences_with_rejects

        data, report = load_preferences_with_rejects(list(args.inputs), **loader_options(args))
        rejects = list(report.rejects)
    out = partition_preferences(data, args.output_dir, config, rejects=rejects, progress=args.progress)
    from .shards import read_manifest

    m = read_manifest(out)
    sizes = ", ".join(str(c["rows"]) for c in m["chunks"])
    print(f"partitioned {m['rows_kept']} of {m['rows_in']} rows into {len(m['chunks'])} chunks ({sizes}) in {out}"
          f" ({m['rows_rejected']} rejected); order {m['ordering']['order']}")
    return 0
