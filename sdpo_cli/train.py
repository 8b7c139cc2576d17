"""``sdpo train PART``: stepwise DPO over a partition's chunks (see ``trainer_plugin.driver``).

Takes every ``StepwiseConfig`` option and every ``DPOConfig``/``TrainingArguments`` flag (``--learning-rate``,
``--per-device-train-batch-size``, ``--beta``, ...; dashes or underscores); ``--config file.yaml`` takes the same
keys, as ``trl dpo`` does. bf16 is used only where the hardware has it, unless ``--bf16`` says otherwise; on a
machine without an accelerator ``use_cpu`` is on unless ``--use_cpu`` says otherwise (so that ``torchrun`` starts
CPU processes that train together, over gloo). Under several processes only the main one logs at INFO and prints.

Example::

    sdpo train out/partition --model-name-or-path bundled --ref-mode precomputed --output-dir out/sdpo \\
        --learning-rate 1e-6 --per-device-train-batch-size 4
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(options) -> None:
    from trl import DPOConfig

    from trainer_plugin.config import StepwiseConfig

    options.add_positional("partition_dir", "a partition folder (sdpo partition -o PART)", many=False,
                           metavar="PART")
    options.add_dataclass(StepwiseConfig, "stepwise DPO")
    options.add_dataclass(DPOConfig, "DPOConfig (each step's trainer)")


def bf16_default() -> bool:
    """Whether this machine trains in bf16: a CUDA device that supports it."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) on this machine."""
    import torch

    return torch.accelerator.is_available()


def dpo_config(values: dict, **fixed):
    """The ``DPOConfig`` of the flags given (``fixed`` fields over them), with this machine's defaults where no flag
    says otherwise: bf16 where an accelerator supports it, ``use_cpu`` where there is no accelerator. Returns the
    defaults applied (``bf16`` among them when it was not given) and the config."""
    from trl import DPOConfig

    from .options import build

    defaults = {}
    if "bf16" not in values and "fp16" not in values:
        defaults["bf16"] = bf16_default()
    if "use_cpu" not in values and not has_accelerator():
        defaults["use_cpu"] = True
    return defaults, build(DPOConfig, {k: v for k, v in values.items() if k not in fixed}, **defaults, **fixed)


def run(values: dict) -> int:
    from .options import build
    from sdpo_core.errors import ConfigError

    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    config = build(StepwiseConfig, values)
    if not config.partition_dir:
        raise ConfigError("give the partition folder: sdpo train PART (a folder written by `sdpo partition`)")
    if not Path(config.partition_dir).is_dir():
        raise ConfigError(f"partition folder does not exist: {config.partition_dir}")
    if not values.get("output_dir"):
        raise ConfigError("give the run folder with --output-dir")
    overrides, dpo_args = dpo_config(values)
    main = dpo_args.process_index == 0
    if not main:  # the other processes say only what goes wrong
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    if "bf16" in overrides:
        logger.info("bf16 %s (%s)", "on" if overrides["bf16"] else "off",
                    "a CUDA device with bf16" if overrides["bf16"] else "no bf16-capable accelerator; --bf16 to force")
    records = train_stepwise(config.partition_dir, config.model_name_or_path, args=dpo_args, config=config)
    if not main:
        return 0
    out = Path(dpo_args.output_dir)
    for s in records:
        ref = s.get("reference", {}).get("chunk") or {}
        print(f"step {s['step']}: {s['rows_trained']} pairs, {s['optimizer_steps']} optimizer steps, "
              f"γ_ref {ref.get('mean_margin')}, ref reward accuracy {ref.get('reward_accuracy')}")
    print(f"wrote {out / 'steps.json'}; M(T) in {out / f'step_{len(records)}'}")
    return 0
