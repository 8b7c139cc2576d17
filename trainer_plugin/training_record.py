"""A training run's record: the run folder's file names and ``steps.json`` as a table.

The run folder (CONTRACTS.md section 4) is written by :mod:`trainer_plugin.run_folder`; its names are defined
here, once. This module imports no torch or TRL (``trainer_plugin/__init__.py`` imports nothing), so ``sdpo stats
RUN`` reads a run without loading the trainer.
"""

from __future__ import annotations

from sdpo_core.errors import UserError

STEPS_FILE = "steps.json"  # per-step record: reference statistics, TRL metrics; rewritten after every step
RUN_FILE = "run.json"  # what identifies the run (a rerun into the folder must match it)
STEP_DIR = "step_{t}"  # M(t) of step t (or its LoRA adapter), with the step's marker
STEP_MARKER = "_COMPLETE"  # a step's completion marker, written last: the step's record


def steps_frame(data: dict):
    """One row per stepwise-DPO step of a ``steps.json`` record: γ_ref and reward accuracy of M(t-1), TRL metrics."""
    import polars as pl

    if not isinstance(data, dict) or not isinstance(data.get("steps", []), list):
        raise UserError("steps.json is not a training record (no list of steps)")
    rows = []
    for s in data.get("steps", []):
        ref = s.get("reference") or {}
        row = {"step": s["step"], "rows": s.get("rows"), "ref_mode": s.get("ref_mode"),
               "optimizer_steps": s.get("optimizer_steps"), "train_loss": s.get("train_loss")}
        for where in ("chunk", "held_out"):
            row[f"gamma_ref_{where}"] = (ref.get(where) or {}).get("mean_margin")
            row[f"ref_reward_accuracy_{where}"] = (ref.get(where) or {}).get("reward_accuracy")
        for key, value in (s.get("trl") or {}).items():
            if key.startswith("rewards/") and isinstance(value, (int, float)):
                row[key] = value
        rows.append(row)
    final = (data.get("final") or {}).get("held_out")
    if final:
        rows.append({"step": None, "gamma_ref_held_out": final.get("mean_margin"),
                     "ref_reward_accuracy_held_out": final.get("reward_accuracy"), "ref_mode": "final M(T)"})
    return pl.DataFrame(rows)
