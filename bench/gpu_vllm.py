"""GPU benchmark of vLLM reference scoring: tokens/s and the fraction of the GPU's measured matmul peak.

Scores the real rows (orca + LLaMA-Factory en, repeated ``--repeat`` times as distinct requests) with
``VLLMBackend`` on the GPU, and optionally with our transformers backend on the same GPU (``--transformers``) for the
ratio and the max/mean difference of the row sums. The matmul peak is measured first, in the scoring dtype, with a
``torch.matmul`` loop on large square matrices (what the GPU can do; the model's own shapes are smaller).

    python bench/gpu_vllm.py --model bundled --dtype bfloat16 --repeat 20 --transformers
    python bench/gpu_vllm.py --no-vllm --transformers --trl --repeat 4   # ours vs TRL's precompute, no vLLM needed

``--trl`` adds TRL's own ``DPOTrainer(precompute_ref_log_probs=True)`` on the same rows and GPU (the GPU variant of
``bench/bench_scoring.py``'s anchor: weights in the scoring dtype, no autocast, precompute batch ``--trl-batch``;
only the precompute pass is timed). The last line printed is one JSON object with every figure. Needs a CUDA GPU,
and vLLM (``pip install 'sdpo-curriculum[vllm]'``) unless ``--no-vllm``; ``--dry-run`` only checks the arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_scoring import instrument_trl_precompute, matmul_params  # noqa: E402 - bench/ is this script's own folder
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=20, help="repeat the real rows (distinct requests) for a longer run")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM (compare the other contenders only)")
    p.add_argument("--transformers", action="store_true", help="also score with our transformers backend on the GPU")
    p.add_argument("--trl", action="store_true", help="also TRL's DPOTrainer reference precompute on the GPU")
    p.add_argument("--trl-batch", type=int, default=8, help="TRL's precompute batch (precompute_ref_batch_size)")
    p.add_argument("--batch-tokens", type=int, default=32768, help="transformers backend's token budget")
    p.add_argument("--packed-attention", default="auto", choices=KERNELS,
                   help="transformers backend: the packed layout's attention (auto = compiled FlexAttention on CUDA)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print them as JSON, run nothing")
    a = p.parse_args(argv)
    if min(a.repeat, a.max_length, a.trl_batch, a.batch_tokens) < 1:
        p.error("--repeat, --max-length, --trl-batch and --batch-tokens must be positive")
    if a.no_vllm and not (a.transformers or a.trl):
        p.error("--no-vllm leaves nothing to run: add --transformers and/or --trl")
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print(json.dumps(vars(args)))
        return
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_vllm.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from scorers.models import resolve_model_path

    path = resolve_model_path(args.model)
    dtype = getattr(torch, args.dtype)
    peak = gpu_matmul_peak(dtype)
    rows, n_rejected = load_rows(args.model, args.max_length, args.repeat)
    fpt = flops_per_token(path)
    # TRL-equivalent real tokens: prompt counted per side, no padding, each side cut at max_length (keep_start)
    tokens = sum(min(len(r["prompt_ids"]) + len(r[side]), args.max_length)
                 for r in rows for side in ("chosen_ids", "rejected_ids"))
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; matmul peak {args.dtype} {peak:.0f} TFLOP/s")
    print(f"model {args.model} ({fpt / 1e9:.2f} GFLOP/token of matmuls), {len(rows)} pairs "
          f"({n_rejected} rejected x {args.repeat}), max_length {args.max_length}, {tokens} real tokens")
    report = {"args": vars(args), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "matmul_peak_tflops": peak, "pairs": len(rows), "real_tokens": tokens, "contenders": {}}
    sums = {}

    def record(name: str, seconds: float, flops: float, scores: dict) -> None:
        sums[name] = np.array(list(scores["chosen_logps"]) + list(scores["rejected_logps"]), dtype=np.float64)
        c = report["contenders"][name] = {
            "seconds": seconds, "pairs_s": len(rows) / seconds, "real_tok_s": tokens / seconds,
            "peak_fraction": flops / seconds / 1e12 / (peak * args.tensor_parallel_size),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
        print(f"{name:12s} {seconds:8.2f} s  {c['pairs_s']:9.1f} pairs/s  {c['real_tok_s']:10.0f} tok/s  "
              f"{100 * c['peak_fraction']:5.1f}% of matmul peak  peak GPU memory {c['peak_gpu_mib']:.0f} MiB",
              flush=True)

    if not args.no_vllm:
        from scorers.vllm_backend import VLLMBackend

        backend = VLLMBackend(args.model, dtype=args.dtype, max_length=args.max_length,
                              tensor_parallel_size=args.tensor_parallel_size,
                              gpu_memory_utilization=args.gpu_memory_utilization, progress=False)
        backend.score(rows[:8])  # warm-up, not timed
        backend.tokens_computed = 0
        t0 = time.perf_counter()
        v = backend.score(rows)
        seconds = time.perf_counter() - t0
        # vLLM computes every position of both sides (the prompt twice), the LM head included; its memory is the
        # engine's own pool, not torch's allocator, so peak_gpu_mib says nothing for it
        record("vllm", seconds, fpt * backend.tokens_computed, v)
        backend.close()
    if args.transformers:
        from scorers.transformers_backend import TransformersBackend

        tb = TransformersBackend(args.model, dtype=args.dtype, max_length=args.max_length, device="cuda",
                                 batch_tokens=args.batch_tokens, progress=False, packed_attention=args.packed_attention)
        # warm-up, not timed: the distinct rows once, so the compiled kernels of the length buckets exist
        tb.score(rows[: max(8, len(rows) // args.repeat)])
        tb.tokens_computed = 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        t = tb.score(rows)
        torch.cuda.synchronize()
        ts = time.perf_counter() - t0
        # packed rows: each prompt once; the LM head only at completion positions
        head = 2.0 * _head_params(path)
        record("transformers", ts, (fpt - head) * tb.tokens_computed + head * (
            sum(t["chosen_tokens"]) + sum(t["rejected_tokens"])), t)
        del tb
        torch.cuda.empty_cache()
    if args.trl:
        seconds, scores, counts = trl_precompute(args, rows)
        # TRL's padded batches counted as body and LM head at every position, padding included (an upper bound
        # where TRL's LM head runs at completion positions only)
        record("trl_precompute", seconds, fpt * (counts["tokens"] + counts["padding"]), scores)
        report["contenders"]["trl_precompute"]["padding"] = counts["padding"]
    names = list(sums)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = np.abs(sums[a] - sums[b])
            ratio = report["contenders"][b]["seconds"] / report["contenders"][a]["seconds"]
            report[f"{a}_vs_{b}"] = {"speed": ratio, "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
            print(f"{a} vs {b}: x{ratio:.2f} speed, |row sum diff| max {d.max():.2e} mean {d.mean():.2e}")
    print(json.dumps(report))


def trl_precompute(args, rows: list[dict]) -> tuple[float, dict, dict]:
    """TRL's own reference precompute on the GPU: (seconds of the precompute pass, its log-probs, token counts)."""
    import tempfile

    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer

    # canonical columns only; from_list gives a fresh fingerprint, so TRL's precompute cache cannot answer
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    model = load_causal_lm(args.model, dtype=args.dtype, device="cuda")
    timing, counts = instrument_trl_precompute(sync=torch.cuda.synchronize)
    # weights in the scoring dtype and no autocast, as our backend computes; TF32 as the process has it
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), bf16=False, fp16=False, report_to=[], max_length=args.max_length,
                    precompute_ref_log_probs=True, precompute_ref_batch_size=args.trl_batch,
                    per_device_train_batch_size=args.trl_batch, gradient_checkpointing=False,
                    dataloader_num_workers=0, disable_tqdm=True)
    torch.cuda.reset_peak_memory_stats()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=load_tokenizer(args.model))
    ds = trainer.train_dataset
    return timing["train"], {"chosen_logps": ds["ref_chosen_logps"], "rejected_logps": ds["ref_rejected_logps"]}, counts


def _head_params(model_path: str) -> int:
    c = json.loads((Path(model_path) / "config.json").read_text())
    c = c.get("text_config", c)
    return c["hidden_size"] * c["vocab_size"]


if __name__ == "__main__":
    main()
