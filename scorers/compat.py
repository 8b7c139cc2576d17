"""Every use of TRL's or transformers' private code, in one place, beside the version ranges it was written for.

The rest of the project calls these functions and never touches an underscored upstream name itself. When an
upstream release renames one of them, :func:`missing_upstream_names` lists it and
``tests/test_compat.py`` fails loudly, naming it, instead of a run failing somewhere in the middle.

``SUPPORTED`` must equal the ranges in ``pyproject.toml`` (checked by the same test).
"""

from __future__ import annotations

import contextlib
import importlib

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
def skip_trl_ref_weight_hash():
    """Inside the block, DPOTrainer's ``__init__`` does not hash every weight (~0.5 s for 135M parameters): TRL
    hashes them only to key its own cache of precomputed reference log-probs, which is bypassed when the log-probs
    are given (:class:`KeepGivenRefLogps`)."""
    import trl.trainer.dpo_trainer as dpo_module

    original = dpo_module.hash_module
    dpo_module.hash_module = lambda module: "stepwise-given-ref-logps"
    try:
        yield
    finally:
        dpo_module.hash_module = original


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


# ----------------------------------------------------------------------------------------------- transformers


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
