"""The packed ``prefix + side1 + side2`` layout as one FlexAttention call per layer, with no device-to-host sync.

:func:`flex_prefix_attention` is the same transformers attention function as
:func:`scorers.attention.prefix_shared_attention` (same arguments, same layout tensor in ``attention_mask``, same
result), but instead of a Python loop over the pairs (a ``.tolist()`` of the layout and two SDPA calls per pair, every
layer) it runs ``torch.nn.attention.flex_attention`` once per layer with a ``BlockMask``:

* the mask (:func:`layout_mask_mod`): query ``q`` sees key ``k`` when both lie in the same pair, ``k <= q``, and
  ``k`` is in the pair's prefix or in ``q``'s own side, so ``side2`` sees the prefix and itself, never ``side1``;
  pairs laid in one line never see each other; positions past the layout (padding) see nothing and give zeros;
  keys of a shared preamble (``shared_kv``) are seen by every non-padding position;
* the per-position pair and segment ids come from the layout tensor by ``cumsum`` + ``searchsorted`` on its own
  device, so building the mask reads nothing back to the host; it is built once per batch: the first layer builds
  it and the others (and a gradient-checkpointing re-run) find it in a one-entry cache keyed on the layout tensor;
* bounded recompilation: where the kernel is compiled (``compiled=True``, the default off CPU), queries, keys and
  values are zero-padded along the sequence to the next power of two >= 256 (:func:`bucket_length`), the padding
  masked out (its blocks are skipped by the block sparsity, so it costs the pad copy, not attention FLOPs). One
  compiled kernel per bucket: lines up to 16,384 tokens give at most 7 shapes per model, dtype and shared-prefix
  length, under dynamo's default recompile limit (8).

Which implementation runs (:func:`chosen_kernel`) is the option ``packed_attention`` (declared once,
:func:`packed_attention_field`, in ``ScoringConfig``, ``StepwiseConfig`` and ``sdpo truthfulqa``): ``loop`` |
``flex`` | ``flex_eager`` | ``auto`` (default). ``auto``: compiled FlexAttention on accelerators; the SDPA loop on
CPU, where it measured faster (``bench/bench_attention.py``, ``bench/RESULTS.md``).
"""

from __future__ import annotations

import functools
import weakref

KERNELS = ("auto", "loop", "flex", "flex_eager")
MIN_BUCKET = 256


def is_layout(mask) -> bool:
    """Whether an attention mask is the packed row layout (int64, ``(batch, 1, pairs, 3)``), not a plain mask."""
    import torch

    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int64 and mask.dim() == 4 and mask.shape[-1] == 3


def packed_attention_field():
    """The ``packed_attention`` option, declared here once for every config that runs the packed layout."""
    from dataclasses import field

    return field(default="auto", metadata={
        "choices": KERNELS,
        "help": "Attention of the packed prefix-shared layout: loop (SDPA per pair segment), flex (compiled "
                "FlexAttention, one call per layer, no host sync), flex_eager (the same uncompiled) or auto "
                "(flex on accelerators, the loop on CPU, where it measured faster)."})


def chosen_kernel(device_type: str, requested: str = "auto") -> str:
    """``loop``, ``flex`` (compiled) or ``flex_eager`` for a forward on ``device_type``: ``requested`` names one;
    ``auto`` picks compiled flex off CPU, the loop on CPU.

    Raises:
        ConfigError: ``requested`` is not one of :data:`KERNELS`.
    """
    from sdpo_core.config import check_choice

    check_choice("packed_attention", requested, KERNELS)
    if requested != "auto":
        return requested
    return "loop" if device_type == "cpu" else "flex"


