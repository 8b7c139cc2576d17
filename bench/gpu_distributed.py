"""GPU check of stepwise DPO under ``accelerate launch``: DDP, FSDP2 and DeepSpeed ZeRO-3 against one process.

    python bench/gpu_distributed.py --gpus 2 --out /tmp/gpu-distributed          # every launcher, both checks
    python bench/gpu_distributed.py --launchers fsdp --ref-modes live --skip-callback

For every launcher (``examples/configs/accelerate_{ddp,fsdp,zero3}.yaml``) and reference mode: ``sdpo train`` with
N processes at per-device batch B, against ``sdpo train`` in 1 process at batch N×B (the same global batch); prints
each run's wall time, optimizer steps per stepwise step, per-step mean loss and the largest weight difference of
M(T) from the 1-process run, and checks the run folder holds each step once. Then the drop-in callback
(``tests/distributed_worker.py``, job ``callback``) under each launcher against 1 process: optimizer steps that never
mix chunks on any process, refreshes at the same global steps, and the reference equal to the policy (read back
whole) on every process after every refresh. With one GPU (N = 1) nothing is split, but FSDP and ZeRO-3 still take
their own code paths (M(t) read back from ``step_t/``; the refresh of sharded parameters).

All runs are fp32 (TF32 off), so the 1-process and N-process runs agree to rounding. Exit status 1 if a check fails.
Needs CUDA GPUs; ZeRO-3 needs ``pip install deepspeed`` (skipped with a note otherwise). ``--dry-run`` only checks
the arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LAUNCHERS = ("ddp", "fsdp", "zero3")
CLI = [sys.executable, "-m", "sdpo_cli.main", "train"]


def build_partition(out: Path, model: str, rows: int, chunks: int, max_length: int, global_batch: int) -> Path:
    """The first rows of the bundled real data, tokenized by the model's tokenizer, in random-order chunks whose
    sizes are multiples of the global batch (else the last step of a chunk differs: 1 process trains on fewer rows,
    N processes repeat rows from the chunk's start, as accelerate evens batches)."""
    from partitioner import PartitionConfig, partition_preferences
    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from partitioner.run import BUNDLED_INPUTS
    from scorers.models import load_tokenizer

    data = load_preferences(dict(s.split("=", 1) for s in BUNDLED_INPUTS))
    kept, _ = tokenize_preferences(data.select(range(min(rows, len(data)))), load_tokenizer(model),
                                   TokenizeConfig(max_length))
    kept = kept.select(range(len(kept) // (chunks * global_batch) * chunks * global_batch))
    return partition_preferences(kept, out, PartitionConfig(order="random", chunks=chunks, seed=1), progress=False)


def launcher_command(launcher: str | None, processes: int) -> list[str]:
    if launcher is None:
        return [sys.executable]
    config = REPO / "examples" / "configs" / f"accelerate_{launcher}.yaml"
    return ["accelerate", "launch", "--config_file", str(config), "--num_processes", str(processes)]


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - started


def train_flags(part: Path, model: str, out: Path, mode: str, per_device: int, max_length: int) -> list[str]:
    return [str(part), "--model_name_or_path", model, "--output_dir", str(out), "--ref_mode", mode,
            "--per_device_train_batch_size", str(per_device), "--learning_rate", "1e-5", "--max_length",
            str(max_length), "--bf16", "false", "--tf32", "false", "--report_to", "none", "--logging_steps", "1",
            "--num_train_epochs", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "7",
            "--gradient_checkpointing", "false"]


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def driver_checks(args, part: Path, launchers: list[str], failures: list[str]) -> list[dict]:
    rows = []
    for mode in args.ref_modes:
        runs = {"1proc": (None, 1, args.per_device * args.gpus)}
        runs.update({name: (name, args.gpus, args.per_device) for name in launchers})
        for name, (launcher, processes, per_device) in runs.items():
            out = args.out / "driver" / f"{name}-{mode}"
            cmd = launcher_command(launcher, processes)
            cmd += (["-m", "sdpo_cli.main", "train"] if launcher else CLI[1:]) + train_flags(
                part, args.model, out, mode, per_device, args.max_length)
            rc, seconds = run(cmd, args.out / f"driver-{name}-{mode}.log")
            row = {"check": "driver", "launcher": name, "ref_mode": mode, "processes": processes, "rc": rc,
                   "seconds": round(seconds, 1)}
            if rc == 0:
                steps = json.loads((out / "steps.json").read_text())["steps"]
                row["optimizer_steps"] = [s["optimizer_steps"] for s in steps]
                row["loss"] = [round(s["trl"].get("loss", float("nan")), 6) for s in steps]
                final = out / f"step_{len(steps)}"
                if name != "1proc":
                    base = args.out / "driver" / f"1proc-{mode}"
                    row["max_weight_diff"] = max_weight_difference(final, base / f"step_{len(steps)}")
                    base_steps = json.loads((base / "steps.json").read_text())["steps"]
                    if row["optimizer_steps"] != [s["optimizer_steps"] for s in base_steps]:
                        failures.append(f"{name}/{mode}: optimizer steps differ from 1 process")
                    base_loss = [s["trl"].get("loss", float("nan")) for s in base_steps]
                    if any(abs(a - b) > args.loss_tolerance for a, b in zip(row["loss"], base_loss, strict=True)):
                        failures.append(f"{name}/{mode}: per-step losses {row['loss']} vs 1 process {base_loss}")
                    if row["max_weight_diff"] > args.weight_tolerance:
                        failures.append(f"{name}/{mode}: weights differ by {row['max_weight_diff']:.3g}")
                log = (args.out / f"driver-{name}-{mode}.log").read_text()
                if log.count("wrote ") != 1:
                    failures.append(f"{name}/{mode}: 'wrote' printed {log.count('wrote ')} times")
            else:
                failures.append(f"{name}/{mode}: exit status {rc} (log {args.out}/driver-{name}-{mode}.log)")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def callback_checks(args, part: Path, launchers: list[str], failures: list[str]) -> list[dict]:
    """The drop-in callback, 2 rows per optimizer step per process and accumulation 2, against 1 process."""
    worker = REPO / "tests" / "distributed_worker.py"
    gpu = {"use_cpu": False, "bf16": False, "tf32": False, "learning_rate": 1e-5, "max_length": args.max_length,
           "gradient_accumulation_steps": 2}
    reports, rows = {}, []
    for name, launcher, processes, per_device in [("1proc", None, 1, args.per_device * args.gpus)] + [
            (n, n, args.gpus, args.per_device) for n in launchers]:
        folder = args.out / "callback" / name
        folder.mkdir(parents=True, exist_ok=True)
        job = {"job": "callback", "model": args.model, "partition": str(part), "output_dir": str(folder / "run"),
               "results": str(folder / "results"),
               "configs": [["cb", {**gpu, "per_device_train_batch_size": per_device}]]}
        (folder / "job.json").write_text(json.dumps(job))
        cmd = launcher_command(launcher, processes) + [str(worker), str(folder / "job.json")]
        rc, seconds = run(cmd, args.out / f"callback-{name}.log")
        row = {"check": "callback", "launcher": name, "processes": processes, "rc": rc, "seconds": round(seconds, 1)}
        if rc != 0:
            failures.append(f"callback/{name}: exit status {rc} (log {args.out}/callback-{name}.log)")
        else:
            reports[name] = [json.loads(p.read_text())["cb"] for p in sorted((folder / "results").glob("rank*"))]
            first = reports[name][0]
            chunk_of = first["chunk_of_row"]
            pure = all(len({chunk_of[i] for i in rows}) == 1 for r in reports[name] for rows in r["step_rows"])
            refreshed = all(c[1] for r in reports[name] for c in r["checks"])
            row.update(refresh_steps=first["refresh_steps"], chunk_pure=pure, reference_equals_policy=refreshed)
            if not (pure and refreshed):
                failures.append(f"callback/{name}: chunk-pure {pure}, reference == policy {refreshed}")
            if name != "1proc" and "1proc" in reports and first["refresh_steps"] != reports["1proc"][0]["refresh_steps"]:
                failures.append(f"callback/{name}: refresh steps differ from 1 process")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--per-device", type=int, default=2, help="per-device batch of the N-process runs")
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    p.add_argument("--ref-modes", nargs="+", default=["live", "precomputed"], choices=["live", "precomputed", "peft"])
    p.add_argument("--weight-tolerance", type=float, default=1e-4)
    p.add_argument("--loss-tolerance", type=float, default=1e-4)
    p.add_argument("--skip-callback", action="store_true")
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu-distributed"))
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print them as JSON, run nothing")
    args = p.parse_args()
    if args.dry_run:
        print(json.dumps(vars(args), default=str))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: this check needs one (tests/test_distributed.py covers 2 CPU processes)")
        return 1
    launchers = list(args.launchers)
    if "zero3" in launchers and importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed: ZeRO-3 skipped (pip install deepspeed)")
        launchers.remove("zero3")
    args.out.mkdir(parents=True, exist_ok=True)
    part = build_partition(args.out / "partition", args.model, args.rows, args.chunks, args.max_length,
                           args.per_device * args.gpus)
    print(json.dumps({"gpus": args.gpus, "device": torch.cuda.get_device_name(0), "partition": str(part)}))
    failures: list[str] = []
    driver_checks(args, part, launchers, failures)
    if not args.skip_callback:
        callback_checks(args, part, launchers, failures)
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
