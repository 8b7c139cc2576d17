"""``StepwiseConfig``: the stepwise driver's settings (the ``DPOConfig`` beside it configures each step's trainer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scorers.flex_attention import packed_attention_field
from sdpo_core.config import check_ranges
from sdpo_core.errors import ConfigError, UserError
from sdpo_core.option_fields import dtype_field

from .ref_refresh import REFRESH_RULE_NAMES

REF_MODES = ("live", "precomputed", "peft")  # ref_modes.REFERENCE_MODES' names (that module imports torch)
REF_REFRESHES = REFRESH_RULE_NAMES


class StepwiseInputError(UserError):
    """The partition, model or output folder cannot be used for stepwise training (one-line message)."""


@dataclass
class StepwiseConfig:
    """Settings of the stepwise driver (``trainer_plugin.driver.train_stepwise``)."""

    partition_dir: str | None = field(
        default=None, metadata={"help": "Partition folder (chunk-*.arrow + manifest.json) from `sdpo partition`."}
    )
    model_name_or_path: str = field(
        default="bundled", metadata={"help": "The SFT model M0: a local folder, a hub id, or 'bundled' (SmolLM2)."}
    )
    ref_mode: str = field(
        default="live",
        metadata={"help": "Reference of step t = M(t-1): 'live' (frozen copy), 'precomputed' (scored before the "
                  "step, no reference in memory) or 'peft' (LoRA on the merged previous steps).",
                  "choices": REF_MODES},
    )
    ref_refresh: str = field(
        default="step",
        metadata={"help": "When the reference moves: 'step' (sDPO: the reference of step t is M(t-1)) or 'never' "
                  "(every step keeps M0 as its reference: chunked DPO with fresh optimizers, the control that "
                  "separates sDPO's reference refresh from chunking and optimizer resets) or 'kl' (2D-Curri-DPO's "
                  "KL-adaptive refresh: before step t the reference moves to M(t-1) only when the mean per-token KL "
                  "of M(t-1) to the current reference on a probe of the training pairs exceeds kl_threshold).",
                  "choices": REF_REFRESHES},
    )
    kl_threshold: float = field(
        default=0.01, metadata={"min": 0, "help": "ref_refresh 'kl': refresh when the mean per-token KL(M(t-1) ‖ "
                                "reference) on the probe, in nats, exceeds this."})
    kl_probe_rows: int = field(
        default=32, metadata={"min": 1, "help": "ref_refresh 'kl': training pairs in the probe (a seeded sample of "
                              "all chunks, fixed for the run)."})
    sft_steps: int = field(
        default=0, metadata={"min": 0, "help": "MixDPO: the last N steps (the hardest chunks of an easy→hard "
                             "partition) train with TRL's 'sft' loss (NLL of the chosen response) instead of DPO; at "
                             "most the steps trained."})
    dtype: str = dtype_field()
    steps: int | None = field(
        default=None, metadata={"min": 1, "help": "Train only the first N chunks (default: all of them; more than the "
                                    "partition has is refused)."}
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Train with the packed, prefix-shared forward (each prompt computed once, no padding, LM "
                  "head only at completion positions; TRL's loss and metrics unchanged); false: TRL's own forward."},
    )
    packed_batch_tokens: int | None = field(
        default=None,
        metadata={"min": 1, "help": "Packing: at most this many tokens per forward; a micro-batch (per_device_train_batch_size "
                  "pairs) with more is split, same gradient, one extra forward. Default: one forward per micro-batch."},
    )
    packed_attention: str = packed_attention_field()
    score_batch_tokens: int = field(
        default=4096, metadata={"min": 1, "help": "Token budget per forward of the reference scoring passes."}
    )
    reference_stats: bool = field(
        default=True,
        metadata={"help": "Log mean γ_ref and reward accuracy of M(t-1) on chunk t (in 'live'/'peft' mode this "
                  "costs one extra forward pass over the chunk; 'precomputed' has it for free)."},
    )
    held_out: str | None = field(
        default=None,
        metadata={"help": "Held-out pairs (an Arrow stream file or a partition folder) on which γ_ref of every "
                  "M(t) is logged (the paper's Figure-2 quantity)."},
    )
    reuse_partition_scores: bool = field(
        default=True,
        metadata={"help": "'precomputed' step 1: reuse the partition's chosen/rejected log-probs when they were "
                  "scored by the same model, max_length, truncation mode and dtype."},
    )
    check_tokenizer: bool = field(
        default=True, metadata={"help": "Refuse a model whose tokenizer differs from the partition's."}
    )
    rescore_between_steps: bool = field(
        default=False,
        metadata={"help": "Adaptive curriculum: after step t re-score the remaining chunks with M(t) and re-order "
                  "them easy→hard (chunk sizes kept); the new order is recorded in run.json."},
    )
    lora_r: int = field(default=16, metadata={"min": 1, "help": "'peft' mode: LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"min": 1, "help": "'peft' mode: LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"min": 0, "max": 1, "help": "'peft' mode: LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "'peft' mode: module names to adapt (default: all linear except lm_head)."}
    )

    def __post_init__(self):
        check_ranges(self)  # also the declared choices: ref_mode, ref_refresh, dtype, packed_attention
        if self.ref_refresh != "step" and self.ref_mode == "peft":
            raise ConfigError(f"ref_refresh {self.ref_refresh!r} needs ref_mode 'live' or 'precomputed' (in 'peft' mode the "
                              "reference is the merged previous steps)")

    def steps_for(self, n_chunks: int) -> int:
        """The number of steps this run trains on a partition of ``n_chunks`` chunks.

        The driver asks before it loads anything but the chunks, so a count the partition cannot meet costs nothing.

        Raises:
            StepwiseInputError: ``steps`` more than the chunks, or ``sft_steps`` more than the steps (one line
                naming both numbers).
        """
        if self.steps is not None and self.steps > n_chunks:
            raise StepwiseInputError(f"steps {self.steps} is more than the partition's {n_chunks} chunks")
        steps = n_chunks if self.steps is None else self.steps
        if self.sft_steps > steps:
            trained = f"the partition's {steps} chunks" if self.steps is None else f"the {steps} steps given (steps)"
            raise StepwiseInputError(f"sft_steps {self.sft_steps} is more than {trained}")
        return steps
