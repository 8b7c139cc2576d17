"""Benchmark: our reference scorer (TransformersBackend, packed) vs TRL's own DPOTrainer ref precompute.

Same model (bundled SmolLM2-135M-Instruct), same rows (the first --rows orca rows), same machine, one run. Each
contender runs in its own child process (peak RSS measured there, model loading excluded from the timing).

Prints pairs/s, TRL-equivalent real tokens/s (prompt counted twice, padding not counted), the ratio, max/mean
absolute difference of the row sums against TRL, the fraction of the measured matmul peak, peak RSS, and the
deviation of bf16 scoring from TRL's fp32 sums.

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_scoring.py --rows 24 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_rows(n: int, max_length: int):
    import datasets

    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.models import load_tokenizer

    data = REPO.parent / "shared" / "data" / "orca_dpo_pairs" / "validation.jsonl"
    ds = load_preferences([str(data)]).select(range(n))
    tok = load_tokenizer("bundled")
    kept, rejects = tokenize_preferences(ds, tok, TokenizeConfig(max_length=max_length))
    # DPOTrainer drops the prompt_too_long rows itself; give it only the rows we score, for a 1:1 comparison
    canonical = datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in kept.to_list()])
    return kept, canonical, len(rejects)


def child_ours(args) -> dict:
    import torch

    from scorers.models import load_causal_lm
    from scorers.transformers_backend import TransformersBackend

    kept, _, _ = load_rows(args.rows, args.max_length)
    rows = kept.to_list()
    model = load_causal_lm("bundled", dtype=args.dtype)
    backend = TransformersBackend(model, max_length=args.max_length, batch_tokens=args.batch_tokens,
                                  packed=not args.plain, progress=False, linear_kernel=args.linear_kernel)
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    scores = backend.score(rows)
    seconds = time.perf_counter() - t0
    n_scored = sum(scores["chosen_tokens"]) + sum(scores["rejected_tokens"])
    return {"seconds": seconds, "chosen": scores["chosen_logps"], "rejected": scores["rejected_logps"],
            "tokens_computed": backend.tokens_computed, "padding": backend.padding_computed, "head_positions": n_scored}


def instrument_trl_precompute(sync=lambda: None) -> tuple[dict, dict]:
    """Wrap TRL's reference precompute (this process only): ``(timing, counts)``, filled as TRL runs: the seconds of
    each precompute pass by dataset name (between two ``sync()`` calls, e.g. ``torch.cuda.synchronize``), and the
    tokens and padding its batches compute."""
    from trl import DPOTrainer

    timing, counts = {}, {"tokens": 0, "padding": 0}
    original, original_batch = DPOTrainer._precompute_ref_logps, DPOTrainer.compute_ref_log_probs

    def timed(self, dataset, name, batch_size):
        sync()
        t0 = time.perf_counter()
        out = original(self, dataset, name, batch_size)
        sync()
        timing[name] = time.perf_counter() - t0
        return out

    def counted(self, model, inputs):
        counts["tokens"] += int(inputs["attention_mask"].sum())
        counts["padding"] += int((inputs["attention_mask"] == 0).sum())
        return original_batch(self, model, inputs)

    DPOTrainer._precompute_ref_logps, DPOTrainer.compute_ref_log_probs = timed, counted
    return timing, counts


def child_trl(args) -> dict:
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer

    _, canonical, _ = load_rows(args.rows, args.max_length)
    model = load_causal_lm("bundled", dtype="float32")
    tok = load_tokenizer("bundled")
    timing, counts = instrument_trl_precompute()
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), bf16=False, use_cpu=True, report_to=[],
                    max_length=args.max_length, precompute_ref_log_probs=True, per_device_train_batch_size=8,
                    gradient_checkpointing=False, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=canonical, processing_class=tok)
    ds = trainer.train_dataset
    return {"seconds": timing["train"], "chosen": list(ds["ref_chosen_logps"]), "rejected": list(ds["ref_rejected_logps"]),
            "tokens_computed": counts["tokens"], "padding": counts["padding"],
            "head_positions": counts["tokens"] + counts["padding"]}


def matmul_peak(dtype: str, kernel: str = "torch", seconds: float = 3.0) -> float:
    """GFLOP/s of a linear-layer loop on the model's MLP shape (1024 x 576 -> 1536): torch's ``F.linear`` (MKL for
    fp32 on CPU) or oneDNN's (``torch.ops.mkldnn._linear_pointwise``, what the scorer uses in fp32 on CPU)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    a, w = torch.randn(1024, 576, dtype=dt), torch.randn(1536, 576, dtype=dt)

    def step():
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        return F.linear(a, w)

    for _ in range(5):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return 2 * 1024 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9


