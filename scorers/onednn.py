"""fp32 linear layers through oneDNN on CPU, for inference forwards only (the scorer's; never training).

torch's default fp32 ``F.linear`` calls MKL's SGEMM, which on some x86 CPUs (AMD) runs without its AVX-512 code
path; oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits) does
not have that limit (figures: ``bench/RESULTS.md``, section "Scoring"). Gated SiLU MLPs (Llama, Mistral, Qwen...)
run as one fused unit (the SiLU, the gate x up product and the layer's residual add as GEMM post-ops), which saves
three passes over the activations.

The swaps are ``(module, forward)`` pairs applied by :func:`linear_kernel` for the duration of a block: the model
object is unchanged afterwards. Every set of swaps is checked at start-up (:func:`checked_onednn_swaps`): the
model's body must give the same hidden states with it. Both paths are IEEE fp32 and differ only in summation order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

from .compat import onednn_linear_pointwise

logger = logging.getLogger(__name__)

LINEAR_KERNELS = ("auto", "onednn", "torch")


def linear_forward(self, x):
    return onednn_linear_pointwise()(x, self.weight, self.bias, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether oneDNN's fp32 linear op exists in this torch build and agrees with ``F.linear`` on a small probe."""
    import torch
    import torch.nn.functional as F

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 5, 64), (40, 64), (40,)))
        out = onednn_linear_pointwise()(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        logger.debug("oneDNN linear unavailable: %s", e)
        return False
    return bool(torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5))


@functools.lru_cache(maxsize=16)
def onednn_is_faster(in_features: int, out_features: int, tokens: int = 512, seconds: float = 0.15) -> bool:
    """Whether oneDNN's fp32 GEMM beats torch's own ``F.linear`` (MKL) on this host for a ``(tokens, in_features) x
    (in_features, out_features)`` product: each timed for about ``seconds`` (best of its repeats, after one warm-up
    call), once per shape class and process. oneDNN wins by ~2x where MKL lacks its AVX-512 path (AMD Zen 4/5);
    on AVX2-only hosts MKL can win (issue 24: 167 vs 141 GFLOP/s), so the choice is measured, not assumed."""
    import time

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x, layer = torch.randn(tokens, in_features, generator=gen), torch.nn.Linear(in_features, out_features, bias=False)

    def best(f) -> float:
        f()
        times, start = [], time.perf_counter()
        while not times or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        mkl, onednn = best(lambda: F.linear(x, layer.weight)), best(lambda: linear_forward(layer, x))
    logger.debug("fp32 GEMM %dx%dx%d: oneDNN %.2f ms, F.linear %.2f ms", tokens, in_features, out_features,
                 1e3 * onednn, 1e3 * mkl)
    return onednn < mkl


def onednn_faster_for(model) -> bool:
    """:func:`onednn_is_faster` for the shape class of ``model``'s linear layers: its widest ``nn.Linear`` below the
    LM head (the MLP's up projection in a decoder), the GEMMs that dominate a forward."""
    shape = _widest_linear_shape(model, _swappable_linear)
    return shape is not None and onednn_is_faster(*shape)


def _widest_linear_shape(model, usable) -> tuple[int, int] | None:
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if usable(m) and m is not head]
    if not linears:
        return None
    widest = max(linears, key=lambda m: m.in_features * m.out_features)
    return widest.in_features, widest.out_features


def auto_linear_kernel(model_name_or_path: str, dtype: str = "float32", device: str | None = None) -> str:
    """What ``linear_kernel="auto"`` runs for the model at ``model_name_or_path`` in ``dtype`` on ``device`` on this
    host, ``"onednn"`` or ``"torch"``, without loading its weights (its linear shapes come from a model built on the
    meta device).

    The answer is a timing (:func:`onednn_is_faster`) and can differ between two processes on a host where the two
    GEMMs are close (AVX2-only x86): a job whose results must not depend on which process computed them (a resumed
    scoring job, Ray actors) resolves it once and passes the answer on (``partitioner.scoring.config``)."""
    import torch

    if (device or "cpu") != "cpu" or dtype != "float32" or not onednn_linear_available():
        return "torch"
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_model_path

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model_name_or_path)))
    except (OSError, ValueError, KeyError) as e:  # not a causal LM transformers builds: nothing to swap
        logger.debug("linear shapes of %s unknown: %s", model_name_or_path, e)
        return "torch"
    shape = _widest_linear_shape(model, lambda m: type(m) is torch.nn.Linear)
    return "onednn" if shape is not None and onednn_is_faster(*shape) else "torch"


