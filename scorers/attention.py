"""Attention of packed ``prefix + side1 + side2`` rows (:mod:`scorers.packing`) without a materialised mask.

:func:`prefix_shared_attention` is registered as a transformers attention function and switched on for our own
forwards only (:func:`prefix_attention`); the row layout travels in the ``attention_mask`` argument, which
transformers >= 5 hands through unchanged when it is a 4D tensor (``masking_utils._preprocess_mask_arguments``).
It works with autograd, so the same attention serves scoring and training.

Assumptions:
    a decoder whose attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (all
    transformers >= 5 LLMs). Models with sliding-window or other custom masks are not modelled.
"""

from __future__ import annotations

import functools

from .compat import attention_implementation, sdpa_attention
from .flex_attention import chosen_kernel, flex_prefix_attention, is_layout

PREFIX_ATTENTION = "sdpo_prefix_shared"


def layout_tensor(layouts: list[list[tuple[int, int, int]]], device):
    """The ``(lines, 1, pairs, 3)`` int64 layout of packed lines, one list of ``(n0, n1, n2)`` per line (shorter
    lists are padded with empty ``(0, 0, 0)`` entries, which attend to nothing)."""
    import torch

    width = max(len(line) for line in layouts)
    rows = [list(line) + [(0, 0, 0)] * (width - len(line)) for line in layouts]
    return torch.tensor(rows, dtype=torch.long, device=device).unsqueeze(1)


def unmodelled_sliding_window(text_config, max_length: int | None) -> int | None:
    """The model's sliding window when it is shorter than ``max_length`` (``None`` length: any window), which the
    packed attention does not model; ``None`` when there is no such window."""
    window = getattr(text_config, "sliding_window", None) if getattr(text_config, "use_sliding_window", True) else None
    return window if window is not None and (max_length is None or window < max_length) else None


def prefix_attention(model, shared_kv=None, kernel: str = "auto"):
    """Context manager: ``model``'s attention runs the packed layout inside the block (every row also seeing
    ``shared_kv``, per layer, when given): :func:`prefix_shared_attention` (``loop``) or
    :func:`scorers.flex_attention.flex_prefix_attention` (``flex``, ``flex_eager``), as
    :func:`scorers.flex_attention.chosen_kernel` picks ``kernel`` (the ``packed_attention`` option) for the
    model's device."""
    kind = chosen_kernel(_device_type(model), kernel)
    if kind == "loop":
        name, function = PREFIX_ATTENTION, prefix_shared_attention
    else:
        name = f"{PREFIX_ATTENTION}_{kind}"
        function = functools.partial(flex_prefix_attention, compiled=kind == "flex")
    if shared_kv is None:
        return attention_implementation(model, name, function)
    return attention_implementation(model, name + "_shared", functools.partial(function, shared_kv=shared_kv))


def _device_type(model) -> str:
    param = next(iter(model.parameters()), None)
    return "cpu" if param is None else param.device.type


def prefix_shared_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_kv=None,
                            **kwargs):
    """Attention of packed ``prefix + side1 + side2`` rows, without materialising a full block mask.

    ``attention_mask`` is the row layout, an int64 tensor ``(batch, 1, pairs, 3)`` of segment lengths
    ``(n_prefix, n_side1, n_side2)`` of the pairs laid one after the other in each row; per pair ``prefix + side1``
    is plain causal attention (SDPA's causal kernel); ``side2`` attends to the prefix and causally to itself, never
    to ``side1``. Positions past the three segments (padding) get zeros. Any other mask is handed to transformers'
    SDPA attention unchanged.

    ``shared_kv``: per layer (``module.layer_idx``) the keys and values ``(1, kv_heads, n_shared, head_dim)`` of a
    prefix that every position of every row sees before its own segments (a few-shot preamble computed once, see
    :mod:`scorers.choices`); the rows' positions then continue after it.
    """
    import torch
    import torch.nn.functional as F

    if not is_layout(attention_mask):
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    gqa = {"enable_gqa": query.shape[1] != key.shape[1]}  # K/V stay at their own head count: no repeat_kv copies
    shared_k, shared_v = shared_kv[module.layer_idx] if shared_kv is not None else (None, None)
    n_shared = 0 if shared_k is None else shared_k.shape[2]
    out = torch.zeros_like(query)  # (batch, heads, length, head_dim)
    for b, segments in enumerate(attention_mask[:, 0].tolist()):
        o = 0  # several pairs may share a row, one after the other
        for n0, n1, n2 in segments:
            a = o + n0 + n1
            if a > o and not n_shared:
                out[b, :, o:a] = F.scaled_dot_product_attention(
                    query[b : b + 1, :, o:a], key[b : b + 1, :, o:a], value[b : b + 1, :, o:a], is_causal=True,
                    scale=scaling, **gqa,
                )[0]
            elif a > o:
                out[b, :, o:a] = F.scaled_dot_product_attention(
                    query[b : b + 1, :, o:a], torch.cat([shared_k, key[b : b + 1, :, o:a]], dim=2),
                    torch.cat([shared_v, value[b : b + 1, :, o:a]], dim=2),
                    attn_mask=_shared_then_causal(n_shared, a - o, query.device), scale=scaling, **gqa,
                )[0]
            if n2:
                keys = [key[b : b + 1, :, o : o + n0], key[b : b + 1, :, a : a + n2]]
                values = [value[b : b + 1, :, o : o + n0], value[b : b + 1, :, a : a + n2]]
                if n_shared:
                    keys, values = [shared_k, *keys], [shared_v, *values]
                out[b, :, a : a + n2] = F.scaled_dot_product_attention(
                    query[b : b + 1, :, a : a + n2], torch.cat(keys, dim=2), torch.cat(values, dim=2),
                    attn_mask=_shared_then_causal(n_shared + n0, n2, query.device), scale=scaling, **gqa,
                )[0]
            o = a + n2
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=64)
def _shared_then_causal(n_shared: int, n: int, device):
    """(n, n_shared + n) boolean mask: every one of the ``n_shared`` keys before the segment (a shared prefix),
    then causal over the segment's own keys (cached across layers)."""
    import torch

    mask = torch.ones(n, n_shared + n, dtype=torch.bool, device=device)
    mask[:, n_shared:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask

