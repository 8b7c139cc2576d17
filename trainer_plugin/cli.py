"""``sdpo train``: stepwise DPO over a partition's chunks (see ``trainer_plugin.driver``).

Accepts every ``StepwiseConfig`` option and every ``DPOConfig``/``TrainingArguments`` flag (``--learning_rate``,
``--per_device_train_batch_size``, ``--beta``, ...; dashes or underscores), built with transformers'
``HfArgumentParser`` field rules; ``--config file.yaml`` takes the same keys, as ``trl dpo`` does.

Example::

    sdpo train --partition-dir out/partition --model-name-or-path bundled --ref-mode precomputed \\
        --output-dir out/sdpo --learning-rate 1e-6 --per-device-train-batch-size 4 --bf16 false
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _dataclasses():
    from trl import DPOConfig

    from .driver import StepwiseConfig

    return StepwiseConfig, DPOConfig


def add_arguments(parser) -> None:
    from typing import get_type_hints

    from transformers import HfArgumentParser

    for dtype in _dataclasses():
        group = parser.add_argument_group(dtype.__name__)
        hints = get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init or f.name == "config":
                continue
            f.type = hints[f.name]
            HfArgumentParser._parse_dataclass_field(group, f)


def _build(dtype, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(dtype) if f.init and hasattr(args, f.name)}
    return dtype(**values)


def run(args) -> int:
    from .driver import train_stepwise

    stepwise_cls, dpo_cls = _dataclasses()
    config = _build(stepwise_cls, args)
    if not config.partition_dir:
        raise ValueError("--partition-dir is required (a folder written by `sdpo partition`)")
    if not Path(config.partition_dir).is_dir():
        raise FileNotFoundError(f"partition folder does not exist: {config.partition_dir}")
    dpo_args = _build(dpo_cls, args)
    summaries = train_stepwise(config.partition_dir, config.model_name_or_path, args=dpo_args, config=config)
    out = Path(dpo_args.output_dir)
    for s in summaries:
        ref = s.get("reference", {}).get("chunk") or {}
        print(f"step {s['step']}: {s['rows_trained']} pairs, {s['optimizer_steps']} optimizer steps, "
              f"γ_ref {ref.get('mean_margin')}, ref reward accuracy {ref.get('reward_accuracy')}")
    print(f"wrote {out / 'steps.json'}; M(T) in {out / f'step_{len(summaries)}'}")
    logger.debug(json.dumps(summaries, default=str))
    return 0
