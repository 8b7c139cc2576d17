"""Benchmark: the packed layout's attention, per-pair SDPA loop (anchor) vs one call per layer (issue 24), on CPU.

Same model (bundled SmolLM2-135M-Instruct, fp32), same rows (the first --rows orca rows, packed as the scorer
packs them: pairs end to end up to --batch-tokens per line). Each variant runs in its own child process, chosen by
the ``packed_attention`` option (:mod:`scorers.flex_attention`):

* one attention call of one layer at SmolLM2-135M's shapes on lines of 256-token pairs: ``loop`` (anchor), ``flex``
  (compiled), ``flex_eager`` (flex's unfused implementation);
* scoring (``TransformersBackend.score``, inference): ``loop`` (anchor), ``flex`` (compiled FlexAttention, one
  kernel per length bucket; the first pass includes the compiles, the second is warm), ``flex_eager`` with
  ``--eager``;
* training forward + backward of the packed head (sum of the log-probs of every line): ``loop`` (anchor) vs the
  one-call path, which on CPU is one SDPA call with the dense layout mask (FlexAttention has no backward on CPU).

Prints seconds per variant, the ratio anchor / variant (> 1: faster than the loop) and max |diff| of the row sums
(or the gradient) against the anchor.

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_attention.py --rows 24 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def child_score(args) -> dict:
    from bench_scoring import load_rows

    from scorers.models import load_causal_lm
    from scorers.transformers_backend import TransformersBackend

    kept, _, _ = load_rows(args.rows, args.max_length)
    rows = kept.to_list()
    model = load_causal_lm("bundled", dtype="float32")
    backend = TransformersBackend(model, max_length=args.max_length, batch_tokens=args.batch_tokens, progress=False,
                                  packed_attention=args.kernel)
    seconds = []
    for _ in range(2):  # first pass: compiles (flex); second: warm
        t0 = time.perf_counter()
        scores = backend.score(rows)
        seconds.append(time.perf_counter() - t0)
    return {"first": seconds[0], "seconds": seconds[1], "sums": scores["chosen_logps"] + scores["rejected_logps"]}


def child_train(args) -> dict:
    import torch
    from bench_scoring import load_rows

    from scorers.models import load_causal_lm
    from scorers.packed_head import install_packed_head
    from scorers.packing import pack_line, packed_row, token_batches
    from scorers.attention import layout_tensor

    kept, _, _ = load_rows(args.train_rows, args.max_length)
    rows = [packed_row(i, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], args.max_length, "keep_start")
            for i, r in enumerate(kept.to_list())]
    model = load_causal_lm("bundled", dtype="float32").train()
    install_packed_head(model)
    lines = [pack_line([rows[i] for i in b]) for b in token_batches([len(r.ids) for r in rows], args.batch_tokens)]
    seconds = []
    for _ in range(2):
        model.zero_grad()
        t0 = time.perf_counter()
        for line, layout in lines:
            lp = model(input_ids=torch.tensor([line.ids]), position_ids=torch.tensor([line.pos]),
                       attention_mask=layout_tensor([layout], "cpu"),
                       packed_predictors=torch.tensor([t[0] for t in line.targets]),
                       packed_labels=torch.tensor([t[1] for t in line.targets]), packed_attention=args.kernel)[0]
            lp.sum().backward()
        seconds.append(time.perf_counter() - t0)
    grad = model.get_input_embeddings().weight.grad
    return {"first": seconds[0], "seconds": seconds[1], "grad_norm": float(grad.norm()),
            "grad_sample": grad.flatten()[:: max(1, grad.numel() // 4096)].tolist()}


def child_layer(args) -> dict:
    """One attention call of one layer (SmolLM2-135M's shapes: 9 query heads, 3 key/value heads, head_dim 64) on a
    line of pairs of 256 tokens (prefix 128, sides 64 + 64), per line length; best of 3 after a warm-up call."""
    import functools

    import torch

    from scorers.attention import layout_tensor, prefix_shared_attention
    from scorers.flex_attention import chosen_kernel, flex_prefix_attention

    kind = chosen_kernel("cpu", args.kernel)
    attention = prefix_shared_attention if kind == "loop" else functools.partial(flex_prefix_attention,
                                                                                  compiled=kind == "flex")

    class Layer:
        layer_idx = 0

    seconds = {}
    for n in args.layer_lengths:
        layout = layout_tensor([[(128, 64, 64)] * (n // 256)], "cpu")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, n, 64, generator=g) for h in (9, 3, 3))
        with torch.inference_mode():
            t0 = time.perf_counter()
            attention(Layer(), q, k, v, layout, scaling=0.125)
            first = time.perf_counter() - t0
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                attention(Layer(), q, k, v, layout, scaling=0.125)
                times.append(time.perf_counter() - t0)
        seconds[str(n)] = [min(times), first]
    return {"layer_seconds": seconds}


def run_child(role: str, kernel: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--rows", str(args.rows), "--train-rows", str(args.train_rows),
           "--max-length", str(args.max_length), "--batch-tokens", str(args.batch_tokens),
           "--layer-lengths", *map(str, args.layer_lengths), "--kernel", kernel]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out": args.timeout}
    if out.returncode != 0:
        sys.exit(f"{role}/{kernel} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--train-rows", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--eager", action="store_true", help="also score with flex_eager (dense math: minutes)")
    p.add_argument("--layer-lengths", type=int, nargs="*", default=[1024, 4096], help="line lengths, one layer")
    p.add_argument("--timeout", type=int, default=300, help="seconds a variant may run (then reported as timed out)")
    p.add_argument("--skip-model", action="store_true", help="only the one-layer timing")
    p.add_argument("--child", choices=("score", "train", "layer"))
    p.add_argument("--kernel", default="loop", help="(child) packed_attention")
    args = p.parse_args()
    if args.child:
        print(json.dumps({"score": child_score, "train": child_train, "layer": child_layer}[args.child](args)))
        return

    import numpy as np
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; rows {args.rows} (training {args.train_rows}), max_length "
          f"{args.max_length}, batch_tokens {args.batch_tokens}")
    layer = {k: run_child("layer", k, args) for k in ("loop", "flex", "flex_eager")}
    for n in map(str, args.layer_lengths):
        anchor = layer["loop"]["layer_seconds"][n][0]
        for kernel, r in layer.items():
            if "timed_out" in r:
                print(f"layer {kernel:10s} line {n:>5s}: timed out after {r['timed_out']} s")
                continue
            warm, first = r["layer_seconds"][n]
            print(f"layer {kernel:10s} line {n:>5s}: {1e3 * warm:9.2f} ms a call (first call {1e3 * first:9.1f} ms)"
                  f"  x{anchor / warm:.2f} vs loop")
    scoring = ["loop", "flex"] + (["flex_eager"] if args.eager else [])
    for role, kernels in () if args.skip_model else (("score", scoring), ("train", ["loop", "flex"])):
        results = {k: run_child(role, k, args) for k in kernels}
        anchor = results["loop"]
        key = "sums" if role == "score" else "grad_sample"
        for kernel, r in results.items():
            if "timed_out" in r:
                print(f"{role:5s} {kernel:10s} timed out after {r['timed_out']} s")
                continue
            diff = np.abs(np.array(r[key]) - np.array(anchor[key])).max()
            print(f"{role:5s} {kernel:10s} warm {r['seconds']:7.2f} s (first pass {r['first']:7.2f} s)  "
                  f"x{anchor['seconds'] / r['seconds']:.2f} vs loop (first pass x{anchor['first'] / r['first']:.2f})"
                  f"  max |diff| vs loop {diff:.2e}")


if __name__ == "__main__":
    main()