def matmul_params(model_path) -> tuple[int, int]:
    """(matmul parameters of the transformer body, of the LM head) of a decoder, from its config.json."""
    c = json.loads((Path(model_path) / "config.json").read_text())
    c = c.get("text_config", c)
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    kv = head_dim * c.get("num_key_value_heads", heads)
    return layers * (h * heads * head_dim * 2 + h * kv * 2 + 3 * h * i), h * c["vocab_size"]


def model_params() -> tuple[int, int]:
    """(matmul parameters of the transformer body, of the LM head) of the bundled model."""
    from scorers.models import bundled_model_path

    return matmul_params(bundled_model_path())


def run_child(role: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--rows", str(args.rows), "--max-length", str(args.max_length),
           "--batch-tokens", str(args.batch_tokens), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        sys.exit(f"{role} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--plain", action="store_true", help="(child) unpacked rows")
    p.add_argument("--linear-kernel", default="auto", help="(child) TransformersBackend linear_kernel")
    p.add_argument("--child", choices=("ours", "trl"))
    p.add_argument("--skip-bf16", action="store_true")
    p.add_argument("--skip-torch-linear", action="store_true", help="skip ours with torch's own fp32 linear (MKL)")
    args = p.parse_args()
    if args.child:
        res = child_ours(args) if args.child == "ours" else child_trl(args)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    import numpy as np
    import torch

    kept, _, n_rejected = load_rows(args.rows, args.max_length)
    from scorers.backend import kept_view

    trl_tokens = 0
    for r in kept.to_list():
        for side in ("chosen_ids", "rejected_ids"):
            v = kept_view(len(r["prompt_ids"]), len(r[side]), args.max_length, "keep_start")
            trl_tokens += v.n_prompt(len(r["prompt_ids"])) + v.n_completion
    n = len(kept)
    from scorers.onednn import onednn_linear_available

    peak32_torch = matmul_peak("float32")
    peak32_onednn = matmul_peak("float32", "onednn") if onednn_linear_available() else 0.0
    peak32, peak16 = max(peak32_torch, peak32_onednn), matmul_peak("bfloat16")
    body, head = model_params()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; matmul peak fp32 {peak32:.0f} GFLOP/s "
          f"(torch F.linear {peak32_torch:.0f}, oneDNN {peak32_onednn:.0f}), bf16 {peak16:.0f} GFLOP/s")
    print(f"rows: {n} orca pairs scored ({n_rejected} prompt_too_long), max_length {args.max_length}, "
          f"{trl_tokens} TRL-equivalent real tokens")
    results = {"trl": run_child("trl", args, []), "ours": run_child("ours", args, [])}
    if not args.skip_torch_linear:
        results["ours_mkl"] = run_child("ours", args, ["--linear-kernel", "torch"])
    if not args.skip_bf16:
        results["ours_bf16"] = run_child("ours", args, ["--dtype", "bfloat16"])
    trl = results["trl"]
    ref = np.array(trl["chosen"] + trl["rejected"])
    for name, r in results.items():
        flops = 2 * (body * r["tokens_computed"] + head * r["head_positions"])
        if name == "trl":
            flops = 2 * (body + head) * (r["tokens_computed"] + r["padding"])
        peak = peak16 if name.endswith("bf16") else peak32
        diff = np.abs(np.array(r["chosen"] + r["rejected"]) - ref)
        r.update(pairs_per_s=n / r["seconds"], tokens_per_s=trl_tokens / r["seconds"],
                 peak_fraction=flops / r["seconds"] / 1e9 / peak, max_diff=float(diff.max()),
                 mean_diff=float(diff.mean()))
        print(f"{name:10s} {r['seconds']:8.1f} s  {r['pairs_per_s']:.3f} pairs/s  {r['tokens_per_s']:7.1f} tok/s  "
              f"x{trl['seconds'] / r['seconds']:.2f} vs TRL  computed {r['tokens_computed']} tok + "
              f"{r['padding']} pad  {100 * r['peak_fraction']:.0f}% of matmul peak  peak RSS "
              f"{r['peak_rss_mb']:.0f} MB  |diff| vs TRL max {r['max_diff']:.2e} mean {r['mean_diff']:.2e}")


if __name__ == "__main__":
    main()
