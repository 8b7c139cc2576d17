"""Benchmark: optimizer-step time and peak RSS of PackedDPOTrainer vs TRL's own DPOTrainer (live reference).

Same model (bundled SmolLM2-135M-Instruct, fp32, full fine-tuning), same real rows (the first ``--pairs`` of
orca_dpo_pairs and of LLaMA-Factory dpo_en_demo, conversational, cut at ``--max-length``), same DPOConfig, batch and
seed; a frozen copy of the model as ``ref_model`` in both. Each contender runs in its own child process, alternating
(TRL, ours, TRL, ours, ...); the first optimizer step of each run is a warm-up and not timed; peak RSS is the
child's (model, reference, optimizer state and all).

Figures: mean optimizer-step time, the step throughput ratio, real tokens/s (TRL-equivalent: every row's prompt and
completion tokens as the collator keeps them, the prompt counted per side, padding not counted: the same count for
both), and the share of the machine's fp32 matmul peak. FLOPs = 2 x matmul parameters x positions computed: the
transformer body on every position a forward runs (TRL: 2B padded rows; ours: the packed lines), x3 for the
policy (forward, backward) and x1 for the reference; the LM head on the positions it runs at (TRL's fused head on
CPU: every position; ours: the completion positions), x4 for the policy (forward, the backward's recomputation, two
gradient products) and x1 for the reference. Attention scores are not counted.

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_training.py [--pairs 12] [--max-length 512] [--batch 4]
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

from bench_scoring import matmul_peak, model_params  # noqa: E402 - bench/ is this script's own folder


def load_rows(pairs: int, max_length: int) -> list[dict]:
    """The first ``pairs`` rows of each source that TRL keeps at ``max_length`` (conversational)."""
    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.models import load_tokenizer

    data = REPO.parent / "shared" / "data"
    tok = load_tokenizer("bundled")
    rows = []
    for f in (data / "orca_dpo_pairs" / "validation.jsonl", data / "llamafactory_demo" / "dpo_en_demo.json"):
        kept, _ = tokenize_preferences(load_preferences([f]).select(range(4 * pairs)), tok, TokenizeConfig(max_length))
        rows += kept.select(range(pairs)).select_columns(["prompt", "chosen", "rejected"]).to_list()
    return rows


class StepTimer:
    """A ``TrainerCallback`` (built lazily: transformers is imported in the child only) timing each optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.seconds, self._t0 = [], None

            def on_step_begin(self, args, state, control, **kw):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.seconds.append(time.perf_counter() - self._t0)

        return _Timer()