def bucket_length(n: int) -> int:
    """The padded sequence length of a compiled kernel: the next power of two, at least :data:`MIN_BUCKET`."""
    return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def position_ids_of_layout(layout, length: int):
    """``(pair, segment)`` of each of ``length`` positions of each line, both ``(lines, length)`` int64 on the
    layout's device: ``pair`` is the pair's index in its line (-1 past the layout: padding), ``segment`` 0 for the
    prefix, 1 for side1, 2 for side2. Computed with tensor ops only (no read-back to the host)."""
    import torch

    lines, _, pairs, _ = layout.shape
    ends = layout[:, 0].reshape(lines, pairs * 3).cumsum(-1)  # end of each segment, in line order
    t = torch.arange(length, device=layout.device).expand(lines, length).contiguous()
    j = torch.searchsorted(ends, t, right=True)  # index of the segment holding position t (3 * pairs: none)
    pair = torch.where(j < pairs * 3, j // 3, -1)
    return pair, j % 3


def layout_mask_mod(pair, segment, n_shared: int = 0):
    """The FlexAttention ``mask_mod`` of packed lines (see the module's docstring); ``n_shared`` keys of a shared
    preamble come first in the key sequence."""
    import torch

    def mask_mod(b, h, q_idx, kv_idx):
        k = torch.clamp(kv_idx - n_shared, min=0)
        pq, pk, sq, sk = pair[b, q_idx], pair[b, k], segment[b, q_idx], segment[b, k]
        own = (pq == pk) & (k <= q_idx) & ((sk == 0) | (sk == sq))
        if n_shared:
            own = (kv_idx < n_shared) | ((kv_idx >= n_shared) & own)
        return (pq >= 0) & own

    return mask_mod


def layout_dense_mask(layout, length: int, n_shared: int = 0):
    """The same mask as a boolean ``(lines, 1, length, n_shared + length)`` tensor, for one SDPA call (where flex
    cannot run: its backward on CPU)."""
    import torch

    pair, segment = position_ids_of_layout(layout, length)
    q = torch.arange(length, device=layout.device)
    k = torch.arange(n_shared + length, device=layout.device)
    mask = layout_mask_mod(pair, segment, n_shared)(torch.arange(layout.shape[0], device=layout.device)[:, None, None],
                                                    None, q[None, :, None], k[None, None, :])
    return mask.unsqueeze(1)


def layout_block_mask(layout, length: int, n_shared: int = 0):
    """The ``BlockMask`` of packed lines of ``length`` positions (keys: ``n_shared + length``) on the layout's
    device."""
    from torch.nn.attention.flex_attention import create_block_mask

    pair, segment = position_ids_of_layout(layout, length)
    return create_block_mask(layout_mask_mod(pair, segment, n_shared), layout.shape[0], None, length,
                             n_shared + length, device=layout.device)


class _MaskCache:
    """One block mask: the last layout tensor's (held weakly), for the length and shared-prefix length it was built
    for. Every layer of a forward gets the same layout tensor, so only the first builds the mask."""

    def __init__(self):
        self._key, self._ref, self._mask = None, None, None

    def get(self, layout, length: int, n_shared: int, device, dense: bool):
        key = (length, n_shared, str(device), layout.shape, dense)
        if self._ref is not None and self._ref() is layout and self._key == key:
            return self._mask
        build = layout_dense_mask if dense else layout_block_mask
        mask = build(layout.to(device, non_blocking=True), length, n_shared)
        self._key, self._ref, self._mask = key, weakref.ref(layout), mask
        return mask


_CACHE = _MaskCache()


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _eager_flex(*args, **kwargs):
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # "flex_attention called without torch.compile": the eager path is the point
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(*args, **kwargs)


def flex_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_kv=None,
                          compiled: bool = True, **kwargs):
    """:func:`scorers.attention.prefix_shared_attention`'s contract (same layout, same result) in one
    FlexAttention call; ``compiled=False`` runs flex's eager implementation (no compiler needed, dense math)."""
    import torch
    import torch.nn.functional as F

    from .compat import sdpa_attention

    if not is_layout(attention_mask):
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    lines, _, n, _ = query.shape
    if shared_kv is not None:
        shared_k, shared_v = shared_kv[module.layer_idx]
        key = torch.cat([shared_k.expand(lines, -1, -1, -1), key], dim=2)
        value = torch.cat([shared_v.expand(lines, -1, -1, -1), value], dim=2)
    n_shared = key.shape[2] - n
    length = bucket_length(n) if compiled else n
    if length > n:  # zero keys/queries past the line, masked out: one compiled kernel per bucket
        query, key, value = (F.pad(x, (0, 0, 0, length - n)) for x in (query, key, value))
    gqa = query.shape[1] != key.shape[1]
    # FlexAttention has no backward on CPU: there, with gradients, the same mask goes dense into one SDPA call
    dense = query.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    mask = _CACHE.get(attention_mask, length, n_shared, query.device, dense)
    if dense:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out = out * mask.any(-1, keepdim=True)  # rows that see nothing (padding): zeros, as flex gives
    else:
        flex = _compiled_flex() if compiled else _eager_flex
        out = flex(query, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
    return out[:, :, :n].transpose(1, 2).contiguous(), None
