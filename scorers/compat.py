"""Every use of TRL's or transformers' private code, in one place, beside the version ranges it was written for.

The rest of the project calls these functions and never touches an underscored upstream name itself (nor TRL's
internal helpers and trainer state listed below); ``tests/test_compat_boundary.py`` finds any that does, from the
code. When an upstream release renames one of them, :func:`missing_upstream_names` lists it and
``tests/test_compat.py`` fails loudly, naming it, instead of a run failing somewhere in the middle.

``SUPPORTED`` must equal the ranges in ``pyproject.toml`` (checked by the same test).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import NamedTuple

SUPPORTED = {"transformers": ">=5.0,<5.20", "trl": ">=1.16,<2"}

# (module, attribute path) of every private upstream name used below.
UPSTREAM_NAMES = (
    ("trl.data_utils", "_tokenize"),
    ("trl.trainer.dpo_trainer", "hash_module"),
    ("trl.trainer.dpo_trainer", "DPOTrainer._precompute_ref_logps"),
    ("transformers.trainer", "Trainer._get_train_sampler"),
    ("transformers", "AttentionInterface.register"),
    ("transformers.integrations.sdpa_attention", "sdpa_attention_forward"),
    ("transformers", "PretrainedConfig._attn_implementation"),
    # TRL internals the packed training step (trainer_plugin.packed, scorers.packed_head) builds on
    ("trl.kernels", "ChunkedLogProbFunction"),
    ("trl.trainer.utils", "FusedCausalLMOutput"),
    ("trl.trainer.utils", "use_adapter"),
    ("trl.models.utils", "disable_gradient_checkpointing"),
    ("trl.trainer.dpo_trainer", "DPOTrainer.compute_ref_log_probs"),
)

# Upstream attributes without an underscore that are not public API either: DPOTrainer's instance state (set in its
# ``__init__``, read through :func:`dpo_trainer_flags`) and a model's ``hf_quantizer`` (:func:`drop_gguf_quantizer`).
# ``ref_model`` is public, but TRL's ``compute_loss`` reading it is not (:func:`trl_reference_replaced`).
INTERNAL_ATTRIBUTES = ("precompute_ref_logps", "use_weighting", "aux_loss_enabled", "hf_quantizer")


def missing_upstream_names() -> list[str]:
    """The entries of :data:`UPSTREAM_NAMES` that the installed TRL / transformers no longer have."""
    missing = []
    for module, path in UPSTREAM_NAMES:
        try:
            obj = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{path}")
    return missing


# ----------------------------------------------------------------------------------------------- TRL


def trl_tokenize(tokenizer, text_or_messages, **kwargs) -> dict:
    """``trl.data_utils._tokenize``: how DPOTrainer tokenizes a prompt or a prompt + completion (chat template
    for messages, the tokenizer's ``__call__`` for text)."""
    from trl.data_utils import _tokenize

    return _tokenize(tokenizer, text_or_messages, **kwargs)


@contextlib.contextmanager
def trl_init_with_given_ref_logps(policy_is_loaded: bool = True):
    """Inside the block, DPOTrainer's ``__init__`` skips what it does only to compute reference log-probs, which
    are given (:class:`KeepGivenRefLogps`):

    * hashing every weight (~0.5 s for 135M parameters), the key of TRL's own cache of precomputed log-probs;
    * when ``policy_is_loaded`` (the policy is a model, not a path, so TRL loads nothing else from a path): loading
      a reference model from the policy's path, which TRL does under FSDP (``precompute_ref_log_probs`` without a
      ``ref_model``: the policy is not sharded yet, so it precomputes with a fresh whole copy, then frees it).
    """
    import trl.trainer.dpo_trainer as dpo_module

    originals = dpo_module.hash_module, dpo_module.create_model_from_path
    dpo_module.hash_module = lambda module: "stepwise-given-ref-logps"
    if policy_is_loaded:
        dpo_module.create_model_from_path = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dpo_module.hash_module, dpo_module.create_model_from_path = originals


class KeepGivenRefLogps:
    """Mixin for a ``DPOTrainer`` subclass: a dataset that already has ``ref_chosen_logps``/``ref_rejected_logps``
    keeps them (TRL 1.x recomputes them with the trainer's own reference even when the columns exist)."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if {"ref_chosen_logps", "ref_rejected_logps"} <= set(getattr(dataset, "column_names", ())):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def set_train_sampler(trainer, sampler) -> None:
    """Make ``trainer`` (a transformers ``Trainer``) draw its training rows from ``sampler``.

    ``Trainer`` has no public hook for its training sampler; its dataloader asks ``_get_train_sampler``. Under
    ``accelerate``, the dataloader built from it is sharded across processes by accelerate (each rank gets every
    ``world_size``-th batch of the sampler's order).
    """
    import types

    trainer._get_train_sampler = types.MethodType(lambda self, train_dataset=None: sampler, trainer)


def drop_trl_forward_patch(model) -> None:
    """Remove the per-instance fused-LM-head ``forward`` that DPOTrainer installs on the models it trains, so the
    next trainer (or a deep copy) starts from the class's own forward."""
    vars(model).pop("forward", None)


class DPOTrainerFlags(NamedTuple):
    precompute_ref_logps: bool  # reference log-probs precomputed (args.precompute_ref_log_probs)
    use_weighting: bool  # WPO weights (args.use_weighting): the loss needs log_sum_sq_probs
    aux_loss_enabled: bool  # the MoE router auxiliary loss is added


def dpo_trainer_flags(trainer) -> DPOTrainerFlags:
    """What a TRL 1.x ``DPOTrainer`` decided in its ``__init__`` (its instance attributes of the same names)."""
    return DPOTrainerFlags(trainer.precompute_ref_logps, trainer.use_weighting, trainer.aux_loss_enabled)


@contextlib.contextmanager
def trl_reference_replaced(trainer, stand_in):
    """Inside the block, ``trainer.ref_model`` is ``stand_in``: TRL 1.x's ``compute_loss`` calls
    ``self.ref_model(..., fused_lm_head=True)`` for a live reference's log-probs."""
    saved = trainer.ref_model
    trainer.ref_model = stand_in
    try:
        yield
    finally:
        trainer.ref_model = saved


def fused_lm_output(**fields):
    """``trl.trainer.utils.FusedCausalLMOutput(**fields)``: what a model called with ``fused_lm_head=True`` returns
    to TRL's loss (``label_mask``, ``log_probs`` and the optional per-token statistics)."""
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)


def trl_disable_gradient_checkpointing(model, gradient_checkpointing_kwargs):
    """``trl.models.utils.disable_gradient_checkpointing``: the context TRL runs its reference forwards in."""
    from trl.models.utils import disable_gradient_checkpointing

    return disable_gradient_checkpointing(model, gradient_checkpointing_kwargs)


def trl_use_adapter(model, adapter_name):
    """``trl.trainer.utils.use_adapter``: the PEFT adapter ``adapter_name`` active inside the block (``None``: the
    adapters disabled), as TRL computes a PEFT reference."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, adapter_name=adapter_name)


def trl_chunked_log_probs(hidden, weight, bias, labels, temperature, vocab_chunk, softcap, logit_scale, outputs):
    """``trl.kernels.ChunkedLogProbFunction.apply``: TRL's fused LM-head kernel (per-token log-probs and the
    statistics named in ``outputs``, the logits computed a vocabulary chunk at a time)."""
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, bias, labels, temperature, vocab_chunk, softcap, logit_scale,
                                        outputs)


# ----------------------------------------------------------------------------------------------- transformers


def model_name_or_path(config, *default):
    """``config._name_or_path`` of a transformers config (where it was loaded from); ``default`` as ``getattr``'s."""
    return getattr(config, "_name_or_path", *default)


