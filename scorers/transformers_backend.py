"""Reference log-probs with a transformers causal LM, exactly as DPOTrainer sums them, computed fast.

Packed path (default): each pair is one row, prompt computed once (:mod:`scorers.packing`), attended by
:func:`scorers.attention.prefix_shared_attention`; rows are sorted by length and laid end to end up to a token
budget (no padding); the LM head runs only at the positions whose next token is a completion token, followed by
``F.cross_entropy`` (no full log-softmax over all positions). Plain path (``packed=False``): each side as its own
right-padded row, as the collator builds them. On CPU in fp32 the linear layers may run through oneDNN
(:mod:`scorers.onednn`) for our own forwards only.

Assumptions:
    see :mod:`scorers.attention`; models with sliding-window attention shorter than ``max_length``: packed=False.
"""

from __future__ import annotations

import logging

from .attention import layout_tensor, prefix_attention, unmodelled_sliding_window
from .backend import LogProbBackend, token_columns
from sdpo_core.columns import TRUNCATION_MODES
from .compat import model_name_or_path
from sdpo_core.config import check_choice
from sdpo_core.errors import ConfigError
from .flex_attention import KERNELS
from .onednn import (LINEAR_KERNELS, checked_onednn_swaps, linear_kernel, onednn_faster_for,
                     onednn_linear_available)
from .packed_head import lm_head_scaling, lm_head_tile
from .packing import PackedRow, length_batches, pack_line, packed_row, plain_rows, token_batches

logger = logging.getLogger(__name__)

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
            on CPU, this torch build has it and a short measurement of the model's GEMM shape on this host finds it
            faster than torch's own (cached per process, :func:`scorers.onednn.onednn_is_faster`), else torch's
            own; ``"onednn"`` (error if unavailable) or ``"torch"``.
        progress: show a tqdm bar (tokens/s).
        packed_attention: the packed layout's attention kernel (:func:`scorers.flex_attention.chosen_kernel`):
            ``"auto"`` (default), ``"loop"``, ``"flex"`` or ``"flex_eager"``.

    Raises:
        ModelLoadError: the model cannot be loaded.
        ConfigError: packed scoring of a sliding-window model whose window is shorter than max_length, an
            unknown ``linear_kernel`` or ``packed_attention``, or ``"onednn"`` where it cannot run (not fp32 on CPU, or not in this build).
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
        packed_attention: str = "auto",
    ):
        from .models import load_causal_lm

        check_choice("linear_kernel", linear_kernel, LINEAR_KERNELS)
        check_choice("packed_attention", packed_attention, KERNELS)
        self.packed_attention = packed_attention
        check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
        if batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
        self.model_name = model if isinstance(model, str) else model_name_or_path(model.config, "")
        if isinstance(model, str):
            model = load_causal_lm(model, dtype=dtype, device=device)
        self.model = model.eval()
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.device = next(model.parameters()).device if device is None else device
        self.max_length, self.truncation_mode = max_length, truncation_mode
        self.batch_tokens, self.packed, self.progress = batch_tokens, packed, progress
        cfg = model.config.get_text_config()
        window = unmodelled_sliding_window(cfg, max_length)
        if packed and window is not None:
            raise ConfigError(
                f"packed scoring does not model the sliding window ({window}) of this model; use packed=False")
        self._logit_scale, self._softcap = lm_head_scaling(cfg)
        import torch

        onednn_ok = (self.dtype == "float32" and torch.device(self.device).type == "cpu" and onednn_linear_available())
        if linear_kernel == "onednn" and not onednn_ok:
            raise ConfigError("linear_kernel='onednn' needs a float32 model on CPU and a torch build with oneDNN")
        # "auto": oneDNN only where a short measurement on this host finds its GEMM faster than torch's (MKL)
        wanted = linear_kernel == "onednn" or (linear_kernel == "auto" and onednn_ok and onednn_faster_for(model))
        self._fast_linears = checked_onednn_swaps(model) if onednn_ok and wanted else []
        if linear_kernel == "onednn" and not self._fast_linears:
            raise ConfigError("linear_kernel='onednn' changes this model's outputs (see the log); use 'torch'")
        self.linear_kernel = "onednn" if self._fast_linears else "torch"
        lm_head = model.get_output_embeddings()
        self._lm_head_tile = lm_head_tile(getattr(lm_head, "out_features", None) or cfg.vocab_size, self.device)
        self.tokens_computed = 0  # model positions run (padding excluded), for FLOP accounting
        self.padding_computed = 0

    # Positions of packed rows start here (a subclass that keeps a shared prefix's keys and values moves them).
    _pos_offset = 0

    def _packed_attention(self):
        """The attention of packed rows inside our forwards (a subclass may add shared keys and values)."""
        return prefix_attention(self.model, kernel=self.packed_attention)

    def close(self) -> None:
        self.model = None

    def _rows(self, rows) -> list[PackedRow]:
        out = []
        for i, r in enumerate(rows):
            p, c, j = token_columns(r)
            if self.packed:
                out.append(packed_row(i, p, c, j, self.max_length, self.truncation_mode))
            else:
                out.extend(plain_rows(i, p, c, j, self.max_length, self.truncation_mode))
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
        with torch.inference_mode(), linear_kernel(self._fast_linears):
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

    def _forward(self, batch_rows: list[PackedRow]):
        import contextlib

        import torch
        import torch.nn.functional as F

        layout = []
        if self.packed:  # the pairs end to end in one row: no padding
            line, layout = pack_line(batch_rows)
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
            kwargs = {"attention_mask": layout_tensor([layout], self.device), "position_ids": pos + self._pos_offset}
        else:
            kwargs = {"attention_mask": (seg >= 0).long()}
        with self._packed_attention() if self.packed else contextlib.nullcontext():
            hidden = self.model.base_model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
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
