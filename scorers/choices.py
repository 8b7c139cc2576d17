"""Log-likelihoods of several continuations of one context each, with a prefix shared by every context computed once.

The multiple-choice benchmarks of lm-eval-harness (TruthfulQA MC1/MC2, ...) score every answer as a continuation of
its question, and every question starts with the same few-shot preamble. Here the tokens every context shares (the
longest common token prefix of all contexts) are run once, their keys and values kept per layer; each context's own
tokens are then the prompt of packed rows ``context + answer_a + answer_b`` (:mod:`scorers.packing`), so the
question is computed once per two answers and the preamble once for all, and the LM head runs only at the answers'
tokens. The sums equal a full forward of ``context + continuation`` per answer (lm-eval's ``loglikelihood``) up to
fp32 summation order.

Assumptions:
    those of :mod:`scorers.attention` (attention modules that carry ``layer_idx``); no truncation (contexts and
    continuations are scored whole).
"""

from __future__ import annotations

from .compat import cache_key_values
from .packing import PackedRow, pair_row
from .transformers_backend import TransformersBackend


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix every sequence starts with."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


class ContinuationScorer(TransformersBackend):
    """Summed log-probs of continuations given their contexts (token ids), exact and fast.

    Takes the arguments of :class:`TransformersBackend` (``max_length`` is ignored: nothing is truncated).
    """

    def __init__(self, model, **kwargs):
        kwargs.setdefault("max_length", None)
        kwargs.setdefault("progress", False)
        super().__init__(model, **kwargs)
        self._shared_kv = None

    def _packed_attention(self):
        from .attention import prefix_attention

        return prefix_attention(self.model, shared_kv=self._shared_kv, kernel=self.packed_attention)

    def score_continuations(self, contexts: list[list[int]], continuations: list[list[list[int]]]) -> list[list[float]]:
        """``result[i][j]``: sum of log p(continuations[i][j] | contexts[i]) over the continuation's tokens.

        Raises:
            ValueError: an empty context or continuation, or lists of different lengths.
        """
        import torch

        if len(contexts) != len(continuations):
            raise ValueError("one list of continuations per context")
        if any(not c for c in contexts) or any(not c for conts in continuations for c in conts):
            raise ValueError("contexts and continuations must not be empty")
        # Every context keeps at least its last token out of the shared part: it predicts the first answer token.
        n_shared = min(common_prefix_length(contexts), min((len(c) for c in contexts), default=1) - 1)
        rows: list[PackedRow] = []
        where: list[tuple[int, int, int]] = []  # per packed row: (context, first continuation, second or -1)
        for i, (ctx, conts) in enumerate(zip(contexts, continuations)):
            own = ctx[n_shared:]
            for j in range(0, len(conts), 2):
                second = conts[j + 1] if j + 1 < len(conts) else []
                rows.append(pair_row(len(rows), own, conts[j], own, second))
                where.append((i, j, j + 1 if second else -1))
        sums = torch.zeros(len(rows), 2, dtype=torch.float64)
        from .onednn import linear_kernel
        from .packing import token_batches

        with torch.inference_mode(), linear_kernel(self._fast_linears):
            self._shared_kv, self._pos_offset = None, 0
            if n_shared:
                ids = torch.tensor([contexts[0][:n_shared]], dtype=torch.long, device=self.device)
                cache = self.model.base_model(input_ids=ids, use_cache=True).past_key_values
                self._shared_kv, self._pos_offset = cache_key_values(cache), n_shared
                self.tokens_computed += n_shared
            try:
                for batch in token_batches([len(r.ids) for r in rows], self.batch_tokens):
                    logps, targets = self._forward([rows[k] for k in batch])
                    flat = torch.tensor([t[2] * 2 + t[3] for t in targets], dtype=torch.long)
                    sums.view(-1).index_add_(0, flat, logps.double())
            finally:
                self._shared_kv, self._pos_offset = None, 0
        out = [[0.0] * len(conts) for conts in continuations]
        for k, (i, j, j2) in enumerate(where):
            out[i][j] = float(sums[k, 0])
            if j2 >= 0:
                out[i][j2] = float(sums[k, 1])
        return out
