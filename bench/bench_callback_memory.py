"""Benchmark: peak memory of the drop-in stepwise callback with and without a reference model, and of TRL's own
precomputed reference.

Three arms, each a stock TRL ``DPOTrainer`` in its own child process, on the same real rows (the first ``--pairs``
of orca_dpo_pairs and of LLaMA-Factory dpo_en_demo, conversational, cut at ``--max-length``, in ``--chunks`` chunks
of consecutive rows), model (bundled SmolLM2-135M-Instruct, fp32, full fine-tuning), DPOConfig and seed:

* ``live``: ``StepwiseReferenceCallback`` with a frozen copy of the model as ``ref_model``, hard-refreshed at each
  chunk boundary;
* ``scored``: the callback with ``StepwiseConfig(ref_mode="precomputed")``, ``ref_model=None`` and
  ``precompute_ref_log_probs=True``: no reference model; TRL's one-time pass gives chunk 1's reference (M0), and
  the callback scores each next chunk with the policy at its boundary;
* ``trl_precompute``: TRL's own ``precompute_ref_log_probs=True`` and no callback: its one-time pass with M0, which
  stays the reference of every row (not stepwise), TRL's own shuffled order.

Peak memory: the child's peak RSS (``resource.getrusage``; model, reference, AdamW state, activations and all), and
``torch.cuda.max_memory_allocated`` when the run is on CUDA. Losses: TRL's logged loss of every optimizer step;
``live`` and ``scored`` train the same rows in the same order and must agree to rounding.

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_callback_memory.py [--pairs 6] [--chunks 3] \\
        [--max-length 256] [--batch 2]
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

from bench_training import load_rows  # noqa: E402 - bench/ is this script's own folder

ARMS = ("live", "scored", "trl_precompute")


def child(arm: str, a) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.reference import frozen_copy

    rows = load_rows(a.pairs, a.max_length)
    per_chunk = -(-len(rows) // a.chunks)
    train = concatenate_chunks([Dataset.from_list(rows[i:i + per_chunk]) for i in range(0, len(rows), per_chunk)])
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    policy = load_causal_lm("bundled")
    live = arm == "live"
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, learning_rate=a.lr,
                     max_length=a.max_length, bf16=False, use_cpu=not cuda, report_to=[], num_train_epochs=1,
                     gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                     precompute_ref_log_probs=not live)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=frozen_copy(policy) if live else None, args=args,
                         train_dataset=train, processing_class=load_tokenizer("bundled"))
    init_s = time.perf_counter() - t0
    cb = None
    if arm != "trl_precompute":
        cb = StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="live" if live else "precomputed"))
        cb.install(trainer)
    t0 = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"arm": arm, "losses": [h["loss"] for h in logs], "steps": trainer.state.global_step,
            "init_s": init_s, "train_s": time.perf_counter() - t0, "ref_model": trainer.ref_model is not None,
            "refresh_steps": cb.refresh_steps if cb else [], "refresh_s": cb.refresh_seconds if cb else [],
            "chunk_sizes": cb.chunk_sizes if cb else None, "device": "cuda" if cuda else "cpu",
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def spawn(arm: str, a) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k != "child"]
    done = subprocess.run([sys.executable, __file__, "--child", arm, *flags], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    result = next((ln[len("RESULT "):] for ln in reversed(done.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if done.returncode or result is None:
        raise SystemExit(f"{arm} run failed:\n{done.stderr[-3000:]}")
    return json.loads(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=6, help="rows per source (orca, LLaMA-Factory en)")
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="per_device_train_batch_size")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--child", choices=ARMS)
    a = p.parse_args()
    if a.pairs < 1 or a.batch < 1 or a.max_length < 2 or not 1 <= a.chunks <= 2 * a.pairs:
        p.error("need positive --pairs, --batch, --max-length and 1 <= --chunks <= 2 x --pairs")
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a)))
        return

    import torch

    t0 = time.perf_counter()
    runs = {}
    for arm in ARMS:
        runs[arm] = spawn(arm, a)
        r = runs[arm]
        print(f"{arm}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['steps']} steps, train {r['train_s']:.1f} s", flush=True)
    print(json.dumps(runs, indent=1))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {runs['live']['device']}; bench wall {time.perf_counter() - t0:.0f} s")
    print(f"rows: {2 * a.pairs} real pairs (orca + LLaMA-Factory en) in chunks of {runs['live']['chunk_sizes']}, "
          f"SmolLM2-135M-Instruct fp32, max_length {a.max_length}, batch {a.batch}, lr {a.lr}, 1 epoch")
    cuda = runs["live"]["cuda_peak_mib"] is not None
    for arm in ARMS:
        r = runs[arm]
        gpu = f"  CUDA peak {r['cuda_peak_mib']:7.0f} MiB" if cuda else ""
        print(f"{arm:15s} peak RSS {r['peak_rss_mib']:7.0f} MiB{gpu}  reference model in memory: {r['ref_model']!s:5s}"
              f"  trainer init {r['init_s']:5.1f} s  train {r['train_s']:6.1f} s  reference moves at steps "
              f"{r['refresh_steps']} ({sum(r['refresh_s']):.2f} s)  losses {[round(x, 6) for x in r['losses']]}")
    base = runs["live"]
    for arm in ("scored", "trl_precompute"):
        r = runs[arm]
        gpu = f"; CUDA peak {r['cuda_peak_mib'] / base['cuda_peak_mib']:.3f}x" if cuda else ""
        print(f"{arm} / live: peak RSS {r['peak_rss_mib'] / base['peak_rss_mib']:.3f}x "
              f"({r['peak_rss_mib'] - base['peak_rss_mib']:+.0f} MiB){gpu}")
    r, t = runs["scored"], runs["trl_precompute"]
    print(f"scored / trl_precompute: peak RSS {r['peak_rss_mib'] / t['peak_rss_mib']:.3f}x "
          f"({r['peak_rss_mib'] - t['peak_rss_mib']:+.0f} MiB)")
    pairs = list(zip(runs["scored"]["losses"], base["losses"], strict=True))
    diff = max(abs(x - y) for x, y in pairs)
    same = all(abs(x - y) <= 1e-4 * max(abs(y), 1e-2) for x, y in pairs)
    print(f"losses scored vs live: max abs difference {diff:.2e} over {len(pairs)} steps (equal within 1e-4 relative: "
          f"{same}; the reference log-probs of chunks 2.. come from the scorer, not TRL's padded forward)")
    print("trl_precompute keeps M0 as the reference of every row (not stepwise) and draws TRL's own shuffled order, "
          "so its losses are not expected to match the stepwise arms")


if __name__ == "__main__":
    main()
