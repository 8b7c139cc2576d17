"""GPU benchmark of vLLM reference scoring: tokens/s and the fraction of the GPU's measured matmul peak.

Scores the real rows (orca + LLaMA-Factory en, repeated ``--repeat`` times as distinct requests) with
``VLLMBackend`` on the GPU, and optionally with our transformers backend on the same GPU (``--transformers``) for the
ratio and the max/mean difference of the row sums. The matmul peak is measured first, in the scoring dtype, with a
``torch.matmul`` loop on large square matrices (what the GPU can do; the model's own shapes are smaller).

    python bench/gpu_vllm.py --model bundled --dtype bfloat16 --repeat 20 --transformers

Needs a CUDA GPU and ``pip install 'sdpo-curriculum[vllm]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_scoring import matmul_params  # noqa: E402 - bench/ is this script's own folder
from scorers.flex_attention import KERNELS  # noqa: E402


def gpu_matmul_peak(dtype, n: int = 8192, seconds: float = 3.0) -> float:
    """TFLOP/s of an n x n @ n x n matmul loop on the current GPU."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        k += 10
        torch.cuda.synchronize()
    tflops = 2 * n**3 * k / (time.perf_counter() - t0) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return tflops


def flops_per_token(model_path: str) -> float:
    """Matmul FLOPs per token of a decoder (body + LM head), from its config.json (attention scores excluded)."""
    return 2.0 * sum(matmul_params(model_path))


def load_rows(model: str, max_length: int, repeat: int):
    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.models import load_tokenizer

    data = REPO.parent / "shared" / "data"
    ds = load_preferences([str(data / "orca_dpo_pairs" / "validation.jsonl"),
                           str(data / "llamafactory_demo" / "dpo_en_demo.json")])
    kept, rejects = tokenize_preferences(ds, load_tokenizer(model), TokenizeConfig(max_length=max_length))
    return kept.to_list() * repeat, len(rejects)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bundled")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=20, help="repeat the real rows (distinct requests) for a longer run")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--transformers", action="store_true", help="also score with our transformers backend on the GPU")
    p.add_argument("--batch-tokens", type=int, default=32768, help="transformers backend's token budget")
    p.add_argument("--packed-attention", default="auto", choices=KERNELS,
                   help="transformers backend: the packed layout's attention (auto = compiled FlexAttention on CUDA)")
    args = p.parse_args()

    import numpy as np
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_vllm.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from scorers.models import resolve_model_path
    from scorers.vllm_backend import VLLMBackend

    path = resolve_model_path(args.model)
    dtype = getattr(torch, args.dtype)
    peak = gpu_matmul_peak(dtype)
    rows, n_rejected = load_rows(args.model, args.max_length, args.repeat)
    fpt = flops_per_token(path)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; matmul peak {args.dtype} {peak:.0f} TFLOP/s")
    print(f"model {args.model} ({fpt / 1e9:.2f} GFLOP/token of matmuls), {len(rows)} pairs "
          f"({n_rejected} rejected x {args.repeat}), max_length {args.max_length}")

    backend = VLLMBackend(args.model, dtype=args.dtype, max_length=args.max_length,
                          tensor_parallel_size=args.tensor_parallel_size,
                          gpu_memory_utilization=args.gpu_memory_utilization, progress=False)
    backend.score(rows[:8])  # warm-up, not timed
    backend.tokens_computed = 0
    t0 = time.perf_counter()
    v = backend.score(rows)
    seconds = time.perf_counter() - t0
    tokens = backend.tokens_computed  # = TRL-equivalent real tokens (prompt counted per side, no padding)
    backend.close()
    frac = fpt * tokens / seconds / 1e12 / (peak * args.tensor_parallel_size)
    print(f"vllm         {seconds:8.2f} s  {len(rows) / seconds:9.1f} pairs/s  {tokens / seconds:10.0f} tok/s  "
          f"{100 * frac:5.1f}% of matmul peak")
    if args.transformers:
        from scorers.transformers_backend import TransformersBackend

        tb = TransformersBackend(args.model, dtype=args.dtype, max_length=args.max_length, device="cuda",
                                 batch_tokens=args.batch_tokens, progress=False, packed_attention=args.packed_attention)
        # warm-up, not timed: the distinct rows once, so the compiled kernels of the length buckets exist
        tb.score(rows[: max(8, len(rows) // args.repeat)])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = tb.score(rows)
        torch.cuda.synchronize()
        ts = time.perf_counter() - t0
        # packed rows: each prompt once; the LM head only at completion positions
        t_flops = (fpt - 2.0 * _head_params(path)) * tb.tokens_computed + 2.0 * _head_params(path) * (
            sum(t["chosen_tokens"]) + sum(t["rejected_tokens"]))
        print(f"transformers {ts:8.2f} s  {len(rows) / ts:9.1f} pairs/s  {tokens / ts:10.0f} tok/s  "
              f"{100 * t_flops / ts / 1e12 / peak:5.1f}% of matmul peak")
        d = np.abs(np.array(v["chosen_logps"] + v["rejected_logps"]) - np.array(t["chosen_logps"] + t["rejected_logps"]))
        print(f"vllm vs transformers: x{ts / seconds:.2f} speed, |row sum diff| max {d.max():.2e} mean {d.mean():.2e}")


def _head_params(model_path: str) -> int:
    c = json.loads((Path(model_path) / "config.json").read_text())
    c = c.get("text_config", c)
    return c["hidden_size"] * c["vocab_size"]


if __name__ == "__main__":
    main()
