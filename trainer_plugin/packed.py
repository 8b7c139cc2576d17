"""``PackedDPOTrainer``: TRL's ``DPOTrainer`` whose policy forward (and the live reference's) is packed.

Each pair is one packed row: the prompt once, the rejected tokens attending to the prompt and not to the chosen
ones, positions continuing after the prompt (:mod:`scorers.packing`); the pairs of a micro-batch are laid end to end
in one line (no padding) and the LM head runs only at the completion positions the loss reads
(:mod:`scorers.packed_head`, TRL's own fused-head kernel). The per-token results are put back in the padded layout
TRL's collator made (:mod:`trainer_plugin.packed_batch`) and handed to TRL's own ``compute_loss``, so the loss, every
``loss_type``, ``ld_alpha``, ``use_weighting``, ``f_divergence_type``, gradient accumulation and every logged metric
are TRL's code, unchanged. The reference log-probs TRL precomputes (``precompute_ref_log_probs``) are packed too;
given ``ref_chosen_logps``/``ref_rejected_logps`` columns are used as TRL uses them.

Memory: ``packed_batch_tokens`` caps the tokens of one forward. A micro-batch whose packed pairs exceed it is split
into lines of at most that many tokens (a pair longer than the budget is a line of its own); its gradient is still
the whole micro-batch's: the lines run once without gradients, TRL's loss is computed on all of them, and on the
backward pass each line is run again and back-propagated on its own (activations of one line at a time), which costs
one extra forward of the split micro-batches. ``None`` (default): one forward per micro-batch, whose packed tokens
are never more than TRL's padded ``2 x per_device_train_batch_size x longest row``.

Raises (at construction, :class:`sdpo_core.errors.ConfigError`): options the packed forward cannot honour.

Assumptions:
    a text decoder (:mod:`scorers.attention`): no vision inputs, no prompt-learning PEFT (virtual tokens), no MoE
    auxiliary loss, no sliding window shorter than ``max_length``; batches from ``DataCollatorForPreference``
    (right-padded). The attention is the ``packed_attention`` kernel (an SDPA loop over pair segments on CPU, one
    FlexAttention call per layer on accelerators by default) whatever ``attn_implementation`` the model has. With a
    split micro-batch under DDP, all but the last line's backward run in ``no_sync``; DeepSpeed and FSDP are refused
    with ``packed_batch_tokens``. TRL 1.x's ``compute_loss`` reads the per-token log-probs through one
    ``model(..., fused_lm_head=True)`` call (and one on ``self.ref_model`` with a live reference); this is checked
    at every step, and the tokens it asks for are checked against the packed ones.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer

from scorers.attention import prefix_attention, unmodelled_sliding_window
from scorers.compat import (dpo_trainer_flags, fused_lm_output, trl_disable_gradient_checkpointing,
                            trl_reference_replaced, trl_use_adapter)
from scorers.flex_attention import KERNELS
from scorers.packed_head import OPTIONAL_STATS, install_packed_head
from sdpo_core.config import check_choice
from sdpo_core.errors import ConfigError

from .packed_batch import PackedBatch, pack_collated


class GivenOutputs:
    """Stands in for a model inside TRL's loss code: its fused-LM-head call returns the packed forward's outputs
    (in TRL's layout, a ``FusedCausalLMOutput``); any other call goes to the model."""

    def __init__(self, model, outputs):
        self.model, self.outputs, self.calls = model, outputs, 0

    def __call__(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return self.model(*args, **kwargs)
        labels = kwargs.get("labels")
        if labels is None or not torch.equal(labels[:, 1:] != -100, self.outputs.label_mask):
            raise RuntimeError("TRL's loss asked for other tokens than the packed forward computed (TRL changed?)")
        self.calls += 1
        return self.outputs

    def check_used(self, what: str) -> None:
        if self.calls != 1:
            raise RuntimeError(f"TRL's loss read the {what} outputs {self.calls} times, expected once (TRL changed?)")

    def __getattr__(self, name):
        return getattr(self.model, name)


class _RecomputedLogProbs(torch.autograd.Function):
    """Log-probs computed without gradients whose backward re-runs each line with gradients (split micro-batch)."""

    @staticmethod
    def forward(ctx, anchor, values, backward_lines):
        ctx.backward_lines = backward_lines
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.backward_lines(grad)
        return None, None, None


def causal_lm(model, accelerator):
    """The causal LM inside accelerate/DDP/PEFT wrappers (where the packed head is installed)."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if is_peft_model(model) else model


def _rng_state(device):
    cuda = device.type == "cuda"
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if cuda else None)


@contextlib.contextmanager
def _restored_rng(state, device):
    """Dropout draws the same masks as in the first run of the line (what torch's checkpointing does)."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _dpo_init_arguments(args, kwargs) -> dict:
    return inspect.signature(DPOTrainer.__init__).bind_partial(None, *args, **kwargs).arguments


class PackedForward:
    """Mixin for a ``DPOTrainer`` (sub)class: the packed, prefix-shared forward (see the module docstring).

    Args:
        packed_batch_tokens: at most this many tokens per forward (``None``: the whole micro-batch in one).
        packed_attention: the packed layout's attention kernel, ``auto`` | ``loop`` | ``flex`` | ``flex_eager``
            (:func:`scorers.flex_attention.chosen_kernel`).
    """

    def __init__(self, *args, packed_batch_tokens: int | None = None, packed_attention: str = "auto", **kwargs):
        if packed_batch_tokens is not None and packed_batch_tokens < 1:
            raise ConfigError(f"packed_batch_tokens must be >= 1 or None, got {packed_batch_tokens}")
        check_choice("packed_attention", packed_attention, KERNELS)
        self.packed_batch_tokens, self.packed_attention = packed_batch_tokens, packed_attention
        given = _dpo_init_arguments(args, kwargs)
        _refuse_before_init(given.get("args"), given.get("peft_config"), given.get("train_dataset"))
        super().__init__(*args, **kwargs)
        self._refuse_after_init()
        self._install_heads()

    # -------------------------------------------------------------------------------------------- TRL entry points

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._install_heads()
        batch = self._pack(inputs)
        policy = GivenOutputs(model, self._policy_outputs(model, batch))
        reference = None
        if not dpo_trainer_flags(self).precompute_ref_logps:
            reference = GivenOutputs(self.ref_model, self._reference_outputs(batch))
        with self._given_reference(reference):
            result = super().compute_loss(policy, inputs, return_outputs, num_items_in_batch)
        policy.check_used("policy's")
        if reference is not None:
            reference.check_used("reference's")
        return result

    def training_step(self, model, inputs, *args, **kwargs):
        # Gradient checkpointing re-runs the layers during the backward pass: the packed attention must still be on.
        with prefix_attention(causal_lm(model, self.accelerator), kernel=self.packed_attention):
            return super().training_step(model, inputs, *args, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        self._install_heads(model)
        batch = self._pack(inputs)
        with torch.no_grad(), trl_disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_adapter(), self.accelerator.autocast():
            stats = self._run_lines(model, batch, ())
        given = GivenOutputs(model, _fused_output(batch, stats))
        result = super().compute_ref_log_probs(given, inputs)
        given.check_used("reference's")
        return result

    # ------------------------------------------------------------------------------------------------ the forward

    def _pack(self, inputs) -> PackedBatch:
        return pack_collated(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                             self.packed_batch_tokens, inputs["input_ids"].device)

    def _stat_names(self) -> tuple[str, ...]:
        # what TRL's own fused head computes for the policy: the metrics' entropy, mean logits, top-1; WPO weights
        use_weighting = dpo_trainer_flags(self).use_weighting
        return tuple(n for n in OPTIONAL_STATS if n != "log_sum_sq_probs" or use_weighting)

    def _policy_outputs(self, model, batch: PackedBatch):
        names = self._stat_names()
        if not (torch.is_grad_enabled() and len(batch.lines) > 1):
            return _fused_output(batch, self._run_lines(model, batch, names))
        device = batch.label_mask.device
        rng = []
        with torch.no_grad():
            stats = self._run_lines(model, batch, names, rng_states=rng)
        backward_lines = functools.partial(self._backward_lines, model, batch, rng)
        anchor = torch.zeros((), device=device, requires_grad=True)
        log_probs = _RecomputedLogProbs.apply(anchor, stats[0], backward_lines)
        return _fused_output(batch, (log_probs,) + tuple(stats[1:]))

    def _backward_lines(self, model, batch: PackedBatch, rng_states, grad) -> None:
        device = batch.label_mask.device
        last = len(batch.lines) - 1
        for i, line in enumerate(batch.lines):
            sync = self.accelerator.no_sync(model) if i < last else contextlib.nullcontext()
            with sync, torch.enable_grad(), _restored_rng(rng_states[i], device), self.compute_loss_context_manager():
                log_probs = _line_stats(model, line, (), self.packed_attention)[0]
                torch.autograd.backward(log_probs, grad.index_select(0, line.flat_index))

    def _run_lines(self, model, batch: PackedBatch, names, rng_states: list | None = None) -> list:
        """Each statistic over all targets, in flat-index order (TRL's order)."""
        flat: list = [None] * (1 + len(OPTIONAL_STATS))
        for line in batch.lines:
            if rng_states is not None:
                rng_states.append(_rng_state(batch.label_mask.device))
            for k, values in enumerate(_line_stats(model, line, names, self.packed_attention)):
                if values is None:
                    continue
                if flat[k] is None:
                    flat[k] = values.new_zeros(batch.n_targets)
                flat[k] = flat[k].index_copy(0, line.flat_index.to(values.device), values)
        return flat

    def _reference_outputs(self, batch: PackedBatch):
        with torch.no_grad(), trl_disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_adapter():
            model = self.model if self.ref_model is None else self.ref_model
            return _fused_output(batch, self._run_lines(model, batch, ()))

    def _reference_adapter(self):
        """TRL's PEFT reference: the adapter named "ref" when there is one, else the adapters disabled."""
        if self.ref_model is not None or not is_peft_model(self.model):
            return contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return trl_use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _given_reference(self, given: GivenOutputs | None):
        """TRL's loss reads the live reference's outputs from ``self.ref_model``: hand it the packed ones."""
        return contextlib.nullcontext() if given is None else trl_reference_replaced(self, given)

    # ----------------------------------------------------------------------------------------------- set-up

    def _install_heads(self, *models) -> None:
        for m in (self.model, self.ref_model, *models):
            if m is not None and not isinstance(m, GivenOutputs):
                install_packed_head(causal_lm(m, self.accelerator))

    def _refuse_after_init(self) -> None:
        if dpo_trainer_flags(self).aux_loss_enabled:
            raise ConfigError("the packed DPO forward does not compute the MoE router auxiliary loss; set "
                              "router_aux_loss_coef=0 or use packing=False")
        if is_peft_model(self.model) and self.model.active_peft_config.is_prompt_learning:
            raise ConfigError("the packed DPO forward does not support prompt-learning PEFT (virtual tokens); use "
                              "LoRA-style adapters or packing=False")
        window = unmodelled_sliding_window(causal_lm(self.model, self.accelerator).config.get_text_config(),
                                           self.args.max_length)
        if window is not None:
            raise ConfigError(f"the packed DPO forward does not model this model's sliding window ({window} < "
                              f"max_length {self.args.max_length}); use packing=False")
        if self.packed_batch_tokens is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ConfigError("packed_batch_tokens (splitting a micro-batch) is not supported with DeepSpeed or "
                              "FSDP; lower per_device_train_batch_size instead")


def _refuse_before_init(args, peft_config, train_dataset) -> None:
    if args is not None and args.use_liger_kernel:
        raise ConfigError("the packed DPO forward does not run Liger kernels (use_liger_kernel); use packing=False")
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise ConfigError("the packed DPO forward does not support prompt-learning PEFT (virtual tokens); use "
                          "LoRA-style adapters or packing=False")
    if train_dataset is not None:
        first = next(iter(train_dataset))
        if "image" in first or "images" in first:
            raise ConfigError("the packed DPO forward is for text models; vision datasets need packing=False")


def _line_stats(model, line, names, kernel: str) -> tuple:
    return model(input_ids=line.input_ids, position_ids=line.position_ids, attention_mask=line.layout,
                 packed_predictors=line.predictors, packed_labels=line.labels, packed_outputs=names,
                 packed_attention=kernel)


def _fused_output(batch: PackedBatch, stats):
    fields = ("log_probs",) + OPTIONAL_STATS
    laid = {name: None if values is None else batch.to_trl_layout(values) for name, values in zip(fields, stats)}
    return fused_lm_output(label_mask=batch.label_mask, **laid)


class PackedDPOTrainer(PackedForward, DPOTrainer):
    """Drop-in ``trl.DPOTrainer`` with the packed, prefix-shared forward; same arguments, plus
    ``packed_batch_tokens`` (at most this many tokens per forward; default: one forward per micro-batch) and
    ``packed_attention`` (the attention kernel; default ``auto``)."""
