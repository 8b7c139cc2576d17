"""Reference log-probs with a transformers causal LM, exactly as DPOTrainer sums them, computed fast.

Packed path (default): one row per pair, ``prompt + chosen + rejected``, attended block-causally: the rejected
tokens see the prompt but not the chosen ones, and their position ids continue after the prompt (prefix sharing,
Wang et al. 2024). The attention runs as two SDPA calls per row (:func:`prefix_shared_attention`: causal over
``prompt + chosen``, then rejected against ``prompt + rejected``), so no full block mask is materialised. Each
prompt token is computed once instead of twice. The first completion token of each side is predicted from the
last prompt position, so both sides gather that hidden state. Rows are sorted by length and batched by a token
budget (little padding); the LM head runs only at the positions whose next token is a completion token, followed by
``F.cross_entropy`` (no full log-softmax over all positions).

When truncation makes the two sides keep different prompt slices (``keep_end`` with long pairs), the pair is
packed as two independent segments (positions restart at 0), so the result still equals the collator's view.

Plain path (``packed=False``): each side as its own right-padded row, as the collator builds them; used to check
the packed path and for attention implementations that do not take a custom 4D mask.

Linear layers on CPU in fp32 (``linear_kernel="auto"``): the model's ``nn.Linear`` layers run through oneDNN's
fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits) for the duration of
our forwards only; the model is left unchanged afterwards. torch's default fp32 ``F.linear`` calls MKL's SGEMM,
which on the 2-core AMD EPYC dev machine runs without its AVX-512 code path (``MKL_VERBOSE=1``): there oneDNN
reached 185-213 GFLOP/s against MKL's 122-197 on the model's shapes. Gated SiLU MLPs (Llama, Mistral, Qwen...)
run as one fused unit (the SiLU, the gate x up product and the layer's residual add as GEMM post-ops), which saves
three passes over the activations. Every swap is checked at start-up: the model's body must give the same hidden
states with it. Both paths are IEEE fp32; they differ only in summation order (2e-6 per output, 3e-4 per row sum on
900-token orca rows).

Assumptions:
    a decoder whose attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (all
    transformers >= 5 LLMs); the packed path swaps in :func:`prefix_shared_attention` for its own forwards only and
    passes the row layout as the "4D mask", which transformers >= 5 hands through unchanged
    (``masking_utils._preprocess_mask_arguments``). Models with sliding-window or other custom masks: packed=False.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from dataclasses import dataclass, field

from .backend import LogProbBackend, kept_view, token_columns

logger = logging.getLogger(__name__)

_LM_HEAD_CHUNK = 2048  # positions per LM-head tile: bounds the (positions x vocab) logits buffer
# On CPU a tile's fp32 logits stay under glibc malloc's 32 MiB mmap ceiling, so their memory is reused from the heap
# instead of being mapped and page-faulted afresh for every tile (SmolLM2, vocab 49152: 160 positions; on the
# 24-row orca bench 2.0M -> 0.55M page faults, 1-2 s faster, peak RSS 2.0 -> 1.6 GB).
_CPU_LM_HEAD_TILE_BYTES = 30 << 20


def lm_head_tile(vocab_size: int, device) -> int:
    """Positions per LM-head tile: 2048 on accelerators; on CPU as many as fit 30 MiB of fp32 logits (64-2048)."""
    import torch

    if torch.device(device).type != "cpu":
        return _LM_HEAD_CHUNK
    return max(64, min(_LM_HEAD_CHUNK, _CPU_LM_HEAD_TILE_BYTES // (4 * vocab_size)))


LINEAR_KERNELS = ("auto", "onednn", "torch")


@dataclass
class _Row:
    """One model input row: tokens, positions, segment ids (0 = shared prefix, 1/2 = sides; -1 = padding)."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    # scored completion tokens: (predictor index in row, label, pair index in batch input, side 0/1)
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)


