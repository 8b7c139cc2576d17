"""The training run folder (CONTRACTS.md section 4): what a stepwise run writes, and how it resumes.

::

    RUN/run.json               what identifies the run (mode, partition, chunk sizes, seed) + adaptive orders
    RUN/step_t/                M(t) (``save_pretrained`` + tokenizer), or step t's LoRA adapter in 'peft' mode
    RUN/step_t/_COMPLETE       the step's completion marker, written last: its record (also in steps.json)
    RUN/step_t/reference_logps.arrow   'precomputed' mode: the reference log-probs step t trained against
    RUN/steps.json             every completed step's record, and the final held-out statistics

A step is complete when its marker exists; a rerun resumes after the last complete step and removes step folders
without a marker (a step killed half-way).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from partitioner.io import read_json, read_marker, write_json, write_marker
from sdpo_core.columns import ROW_ID
from trainer_plugin.training_record import RUN_FILE, STEP_DIR, STEP_MARKER, STEPS_FILE

from .config import StepwiseInputError

logger = logging.getLogger(__name__)


class RunFolder:
    """A stepwise run's output folder: identity check, completed steps, step records.

    Args:
        path: the run folder (``DPOConfig.output_dir``).
        identity: what identifies the run; a folder holding another run is refused.
        config: recorded in ``run.json`` (not part of the identity).
        write: False on every process but the main one (only it writes files).
    """

    def __init__(self, path, identity: dict, config: dict, write: bool = True):
        self.path, self.write = Path(path), write
        self.run = read_json(self.path / RUN_FILE, "run record") if (self.path / RUN_FILE).exists() else {}
        if self.run and {k: self.run.get(k) for k in identity} != identity:
            raise StepwiseInputError(f"{self.path} holds another stepwise run ({self.path / RUN_FILE}); use a new "
                                     "output_dir")
        self.run = {**identity, "rescored_orders": self.run.get("rescored_orders", {}), "config": config}
        self.completed = self._completed_steps()
        self.records = [read_marker(self.step_dir(t) / STEP_MARKER) for t in self.completed]
        if self.write:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / RUN_FILE, self.run)
            for stray in self.path.glob(STEP_DIR.format(t="*")):
                if stray.is_dir() and not (stray / STEP_MARKER).exists():
                    shutil.rmtree(stray)

    def step_dir(self, t: int) -> Path:
        return self.path / STEP_DIR.format(t=t)

    def _completed_steps(self) -> list[int]:
        done = sorted(int(p.parent.name.split("_")[1]) for p in self.path.glob(f"{STEP_DIR.format(t='*')}/"
                                                                                 f"{STEP_MARKER}")
                      if read_marker(p) is not None)
        if done != list(range(1, len(done) + 1)):
            raise StepwiseInputError(f"{self.path}: completed steps {done} are not 1..k; remove the stray step "
                                     "folders")
        return done

    @property
    def rescored_orders(self) -> dict:
        return self.run["rescored_orders"]

    def resumed_order(self, chunks: list) -> list:
        """``chunks`` in the order the run trains them after its completed steps: the adaptive orders recorded
        after those steps re-created (an order recorded after a step that did not complete is ignored)."""
        from datasets import concatenate_datasets

        for t, orders in sorted((int(t), o) for t, o in self.rescored_orders.items()):
            if t <= len(self.completed):
                pool = concatenate_datasets(chunks[t:])
                where = {rid: i for i, rid in enumerate(pool[ROW_ID])}
                chunks = list(chunks[:t]) + [pool.select([where[r] for r in ids]) for ids in orders]
        return chunks

    def record_order(self, t: int, orders: list[list[str]]) -> None:
        """Record the adaptive order of the chunks after step ``t``."""
        self.run["rescored_orders"][str(t)] = orders
        if self.write:
            write_json(self.path / RUN_FILE, self.run)

    def complete_step(self, t: int, record: dict) -> None:
        """Step ``t``'s marker (its record), then ``steps.json`` with every record so far."""
        self.records.append(record)
        if self.write:
            write_marker(self.step_dir(t) / STEP_MARKER, record)
            write_json(self.path / STEPS_FILE, {"steps": self.records})

    def finish(self, final: dict, ref_mode: str) -> None:
        if self.write:
            write_json(self.path / STEPS_FILE, {"steps": self.records, "final": final, "ref_mode": ref_mode})


def load_step_model(output_dir, step: int, base_model: str, dtype: str = "float32"):
    """M(step) of a finished run: the saved model of that step, or (LoRA runs) base + merged adapters 1..step."""
    from scorers.models import load_causal_lm

    from .ref_modes import merge_adapter

    out = Path(output_dir)
    run = read_json(out / RUN_FILE, "run record")
    if run["ref_mode"] != "peft":
        return load_causal_lm(str(out / STEP_DIR.format(t=step)), dtype=dtype)
    model = load_causal_lm(base_model, dtype=dtype)
    for s in range(1, step + 1):
        model = merge_adapter(model, out / STEP_DIR.format(t=s))
    return model
