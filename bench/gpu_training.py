"""GPU benchmark of the training step: PackedDPOTrainer vs TRL's own DPOTrainer, bf16 on CUDA (live reference).

The GPU variant of ``bench/bench_training.py``: same real rows (orca + LLaMA-Factory en, conversational), same
DPOConfig, batch and seed, each contender in its own child process (alternating), the first ``--warmup`` optimizer
steps not timed. Reports mean optimizer-step time, the step throughput ratio, real tokens/s (TRL-equivalent: prompt
counted per side, no padding), the share of the GPU's bf16 matmul peak (measured first, ``torch.matmul`` on large
squares) and peak GPU memory (``torch.cuda.max_memory_allocated``). On CUDA TRL's fused LM head (Triton) runs only
at completion positions too, so the packed gain there is the shared prompt and the absent padding.

    python bench/gpu_training.py --model bundled --max-length 1024 --batch 8 --steps 8
    python bench/gpu_training.py --model /path/to/7b --batch 4 --gradient-checkpointing --packed-batch-tokens 16384
    python bench/gpu_training.py --packed-attention loop   # ours with the per-pair SDPA loop (before issue 24)

Needs a CUDA GPU; ``--help`` and the argument checks (``--dry-run``: print the parsed arguments, run nothing) run
anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_scoring import matmul_params  # noqa: E402 - bench/ is this script's own folder
from gpu_vllm import gpu_matmul_peak  # noqa: E402
from scorers.flex_attention import KERNELS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", help="a local model folder, hub id or 'bundled' (SmolLM2-135M)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="training precision (bf16/fp16: mixed precision via DPOConfig, weights in fp32)")
    p.add_argument("--pairs", type=int, default=48, help="rows per source (orca, LLaMA-Factory en)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first optimizer steps not timed")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each contender; the fastest is kept")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--packed-batch-tokens", type=int, default=None, help="PackedDPOTrainer's token budget")
    p.add_argument("--packed-attention", default="auto", choices=KERNELS,
                   help="ours: the packed layout's attention (packed_attention; auto = compiled FlexAttention "
                        "on CUDA, one kernel per layer; loop = per-pair SDPA, the path before issue 24)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print them as JSON, run nothing")
    p.add_argument("--child", choices=("trl", "ours"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if min(a.pairs, a.batch, a.repeats, a.max_length) < 1 or a.warmup < 0:
        p.error("--pairs, --batch, --repeats and --max-length must be positive, --warmup not negative")
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must be larger than --warmup ({a.warmup})")
    if a.steps * a.batch > 2 * a.pairs:
        p.error(f"--steps x --batch = {a.steps * a.batch} pairs, more than the {2 * a.pairs} rows (2 x --pairs)")
    if a.packed_batch_tokens is not None and a.packed_batch_tokens < 1:
        p.error("--packed-batch-tokens must be >= 1")
    return a


def load_rows(model: str, pairs: int, max_length: int) -> list[dict]:
    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.models import load_tokenizer

    data = REPO.parent / "shared" / "data"
    tok = load_tokenizer(model)
    rows = []
    for f in (data / "orca_dpo_pairs" / "validation.jsonl", data / "llamafactory_demo" / "dpo_en_demo.json"):
        kept, _ = tokenize_preferences(load_preferences([f]).select(range(min(4 * pairs, 280))), tok,
                                       TokenizeConfig(max_length))
        rows += kept.select(range(min(pairs, len(kept)))).select_columns(["prompt", "chosen", "rejected"]).to_list()
    return rows


def child(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer
    from trainer_plugin.packed import PackedDPOTrainer
    from trainer_plugin.packed_batch import pack_collated
    from trainer_plugin.reference import frozen_copy

    counts = {"real": 0, "body": 0, "head": 0}
    ours = a.child == "ours"

    class Counted(PackedDPOTrainer if ours else DPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counts["real"] += int(inputs["attention_mask"].sum())
            completion = int(inputs["completion_mask"][:, 1:].sum())
            if ours:
                counts["body"] += pack_collated(inputs["input_ids"], inputs["attention_mask"],
                                                inputs["completion_mask"], None, "cpu").tokens
            else:
                counts["body"] += inputs["input_ids"].numel()
            counts["head"] += completion  # TRL's Triton head is compact on CUDA too
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Timer(TrainerCallback):
        seconds: list = []

        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)

    rows = load_rows(a.model, a.pairs, a.max_length)
    torch.manual_seed(0)
    policy = load_causal_lm(a.model, dtype="float32", device="cuda")
    ref = frozen_copy(policy)
    timer = Timer()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=1e-6, max_length=a.max_length, bf16=a.dtype == "bfloat16",
                     fp16=a.dtype == "float16", report_to=[], gradient_checkpointing=a.gradient_checkpointing,
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    extra = {"packed_batch_tokens": a.packed_batch_tokens, "packed_attention": a.packed_attention} if ours else {}
    trainer = Counted(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=load_tokenizer(a.model), callbacks=[timer], **extra)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": timer.seconds, "counts": counts, "steps": trainer.state.global_step,
            "losses": [h["loss"] for h in logs], "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def spawn(which: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", which], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.dry_run:
        print(json.dumps(vars(a)))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_training.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return
    from scorers.models import resolve_model_path

    body, head = matmul_params(str(resolve_model_path(a.model)))
    peak = gpu_matmul_peak(getattr(torch, a.dtype))
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; {a.dtype} matmul peak {peak:.0f} TFLOP/s")
    runs: dict[str, list[dict]] = {"trl": [], "ours": []}
    for i in range(a.repeats):
        for which in ("trl", "ours"):
            runs[which].append(spawn(which, argv))
            print(f"{which} run {i}: steps {[round(s, 3) for s in runs[which][-1]['step_seconds']]} s", flush=True)
    summary = {}
    for which, rs in runs.items():
        r = min(rs, key=lambda r: sum(r["step_seconds"][a.warmup:]))
        timed = r["step_seconds"][a.warmup:]
        share, c = len(timed) / len(r["step_seconds"]), r["counts"]
        flops = share * 2 * (4 * body * c["body"] + 5 * head * c["head"])  # policy fwd+bwd (x3, x4), reference x1
        summary[which] = {"step_s": sum(timed) / len(timed), "real_tok_s": share * c["real"] / sum(timed),
                          "peak_fraction": flops / sum(timed) / 1e12 / peak, "peak_gpu_mib": r["peak_gpu_mib"],
                          "losses": r["losses"]}
        s = summary[which]
        print(f"{which:5s} step {s['step_s']:7.3f} s  {s['real_tok_s']:9.0f} real tok/s  "
              f"{100 * s['peak_fraction']:5.1f}% of {a.dtype} matmul peak  peak GPU memory {s['peak_gpu_mib']:.0f} MiB")
    print(f"step throughput: ours {summary['trl']['step_s'] / summary['ours']['step_s']:.2f}x TRL; peak GPU memory "
          f"ours - TRL = {summary['ours']['peak_gpu_mib'] - summary['trl']['peak_gpu_mib']:+.0f} MiB")
    print(json.dumps({"args": vars(a), "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
