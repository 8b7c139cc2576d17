"""A causal LM's forward in packed mode, with gradients: per-token statistics at the completion positions only.

:func:`install_packed_head` gives ``model.forward`` a packed mode: called with ``packed_labels`` (and
``packed_predictors``), the backbone runs on one packed line (:mod:`scorers.packing`: pairs end to end, prefix
shared, the row layout as ``attention_mask``, :func:`scorers.attention.prefix_shared_attention`), the hidden states
at the predictor positions are gathered, and only those go through the LM head. Every other call is the forward the
model had before (TRL's fused LM head included), so generation and TRL's own code paths are unchanged. The call goes
through ``forward`` (not the backbone directly) so that wrappers around the model (DDP, accelerate, PEFT) see it.

The per-token math is TRL's own fused-head kernel (``trl.kernels.ChunkedLogProbFunction``): the log-prob of each
label, and on request the entropy, ``log(sum_v p_v^2)``, the mean logit and whether the label is the top-1 token,
exactly as TRL's ``DPOTrainer`` computes them for its metrics, without materialising the logits (the backward
recomputes each tile). Logits are transformed as TRL's ``add_fused_lm_head`` does (:func:`lm_head_scaling`).

Assumptions:
    see :mod:`scorers.attention`; a text decoder whose ``base_model`` returns ``last_hidden_state`` and whose
    ``get_output_embeddings()`` is a linear layer (weight ``(vocab, hidden)``).
"""

from __future__ import annotations

import functools
import types

from .attention import prefix_attention
from .compat import trl_chunked_log_probs

TOKEN_STATS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
OPTIONAL_STATS = TOKEN_STATS[1:]
_ACCELERATOR_VOCAB_CHUNK = 32768  # vocabulary columns per LM-head tile off CPU (TRL's fused head uses the same)
_LM_HEAD_CHUNK = 2048  # positions per LM-head tile: bounds the (positions x vocab) logits buffer
# On CPU a tile's fp32 logits stay under glibc malloc's 32 MiB mmap ceiling, so their memory is reused from the heap
# instead of being mapped and page-faulted afresh for every tile.
_CPU_LM_HEAD_TILE_BYTES = 30 << 20


def lm_head_tile(vocab_size: int, device) -> int:
    """Positions per LM-head tile: 2048 on accelerators; on CPU as many as fit 30 MiB of fp32 logits (64-2048)."""
    import torch

    if torch.device(device).type != "cpu":
        return _LM_HEAD_CHUNK
    return max(64, min(_LM_HEAD_CHUNK, _CPU_LM_HEAD_TILE_BYTES // (4 * vocab_size)))


def lm_head_scaling(text_config) -> tuple[float, float | None]:
    """``(logit_scale, final_logit_softcapping)`` of a model's logits, read as TRL's ``add_fused_lm_head`` reads
    them: ``logit_scale``, else ``output_multiplier``, else ``lm_head_multiplier``, else ``1 / logits_scaling``
    (HyperCLOVA X: times ``logits_scaling``); 1.0 when none is set."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(text_config, "final_logit_softcapping", None)


def has_packed_head(model) -> bool:
    return bool(getattr(model.forward, "_sdpo_packed_head", False))


def install_packed_head(model) -> None:
    """Give ``model`` (a causal LM, not a wrapper) the packed mode of its ``forward`` (idempotent).

    Packed call: ``model(input_ids=(1, n), position_ids=(1, n), attention_mask=layout, packed_predictors=(m,),
    packed_labels=(m,), packed_outputs=names, packed_attention="auto")`` returns the tuple of :data:`TOKEN_STATS`
    for the ``m`` targets (``None`` for the optional ones not named in ``packed_outputs``); ``packed_attention``
    names the attention kernel (:func:`scorers.flex_attention.chosen_kernel`). The patch is an instance attribute,
    like TRL's own head, so ``scorers.compat.drop_trl_forward_patch`` removes both.
    """
    if has_packed_head(model):
        return
    previous = model.forward
    logit_scale, softcap = lm_head_scaling(model.config.get_text_config())

    @functools.wraps(type(model).forward)
    def forward(self, *args, packed_predictors=None, packed_labels=None, packed_outputs=(), packed_attention="auto",
                **kwargs):
        if packed_labels is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        with prefix_attention(self, kernel=packed_attention):
            hidden = self.base_model(*args, **kwargs).last_hidden_state
        lm_head = self.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.size(-1))
        h = flat.index_select(0, packed_predictors.to(flat.device)).to(lm_head.weight.device)
        return token_stats(h, lm_head.weight, lm_head.bias, packed_labels.to(lm_head.weight.device),
                           tuple(packed_outputs), logit_scale, softcap)

    forward._sdpo_packed_head = True
    model.forward = types.MethodType(forward, model)


def token_stats(hidden, weight, bias, labels, outputs: tuple[str, ...], logit_scale: float = 1.0,
                softcap: float | None = None) -> tuple:
    """Per-token statistics of ``hidden @ weight.T (+ bias)`` at ``labels`` (TRL's fused-head kernel), in order of
    :data:`TOKEN_STATS`; differentiable in ``hidden``, ``weight`` and ``bias`` through the log-probs and entropy.

    On CPU the tokens go through in tiles of at most 30 MiB of fp32 logits (one vocabulary-wide tile each), so the
    kernel's temporaries stay small; elsewhere in one call with TRL's vocabulary chunk.
    """
    import torch

    n, vocab = hidden.shape[0], weight.shape[0]
    if hidden.device.type == "cpu":
        tokens, vocab_chunk = lm_head_tile(vocab, hidden.device), vocab
    else:
        tokens, vocab_chunk = max(n, 1), _ACCELERATOR_VOCAB_CHUNK
    parts = [
        trl_chunked_log_probs(hidden[s : s + tokens], weight, bias, labels[s : s + tokens], 1.0, vocab_chunk, softcap,
                              logit_scale, outputs)
        for s in range(0, max(n, 1), tokens)  # one call even for no tokens: the output stays connected to the graph
    ]
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in range(len(TOKEN_STATS)))
