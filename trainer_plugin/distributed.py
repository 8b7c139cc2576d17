"""The stepwise driver under several processes (``torchrun``, ``accelerate launch``: DDP, FSDP, DeepSpeed).

Every process runs the same driver; what must happen once happens here:

* only the main process writes files (:class:`~trainer_plugin.run_folder.RunFolder` ``write=``); the trainers'
  own saves are already main-only (``TrainingArguments.should_save``);
* every process resumes after the same step: the main process reads (and cleans) the run folder first, the
  others read it after it, and the completed steps each one saw are compared;
* the driver's scoring passes (the ``precomputed`` reference, γ_ref on the chunk and the held-out pairs, the
  adaptive re-scoring) are split by rows: each process scores every ``count``-th row and the results are gathered
  in input order, so every process holds the same columns and statistics.

Nothing here imports torch at module level; with one process every function is a no-op pass-through.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

from .config import StepwiseInputError

Scores = tuple[list[float], list[float]]


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (``index`` 0 is the main one)."""

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def main_first(self):
        """A block the main process runs before the others (a barrier before and after it)."""
        if self.count == 1:
            return contextlib.nullcontext()
        from accelerate import PartialState

        return PartialState().main_process_first()

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, items: list) -> list:
        """The concatenation, in process order, of every process's ``items``."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def agree(self, value, what: str, where) -> None:
        """Check every process computed the same ``value``.

        Raises:
            StepwiseInputError: a process disagrees with the main one (e.g. a run folder on node-local disk).
        """
        seen = self.gather([value])
        for i, v in enumerate(seen):
            if v != seen[0]:
                raise StepwiseInputError(
                    f"process {i} sees {what} {v} in {where}, the main process {seen[0]}: the output_dir must be one "
                    "folder that every process sees (a shared filesystem on several nodes)"
                )

    def split_scoring(self, score: Callable[[object, object], Scores]) -> Callable[[object, object], Scores]:
        """``score(model, dataset)`` with the rows split across the processes and the results gathered in order.

        Process ``i`` scores rows ``i, i + count, ...`` (a strided share, so long and short rows spread evenly);
        each row is scored once in total, and every process returns the same full ``(chosen, rejected)`` lists.
        """
        if self.count == 1:
            return score

        def split(model, dataset) -> Scores:
            mine = list(range(self.index, len(dataset), self.count))
            chosen, rejected = score(model, _rows(dataset, mine)) if mine else ([], [])
            gathered = sorted(self.gather(list(zip(mine, chosen, rejected, strict=True))))
            if [g[0] for g in gathered] != list(range(len(dataset))):
                raise RuntimeError(f"gathered scores cover {len(gathered)} of {len(dataset)} rows")
            return [g[1] for g in gathered], [g[2] for g in gathered]

        return split


def _rows(dataset, indices: list[int]):
    return dataset.select(indices) if hasattr(dataset, "select") else [dataset[i] for i in indices]


def processes_of(args) -> Processes:
    """The training processes as ``args`` (a ``TrainingArguments``) sets them up.

    Raises:
        StepwiseInputError: the launcher started several processes but ``args`` trains each on its own (on a
            machine without a GPU ``use_cpu`` must be on, else every process trains on all rows).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    count = args.world_size  # the process group TrainingArguments set up
    if launched > 1 and count == 1:
        raise StepwiseInputError(
            f"launched as {launched} processes, but they would each train alone on every row (no GPU and "
            "use_cpu off): pass --use_cpu true (CPU processes, gloo) or launch on GPUs"
        )
    return Processes(index=args.process_index, count=count)


def weights_are_sharded(trainer) -> bool:
    """Whether ``trainer`` holds only a shard of the weights on each process (FSDP, DeepSpeed ZeRO-3): its model
    object is then no usable M(t) after training, and M(t) is read back from what the step saved."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


def check_saves_whole(trainer) -> None:
    """Under sharded training, check the trainer saves M(t) whole (what the driver reads back after each step).

    Raises:
        StepwiseInputError: FSDP with a sharded state dict, or ZeRO-3 without gathering the weights on save.
    """
    if not weights_are_sharded(trainer):
        return
    if getattr(trainer, "is_fsdp_enabled", False):
        kind = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in kind:
            raise StepwiseInputError(f"FSDP saves {kind}; the stepwise driver reads M(t) back whole from step_t/: set "
                                     "fsdp_state_dict_type: FULL_STATE_DICT (examples/configs/accelerate_fsdp.yaml)")
        return
    zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise StepwiseInputError("ZeRO-3 does not gather the weights on save; the stepwise driver reads M(t) back whole "
                                 "from step_t/: set zero3_save_16bit_model: true (examples/configs/accelerate_zero3.yaml)")