def _fused_gate_up(mlp, x):
    """``silu(gate_proj(x)) * up_proj(x)`` with the SiLU and the product as oneDNN GEMM post-ops, instead of two
    extra passes over the (tokens x intermediate) activations."""
    op = onednn_linear_pointwise()
    gate = op(x, mlp.gate_proj.weight, mlp.gate_proj.bias, "swish", [], "")
    return op.binary(x, gate, mlp.up_proj.weight, mlp.up_proj.bias, "mul")


def gated_mlp_forward(self, x):
    """``down(silu(gate(x)) * up(x))`` through oneDNN (:func:`_fused_gate_up`, then ``down_proj``)."""
    return onednn_linear_pointwise()(_fused_gate_up(self, x), self.down_proj.weight, self.down_proj.bias, "none", [],
                                     "")


def _swappable_linear(m) -> bool:
    import torch

    return (type(m) is torch.nn.Linear and "forward" not in vars(m)
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu")


def is_gated_silu_mlp(m) -> bool:
    """Whether ``m`` computes ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2/3 MLPs...):
    three swappable linears, and its own forward agrees with the fused one on a random probe (so another activation
    or layout is never fused by mistake)."""
    import torch

    parts = [getattr(m, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if "forward" in vars(m) or not all(_swappable_linear(p) for p in parts):
        return False
    x = torch.randn(1, 4, parts[0].in_features, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            expected, got = m(x), gated_mlp_forward(m, x)
    except (RuntimeError, TypeError, ValueError):
        return False
    scale = float(expected.abs().max()) or 1.0
    return expected.shape == got.shape and bool((expected - got).abs().max() <= 1e-4 * scale)


_DECODER_LAYER_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


def decoder_layer_forward(self, hidden_states, **kwargs):
    """A pre-norm decoder layer (Llama, Mistral, Qwen2/3...) whose gated SiLU MLP also takes the residual add as a
    GEMM post-op of ``down_proj``; attention runs through the layer's own attention module."""
    attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = attn.add_(hidden_states)
    down = self.mlp.down_proj
    hidden = _fused_gate_up(self.mlp, self.post_attention_layernorm(hidden_states))
    return onednn_linear_pointwise().binary(hidden, hidden_states, down.weight, down.bias, "add")


def _onednn_swaps(model, layers: bool = True) -> list:
    """``(module, forward)`` pairs that run ``model``'s fp32 CPU linear layers through oneDNN: pre-norm decoder layers
    with a gated SiLU MLP with their residual add fused (``layers``), gated SiLU MLPs as one fused unit, every other
    plain ``nn.Linear`` as one GEMM. Modules whose forward a hook already replaced (accelerate offloading...) are
    left alone."""
    swaps = []
    for m in model.modules():
        if _swappable_linear(m):
            swaps.append((m, linear_forward))
        elif hasattr(m, "gate_proj") and is_gated_silu_mlp(m):
            swaps.append((m, gated_mlp_forward))
        elif (layers and "forward" not in vars(m) and {n for n, _ in m.named_children()} == _DECODER_LAYER_PARTS
              and is_gated_silu_mlp(m.mlp)):
            swaps.append((m, decoder_layer_forward))
    return swaps


def _same_hidden_states(model, swaps) -> bool:
    """Whether ``model``'s body gives the same last hidden states (to 1e-4 relative) with ``swaps`` as without, on a
    short random input run with the model's own attention."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0)).to(model.device)
    try:
        with torch.inference_mode():
            expected = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
            with linear_kernel(swaps):
                got = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        logger.debug("oneDNN swaps fail on this model: %s", e)
        return False
    scale = float(expected.abs().max()) or 1.0
    return expected.shape == got.shape and bool((expected - got).abs().max() <= 1e-4 * scale)


def checked_onednn_swaps(model) -> list:
    """:func:`_onednn_swaps` checked end to end on ``model``: with fused decoder layers if the body still computes
    the same, else without them, else none (``[]``: torch's own kernels)."""
    for layers in (True, False):
        swaps = _onednn_swaps(model, layers=layers)
        if swaps and _same_hidden_states(model, swaps):
            return swaps
    logger.warning("oneDNN linear layers change this model's outputs; scoring with torch's own kernels")
    return []


@contextlib.contextmanager
def linear_kernel(swaps: list):
    """Run the ``(module, forward)`` swaps inside the block; each module's own forward is restored on exit."""
    for m, forward in swaps:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m, _ in swaps:
            vars(m).pop("forward", None)