def child(which: str, a) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer
    from trainer_plugin.packed import PackedDPOTrainer
    from trainer_plugin.packed_batch import pack_collated
    from trainer_plugin.reference import frozen_copy

    rows = load_rows(a.pairs, a.max_length)
    torch.manual_seed(0)
    policy = load_causal_lm("bundled")
    ref = frozen_copy(policy)
    counts = {"real": 0, "body": 0, "head": 0, "ref_body": 0, "ref_head": 0}
    base = PackedDPOTrainer if which == "ours" else DPOTrainer

    class Counted(base):
        def compute_loss(self, model, inputs, *args, **kwargs):
            real = int(inputs["attention_mask"].sum())
            counts["real"] += real
            if which == "ours":
                packed = pack_collated(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                                       None, "cpu")
                body, head = packed.tokens, packed.n_targets
            else:
                body, head = inputs["input_ids"].numel(), inputs["input_ids"].numel() - len(inputs["input_ids"])
            counts["body"] += body
            counts["head"] += head
            return super().compute_loss(model, inputs, *args, **kwargs)

    timer = StepTimer()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=1e-6, max_length=a.max_length, bf16=False, use_cpu=True, report_to=[],
                     gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = Counted(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=load_tokenizer("bundled"), callbacks=[timer])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": timer.seconds, "counts": counts, "steps": trainer.state.global_step,
            "losses": [h["loss"] for h in logs], "margins": [h["rewards/margins"] for h in logs],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(which: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--pairs", str(a.pairs), "--max-length", str(a.max_length),
           "--batch", str(a.batch), "--steps", str(a.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(run: dict, body_params: int, head_params: int, peak: float) -> dict:
    """Mean step time (first step excluded) and what the timed steps computed."""
    timed = run["step_seconds"][1:]
    share = len(timed) / len(run["step_seconds"])  # counts are over all steps; the steps are alike in size
    c = run["counts"]
    # the reference forward runs on the same positions as the policy's
    flops = share * 2 * ((3 + 1) * body_params * c["body"] + (4 + 1) * head_params * c["head"])
    seconds = sum(timed)
    return {"step_s": seconds / len(timed), "real_tok_s": share * c["real"] / seconds,
            "peak_fraction": flops / seconds / 1e9 / peak, "peak_rss_mib": run["peak_rss_mib"],
            "positions_per_step": c["body"] / run["steps"], "head_positions_per_step": c["head"] / run["steps"],
            "real_tokens_per_step": c["real"] / run["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=12, help="rows per source (orca, LLaMA-Factory en)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (pairs per optimizer step)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first one is not timed)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each contender; the fastest is kept")
    p.add_argument("--child")
    a = p.parse_args()
    if a.steps < 2 or a.batch < 1 or a.pairs < 1 or a.repeats < 1 or a.max_length < 2:
        p.error("need --steps >= 2 and positive --batch, --pairs, --repeats, --max-length")
    if a.steps * a.batch > 2 * a.pairs:
        p.error(f"--steps x --batch = {a.steps * a.batch} pairs but only {2 * a.pairs} rows (2 x --pairs): no epoch "
                "boundary inside the run, please")
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)))
        return

    import torch

    peak_torch, peak_onednn = matmul_peak("float32"), matmul_peak("float32", "onednn")
    peak = max(peak_torch, peak_onednn)
    runs: dict[str, list[dict]] = {"trl": [], "ours": []}
    for i in range(a.repeats):
        for which in ("trl", "ours"):
            runs[which].append(spawn(which, a))
            print(f"{which} run {i}: steps {[round(s, 2) for s in runs[which][-1]['step_seconds']]} s, peak RSS "
                  f"{runs[which][-1]['peak_rss_mib']:.0f} MiB", flush=True)
    body, head = model_params()
    best = {w: min(rs, key=lambda r: sum(r["step_seconds"][1:])) for w, rs in runs.items()}
    s = {w: summarise(r, body, head, peak) for w, r in best.items()}
    print(json.dumps({"runs": runs, "summary": s}, indent=1))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s (torch F.linear {peak_torch:.0f}, "
          f"oneDNN {peak_onednn:.0f}; training runs torch's)")
    print(f"rows: {2 * a.pairs} real pairs (orca + LLaMA-Factory en), max_length {a.max_length}, batch {a.batch}, "
          f"{a.steps} optimizer steps per run (first not timed), best of {a.repeats} alternating runs")
    for w in ("trl", "ours"):
        r = s[w]
        print(f"{w:5s} step {r['step_s']:6.2f} s  {r['real_tok_s']:6.1f} real tok/s  "
              f"{100 * r['peak_fraction']:4.1f}% of fp32 peak  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
              f"positions/step {r['positions_per_step']:.0f} (LM head {r['head_positions_per_step']:.0f}), real "
              f"tokens/step {r['real_tokens_per_step']:.0f}")
    ratio = s["trl"]["step_s"] / s["ours"]["step_s"]
    print(f"step throughput: ours {ratio:.2f}x TRL (goal >= 1.4x); peak RSS ours - TRL = "
          f"{s['ours']['peak_rss_mib'] - s['trl']['peak_rss_mib']:+.0f} MiB (goal <= 0)")
    same = [abs(x - y) <= 1e-4 * max(abs(x), 1e-2) for x, y in zip(best["trl"]["losses"], best["ours"]["losses"])]
    print(f"logged losses equal within 1e-4: {all(same)} (TRL {best['trl']['losses']}, ours {best['ours']['losses']})")


if __name__ == "__main__":
    main()