def _packed_row(pair_index: int, prompt, chosen, rejected, max_length, mode) -> _Row:
    vc = kept_view(len(prompt), len(chosen), max_length, mode)
    vr = kept_view(len(prompt), len(rejected), max_length, mode)
    row = _Row()
    sides = ((chosen, vc), (rejected, vr))
    if vc.prompt_start == vr.prompt_start:  # both sides keep the same prompt slice: share it
        prefix = prompt[vc.prompt_start :]
        n0 = len(prefix)
        row.ids += prefix
        row.pos += range(n0)
        row.seg += [0] * n0
        for side, (completion, view) in enumerate(sides):
            kept = completion[view.completion_start : view.completion_end]
            start = len(row.ids)
            row.ids += kept
            row.pos += range(n0, n0 + len(kept))
            row.seg += [side + 1] * len(kept)
            for k, label in enumerate(kept):
                if k == 0 and n0 == 0:
                    continue  # first token of the sequence: nothing predicts it (TRL's shifted labels skip it)
                pred = (n0 - 1) if k == 0 else start + k - 1
                row.targets.append((pred, label, pair_index, side))
    else:  # different prompt slices: two independent segments
        for side, (completion, view) in enumerate(sides):
            p = prompt[view.prompt_start :]
            kept = completion[view.completion_start : view.completion_end]
            start = len(row.ids)
            row.ids += p + kept
            row.pos += range(len(p) + len(kept))
            row.seg += [side + 1] * (len(p) + len(kept))
            for k, label in enumerate(kept):
                t = len(p) + k
                if t > 0:
                    row.targets.append((start + t - 1, label, pair_index, side))
    return row


def _plain_rows(pair_index: int, prompt, chosen, rejected, max_length, mode) -> list[_Row]:
    rows = []
    for side, completion in enumerate((chosen, rejected)):
        view = kept_view(len(prompt), len(completion), max_length, mode)
        p = prompt[view.prompt_start :]
        kept = completion[view.completion_start : view.completion_end]
        row = _Row(ids=p + kept, pos=list(range(len(p) + len(kept))), seg=[1] * (len(p) + len(kept)))
        row.targets = [(len(p) + k - 1, label, pair_index, side) for k, label in enumerate(kept) if len(p) + k > 0]
        rows.append(row)
    return rows


_PREFIX_ATTENTION = "sdpo_prefix_shared"


def _is_layout(mask) -> bool:
    import torch

    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int64 and mask.dim() == 4 and mask.shape[-1] == 3