def set_model_name_or_path(config, value) -> None:
    """Set ``config._name_or_path`` (what ``save_pretrained`` records and ``model_name_or_path`` reads)."""
    config._name_or_path = value


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention function (what ``attn_implementation="sdpa"`` runs)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def attention_implementation(model, name: str, function):
    """Run ``model``'s attention modules through ``function`` inside the block.

    transformers >= 5 looks the attention function up by ``config._attn_implementation`` at every forward; ``name``
    is registered globally once (``AttentionInterface.register``) and the model's config points at it only inside
    the block, so other models (and this one, outside) keep their own attention.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def cache_key_values(cache) -> list:
    """Per layer ``(keys, values)`` of a transformers ``DynamicCache`` (``past_key_values`` of a forward with
    ``use_cache=True``): the keys after the rotary embedding, as every attention function receives them."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def drop_gguf_quantizer(model) -> None:
    """Forget that ``model`` was loaded (and dequantized) from a GGUF file, so ``save_pretrained`` writes plain
    fp32 safetensors instead of refusing or re-quantizing."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# ----------------------------------------------------------------------------------------------- datasets


def has_indices_mapping(dataset) -> bool:
    """Whether a ``datasets.Dataset`` reads its rows through an indices mapping (after ``select``/``shuffle``...;
    its private ``_indices``) instead of being its Arrow table as it is."""
    return getattr(dataset, "_indices", None) is not None


# ----------------------------------------------------------------------------------------------- torch


def onednn_linear_pointwise():
    """torch's private oneDNN linear op ``torch.ops.mkldnn._linear_pointwise`` (what torch.compile's CPU backend
    emits; its ``.binary`` overload fuses a binary post-op). Raises ``AttributeError``/``RuntimeError`` where the
    torch build lacks it."""
    import torch

    return torch.ops.mkldnn._linear_pointwise
