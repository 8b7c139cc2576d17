"""Stepwise DPO, 2 steps of full fine-tuning of SmolLM2-135M-Instruct on real pairs: our driver (precomputed
reference, scoring of each chunk with M(t-1) included, and the packed training step, ``packing=True``, its default)
vs TRL's live reference (a frozen copy of M(t-1) in memory, TRL's own forward).

Each run is its own subprocess (peak RSS is per process); both use the same partition, DPOConfig and seeds.
Also timed: the reference refresh of each path (our scoring pass; the live copy; the drop-in callback's
in-place hard refresh) against the mean optimizer-step time.

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_stepwise.py [--pairs-per-chunk 8] [--max-length 256]

``--ours-packing false`` runs our driver with TRL's own forward instead (the figure before the packed step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def dpo_args(output_dir, max_length):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-6, max_length=max_length,
        bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, save_strategy="no",
        logging_steps=1, num_train_epochs=1, disable_tqdm=True, seed=0,
    )


def make_partition(out: Path, pairs_per_chunk: int, max_length: int) -> tuple[Path, float]:
    """A fixed real subset (the first short pairs of orca_dpo_pairs and LLaMA-Factory dpo_en_demo), scored with M0
    (SmolLM2, ``sdpo score``) and partitioned easy→hard into 2 chunks, as the sDPO pipeline does.

    Returns the partition and the seconds M0's scoring took (all rows of both chunks).
    """
    from datasets import concatenate_datasets

    from partitioner.data.loading import load_preferences
    from partitioner import PartitionConfig, partition_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from partitioner import ScoringConfig, score_preferences
    from scorers.models import load_tokenizer

    data = REPO.parent / "shared" / "data"
    tok = load_tokenizer("bundled")
    parts = []
    for f in (data / "orca_dpo_pairs" / "validation.jsonl", data / "llamafactory_demo" / "dpo_en_demo.json"):
        kept, _ = tokenize_preferences(load_preferences([f]).select(range(60)), tok, TokenizeConfig(max_length))
        short = [i for i, p in enumerate(kept["prompt_ids"]) if len(p) < max_length // 2]
        parts.append(kept.select(short[:pairs_per_chunk]))
    rows = concatenate_datasets(parts).select_columns(["row_id", "source", "prompt", "chosen", "rejected"])
    t0 = time.perf_counter()
    scored = score_preferences(rows, out.parent / "scored",
                               ScoringConfig(model="bundled", max_length=max_length, progress=False))
    scoring = time.perf_counter() - t0
    return partition_preferences(scored, out, PartitionConfig(chunks=2), progress=False), scoring


def run_ours(partition: Path, out: Path, max_length: int, packing: bool = True) -> dict:
    """Our driver, precomputed reference: chunk t scored with M(t-1) before step t, no reference in memory; the
    packed training step unless ``packing`` is off."""
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    config = StepwiseConfig(ref_mode="precomputed", reuse_partition_scores=True, check_tokenizer=True,
                            packing=packing)
    t0 = time.perf_counter()
    steps = train_stepwise(partition, "bundled", args=dpo_args(out, max_length), config=config)
    total = time.perf_counter() - t0
    return {"seconds": total, "refresh_seconds": [s["ref_refresh_seconds"] for s in steps],
            "reference_source": [s["reference_source"] for s in steps],
            "train_seconds": [s["train_runtime"] for s in steps], "optimizer_steps": [s["optimizer_steps"] for s in steps]}


def run_trl(partition: Path, out: Path, max_length: int) -> dict:
    """Plain TRL: per chunk a DPOTrainer with a live frozen copy of M(t-1) as ref_model."""
    from partitioner import load_partition
    from scorers.models import load_causal_lm, load_tokenizer
    from trainer_plugin.reference import frozen_copy
    from trl import DPOTrainer

    t0 = time.perf_counter()
    tok = load_tokenizer("bundled")
    policy = load_causal_lm("bundled")
    refresh, train = [], []
    steps = []
    for t, chunk in enumerate(load_partition(partition), start=1):
        policy.__dict__.pop("forward", None)  # TRL's fused head patch of the previous trainer
        r0 = time.perf_counter()
        ref = frozen_copy(policy)
        refresh.append(time.perf_counter() - r0)
        args = dpo_args(out / f"step_{t}", max_length)
        args.seed = args.seed + t - 1
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=chunk, processing_class=tok)
        result = trainer.train()
        train.append(result.metrics["train_runtime"])
        steps.append(trainer.state.global_step)
        trainer.save_model(str(out / f"step_{t}"))
        del trainer, ref
    total = time.perf_counter() - t0
    return {"seconds": total, "refresh_seconds": refresh, "train_seconds": train, "optimizer_steps": steps}


def run_hard_refresh() -> dict:
    """Cost of the drop-in callback's in-place refresh (reference <- policy) for SmolLM2-135M."""
    from scorers.models import load_causal_lm
    from trainer_plugin.reference import frozen_copy, hard_refresh

    policy = load_causal_lm("bundled")
    ref = frozen_copy(policy)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        hard_refresh(policy, ref)
        times.append(time.perf_counter() - t0)
    return {"seconds": sorted(times)[len(times) // 2]}


def child(which: str, partition: Path, out: Path, max_length: int, packing: bool) -> None:
    import torch

    torch.manual_seed(0)
    if which == "ours":
        result = run_ours(partition, out, max_length, packing)
    else:
        result = run_trl(partition, out, max_length) if which == "trl" else run_hard_refresh()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(which: str, partition: Path, out: Path, max_length: int, packing: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--partition", str(partition), "--out", str(out),
           "--max-length", str(max_length), "--ours-packing", str(packing).lower()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs-per-chunk", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each path; the fastest is kept")
    p.add_argument("--ours-packing", choices=("true", "false"), default="true",
                   help="our driver's training step: packed (default) or TRL's own forward")
    p.add_argument("--child")
    p.add_argument("--partition")
    p.add_argument("--out")
    a = p.parse_args()
    packing = a.ours_packing == "true"
    if a.child:
        child(a.child, Path(a.partition), Path(a.out), a.max_length, packing)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        part, m0_scoring = make_partition(tmp / "partition", a.pairs_per_chunk, a.max_length)
        runs: dict[str, list[dict]] = {"trl": [], "ours": []}
        for i in range(a.repeats):  # alternate, so a busy spell on the shared machine hits both paths
            for which in ("trl", "ours"):
                runs[which].append(spawn(which, part, tmp / f"{which}-{i}", a.max_length, packing))
                print(f"{which} run {i}: {runs[which][-1]['seconds']:.1f}s", flush=True)
        trl = min(runs["trl"], key=lambda r: r["seconds"])
        ours = min(runs["ours"], key=lambda r: r["seconds"])
        refresh = spawn("refresh", part, tmp / "refresh", a.max_length)
    step_time = sum(ours["train_seconds"]) / sum(ours["optimizer_steps"])
    trl_step_time = sum(trl["train_seconds"]) / sum(trl["optimizer_steps"])
    print(json.dumps({"ours_precomputed": ours, "trl_live": trl, "hard_refresh": refresh}, indent=1))
    print(f"end-to-end time: ours {ours['seconds']:.1f}s vs TRL live {trl['seconds']:.1f}s "
          f"-> {ours['seconds'] / trl['seconds']:.2f}x (goal <= 0.6x; ours {'packed' if packing else 'TRL forward'}); "
          "step 1 reuses M0's scores of the partition")
    print(f"  counting M0's whole scoring pass ({m0_scoring:.1f}s, both chunks) too: "
          f"{(ours['seconds'] + m0_scoring) / trl['seconds']:.2f}x")
    print(f"peak RSS: ours {ours['peak_rss_mib']:.0f} MiB vs TRL live {trl['peak_rss_mib']:.0f} MiB "
          f"-> {trl['peak_rss_mib'] - ours['peak_rss_mib']:.0f} MiB lower (reference weights: ~516 MiB fp32)")
    print(f"optimizer step: ours {step_time:.2f}s, TRL live {trl_step_time:.2f}s")
    print(f"reference refresh per step: ours (scoring chunk with M(t-1)) {ours['refresh_seconds']} s; "
          f"TRL live copy {[round(x, 3) for x in trl['refresh_seconds']]} s; callback hard refresh "
          f"{refresh['seconds']:.3f}s = {100 * refresh['seconds'] / trl_step_time:.1f}% of a TRL step (goal < 2%)")


if __name__ == "__main__":
    main()