def prefix_shared_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of packed ``prefix + side1 + side2`` rows, without materialising a full block mask.

    ``attention_mask`` is the row layout, an int64 tensor ``(batch, 1, pairs, 3)`` of segment lengths
    ``(n_prefix, n_side1, n_side2)`` of the pairs laid one after the other in each row; per pair ``prefix + side1``
    is plain causal attention (SDPA's causal kernel); ``side2`` attends to the prefix and causally to itself, never
    to ``side1``. Positions past the three segments (padding) get zeros. Any other mask is handed to transformers'
    SDPA attention unchanged.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _is_layout(attention_mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    gqa = {"enable_gqa": query.shape[1] != key.shape[1]}  # K/V stay at their own head count: no repeat_kv copies
    out = torch.zeros_like(query)  # (batch, heads, length, head_dim)
    for b, segments in enumerate(attention_mask[:, 0].tolist()):
        o = 0  # several pairs may share a row, one after the other
        for n0, n1, n2 in segments:
            a = o + n0 + n1
            if a > o:
                out[b, :, o:a] = F.scaled_dot_product_attention(
                    query[b : b + 1, :, o:a], key[b : b + 1, :, o:a], value[b : b + 1, :, o:a], is_causal=True,
                    scale=scaling, **gqa,
                )[0]
            if n2:
                k2 = torch.cat([key[b : b + 1, :, o : o + n0], key[b : b + 1, :, a : a + n2]], dim=2)
                v2 = torch.cat([value[b : b + 1, :, o : o + n0], value[b : b + 1, :, a : a + n2]], dim=2)
                out[b, :, a : a + n2] = F.scaled_dot_product_attention(
                    query[b : b + 1, :, a : a + n2], k2, v2, attn_mask=_side2_mask(n0, n2, query.device),
                    scale=scaling, **gqa,
                )[0]
            o = a + n2
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=32)
def _side2_mask(n0: int, n2: int, device):
    """(n2, n0 + n2) boolean mask: every prefix key, then causal over the side's own keys (cached across layers)."""
    import torch

    mask = torch.ones(n2, n0 + n2, dtype=torch.bool, device=device)
    mask[:, n0:] = torch.ones(n2, n2, dtype=torch.bool, device=device).tril()
    return mask


def _register_prefix_attention() -> str:
    from transformers import AttentionInterface

    if _PREFIX_ATTENTION not in AttentionInterface._global_mapping:  # noqa: SLF001
        AttentionInterface.register(_PREFIX_ATTENTION, prefix_shared_attention)
    return _PREFIX_ATTENTION


def _onednn_linear_forward(self, x):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


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
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        logger.debug("oneDNN linear unavailable: %s", e)
        return False
    return bool(torch.allclose(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5))


def _fused_gate_up(mlp, x):
    """``silu(gate_proj(x)) * up_proj(x)`` with the SiLU and the product as oneDNN GEMM post-ops, instead of two
    extra passes over the (tokens x intermediate) activations."""
    import torch

    op = torch.ops.mkldnn._linear_pointwise
    gate = op(x, mlp.gate_proj.weight, mlp.gate_proj.bias, "swish", [], "")
    return op.binary(x, gate, mlp.up_proj.weight, mlp.up_proj.bias, "mul")


def _onednn_gated_mlp_forward(self, x):
    """``down(silu(gate(x)) * up(x))`` through oneDNN (:func:`_fused_gate_up`, then ``down_proj``)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(_fused_gate_up(self, x), self.down_proj.weight, self.down_proj.bias,
                                              "none", [], "")


def _swappable_linear(m) -> bool:
    import torch

    return (type(m) is torch.nn.Linear and "forward" not in vars(m)
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu")


def _is_gated_silu_mlp(m) -> bool:
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
            expected, got = m(x), _onednn_gated_mlp_forward(m, x)
    except (RuntimeError, TypeError, ValueError):
        return False
    scale = float(expected.abs().max()) or 1.0
    return expected.shape == got.shape and bool((expected - got).abs().max() <= 1e-4 * scale)


_DECODER_LAYER_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


def _onednn_decoder_layer_forward(self, hidden_states, **kwargs):
    """A pre-norm decoder layer (Llama, Mistral, Qwen2/3...) whose gated SiLU MLP also takes the residual add as a
    GEMM post-op of ``down_proj``; attention runs through the layer's own attention module."""
    import torch

    attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = attn.add_(hidden_states)
    down = self.mlp.down_proj
    hidden = _fused_gate_up(self.mlp, self.post_attention_layernorm(hidden_states))
    return torch.ops.mkldnn._linear_pointwise.binary(hidden, hidden_states, down.weight, down.bias, "add")


def _onednn_swaps(model, layers: bool = True) -> list:
    """``(module, forward)`` pairs that run ``model``'s fp32 CPU linear layers through oneDNN: pre-norm decoder layers
    with a gated SiLU MLP with their residual add fused (``layers``), gated SiLU MLPs as one fused unit, every other
    plain ``nn.Linear`` as one GEMM. Modules whose forward a hook already replaced (accelerate offloading...) are
    left alone."""
    swaps = []
    for m in model.modules():
        if _swappable_linear(m):
            swaps.append((m, _onednn_linear_forward))
        elif hasattr(m, "gate_proj") and _is_gated_silu_mlp(m):
            swaps.append((m, _onednn_gated_mlp_forward))
        elif (layers and "forward" not in vars(m) and {n for n, _ in m.named_children()} == _DECODER_LAYER_PARTS
              and _is_gated_silu_mlp(m.mlp)):
            swaps.append((m, _onednn_decoder_layer_forward))
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
            with _linear_kernel(swaps):
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
def _linear_kernel(swaps: list):
    """Run the ``(module, forward)`` swaps inside the block; each module's own forward is restored on exit."""
    for m, forward in swaps:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m, _ in swaps:
            vars(m).pop("forward", None)


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group row indices, longest first, so that the rows' total length is ``<= batch_tokens`` (one row may exceed).

    For packed scoring, where a batch's rows are laid end to end in one sequence: no padding at all.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    used = 0
    for i in order:
        if batches and used + lengths[i] <= batch_tokens:
            batches[-1].append(i)
            used += lengths[i]
        else:
            batches.append([i])
            used = lengths[i]
    return batches


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group row indices, longest first, so that ``rows x longest row <= batch_tokens`` (a row alone may exceed it).

    Deterministic: ties are broken by index, so the same rows always form the same batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class TransformersBackend(LogProbBackend):
    """Exact DPOTrainer reference log-probs with a transformers causal LM.

    Args:
        model: a loaded ``PreTrainedModel`` or a path / hub id / ``"bundled"`` (loaded with ``load_causal_lm``).
        dtype: ``float32`` (default, TRL-exact), ``bfloat16`` or ``float16`` (when ``model`` is a path).
        max_length, truncation_mode: ``DPOConfig``'s; the collator's truncation is applied.
        batch_tokens: token budget per forward: the packed pairs' total length (laid end to end in one row, no
            padding), or rows x longest row for the plain path.
        packed: prompt computed once per pair (block-causal mask); ``False`` for the plain two-row layout.
        device: where to run; default the model's device.
        linear_kernel: ``"auto"`` (default): oneDNN's fp32 GEMM for the linear layers when the model runs in fp32
            on CPU and this torch build has it, else torch's own; ``"onednn"`` (error if unavailable) or ``"torch"``.
        progress: show a tqdm bar (tokens/s).

    Raises:
        ModelLoadError: the model cannot be loaded.
        ValueError: packed scoring of a sliding-window model whose window is shorter than max_length, an
            unknown ``linear_kernel``, or ``"onednn"`` where it cannot run (not fp32 on CPU, or not in this build).
    """

    def __init__(
        self,
        model,
        dtype: str = "float32",
        max_length: int | None = 1024,
        truncation_mode: str = "keep_start",
        batch_tokens: int = 4096,
        packed: bool = True,
        device: str | None = None,
        progress: bool = True,
        linear_kernel: str = "auto",
    ):
        from .models import load_causal_lm

        if linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {linear_kernel!r}")
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        if isinstance(model, str):
            model = load_causal_lm(model, dtype=dtype, device=device)
        self.model = model.eval()
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.device = next(model.parameters()).device if device is None else device
        self.max_length, self.truncation_mode = max_length, truncation_mode
        self.batch_tokens, self.packed, self.progress = batch_tokens, packed, progress
        cfg = model.config.get_text_config()
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if packed and window is not None and (max_length is None or window < max_length):
            raise ValueError(
                f"packed scoring does not model the sliding window ({window}) of this model; use packed=False")
        self._logit_scale = getattr(cfg, "logit_scale", None) or 1.0
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        import torch

        onednn_ok = (self.dtype == "float32" and torch.device(self.device).type == "cpu" and onednn_linear_available())
        if linear_kernel == "onednn" and not onednn_ok:
            raise ValueError("linear_kernel='onednn' needs a float32 model on CPU and a torch build with oneDNN")
        self._fast_linears = checked_onednn_swaps(model) if onednn_ok and linear_kernel != "torch" else []
        if linear_kernel == "onednn" and not self._fast_linears:
            raise ValueError("linear_kernel='onednn' changes this model's outputs (see the log); use 'torch'")
        self.linear_kernel = "onednn" if self._fast_linears else "torch"
        lm_head = model.get_output_embeddings()
        self._lm_head_tile = lm_head_tile(getattr(lm_head, "out_features", None) or cfg.vocab_size, self.device)
        self.tokens_computed = 0  # model positions run (padding excluded), for FLOP accounting
        self.padding_computed = 0

    def describe(self) -> dict:
        return {
            "backend": "transformers",
            "model": str(self.model_name),
            "dtype": self.dtype,
            "max_length": self.max_length,
            "truncation_mode": self.truncation_mode,
            "packed": self.packed,
            "batch_tokens": self.batch_tokens,
            "linear_kernel": self.linear_kernel,
        }

    def close(self) -> None:
        self.model = None

    def _rows(self, rows) -> list[_Row]:
        out = []
        for i, r in enumerate(rows):
            p, c, j = token_columns(r)
            if self.packed:
                out.append(_packed_row(i, p, c, j, self.max_length, self.truncation_mode))
            else:
                out.extend(_plain_rows(i, p, c, j, self.max_length, self.truncation_mode))
        return out

    def score(self, rows, return_per_token: bool = False) -> dict[str, list]:
        import torch
        from tqdm.auto import tqdm

        n = len(rows)
        model_rows = self._rows(rows)
        sums = torch.zeros(n, 2, dtype=torch.float64)
        counts = torch.zeros(n, 2, dtype=torch.long)
        per_token: list[list[list[float]]] = [[[], []] for _ in range(n)] if return_per_token else []
        group = token_batches if self.packed else length_batches
        batches = group([len(r.ids) for r in model_rows], self.batch_tokens)
        total = sum(len(r.ids) for r in model_rows)
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="Scoring pairs", disable=not self.progress or n == 0)
        with torch.inference_mode(), _linear_kernel(self._fast_linears):
            for batch in batches:
                logps, targets = self._forward([model_rows[i] for i in batch])
                pair = torch.tensor([t[2] for t in targets], dtype=torch.long)
                side = torch.tensor([t[3] for t in targets], dtype=torch.long)
                flat = pair * 2 + side
                sums.view(-1).index_add_(0, flat, logps.double())
                counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
                if return_per_token:  # targets are in token order within each side
                    for (_, _, p, s), v in zip(targets, logps.tolist()):
                        per_token[p][s].append(v)
                bar.update(sum(len(model_rows[i].ids) for i in batch))
        bar.close()
        out = {
            "chosen_logps": sums[:, 0].tolist(),
            "rejected_logps": sums[:, 1].tolist(),
            "chosen_tokens": counts[:, 0].tolist(),
            "rejected_tokens": counts[:, 1].tolist(),
        }
        if return_per_token:
            out["chosen_token_logps"] = [p[0] for p in per_token]
            out["rejected_token_logps"] = [p[1] for p in per_token]
        return out

    def _forward(self, batch_rows: list[_Row]):
        import torch
        import torch.nn.functional as F

        layout = []
        if self.packed:  # the pairs end to end in one row: no padding
            line = _Row()
            for r in batch_rows:
                off = len(line.ids)
                line.ids += r.ids
                line.pos += r.pos
                line.seg += r.seg
                line.targets += [(p + off, label, i, side) for p, label, i, side in r.targets]
                layout.append((r.seg.count(0), r.seg.count(1), r.seg.count(2)))
            batch_rows = [line]
        width = max(len(r.ids) for r in batch_rows)
        b = len(batch_rows)
        pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        ids = torch.full((b, width), int(pad_id), dtype=torch.long)
        pos = torch.zeros((b, width), dtype=torch.long)
        seg = torch.full((b, width), -1, dtype=torch.long)
        for i, r in enumerate(batch_rows):
            n = len(r.ids)
            ids[i, :n] = torch.tensor(r.ids, dtype=torch.long)
            pos[i, :n] = torch.tensor(r.pos, dtype=torch.long)
            seg[i, :n] = torch.tensor(r.seg, dtype=torch.long)
        self.tokens_computed += sum(len(r.ids) for r in batch_rows)
        self.padding_computed += b * width - sum(len(r.ids) for r in batch_rows)
        ids, pos, seg = ids.to(self.device), pos.to(self.device), seg.to(self.device)
        if self.packed:
            kwargs = {"attention_mask": torch.tensor([[layout]], device=self.device), "position_ids": pos}
        else:
            kwargs = {"attention_mask": (seg >= 0).long()}
        config = self.model.config
        previous = config._attn_implementation
        if self.packed:
            config._attn_implementation = _register_prefix_attention()
        try:
            hidden = self.model.base_model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
        finally:
            config._attn_implementation = previous
        targets = [t + (i,) for i, r in enumerate(batch_rows) for t in r.targets]
        if not targets:
            return torch.zeros(0), []
        rows_idx = torch.tensor([t[4] for t in targets], device=self.device)
        pred_idx = torch.tensor([t[0] for t in targets], device=self.device)
        labels = torch.tensor([t[1] for t in targets], device=self.device)
        h = hidden[rows_idx, pred_idx]
        lm_head = self.model.get_output_embeddings()
        out = []
        tile = self._lm_head_tile
        for s in range(0, h.size(0), tile):
            logits = lm_head(h[s : s + tile]).float()
            if self._logit_scale != 1.0:
                logits = logits * self._logit_scale
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            out.append(-F.cross_entropy(logits, labels[s : s + tile], reduction="none"))
        return torch.cat(out).cpu(), [t[:4] for t in targets]
