"""How far a policy has moved from a reference: the mean per-token KL divergence on given completions.

``KL(π‖π_ref)`` at a position is ``Σ_v π(v|prefix) (log π(v|prefix) − log π_ref(v|prefix))`` over the whole
vocabulary; here it is averaged over every completion position of the given pairs (chosen and rejected, each after
its prompt, teacher-forced: the prefixes are the data's, not samples of π). It is exact for those prefixes (no
sampling estimator), and costs two forwards of the probe with full logits. The stepwise driver's KL-adaptive
reference refresh (``ref_refresh='kl'``, after 2D-Curri-DPO) compares it with a threshold.

Assumptions:
    both models are causal LMs with the same tokenizer and vocabulary, on the same device; rows carry
    ``prompt_ids``/``chosen_ids``/``rejected_ids`` and are cut to ``max_length`` as DPOTrainer's collator does.
"""

from __future__ import annotations

from .backend import kept_view


def _sequences(rows, max_length: int | None, truncation_mode: str) -> list[tuple[list[int], int]]:
    """(tokens, first completion index) of each side of each row, as the collator keeps them."""
    out = []
    for r in rows:
        prompt = list(r["prompt_ids"])
        for side in ("chosen_ids", "rejected_ids"):
            completion = list(r[side])
            view = kept_view(len(prompt), len(completion), max_length, truncation_mode)
            p = prompt[view.prompt_start :]
            kept = completion[view.completion_start : view.completion_end]
            if kept and p:
                out.append((p + kept, len(p)))
    return out


def mean_token_kl(policy, reference, rows, *, max_length: int | None, truncation_mode: str = "keep_start",
                  batch_rows: int = 4) -> float:
    """Mean per-token ``KL(policy ‖ reference)`` in nats over the completion positions of ``rows``.

    Args:
        rows: a ``datasets.Dataset`` or list of dicts with the token-id columns.
        batch_rows: sequences per forward (the full-vocabulary logits of one batch are held in fp32).

    Returns:
        0.0 when no completion token is kept. Both models' train/eval modes are restored.
    """
    import torch
    import torch.nn.functional as F

    if hasattr(rows, "select_columns"):
        rows = rows.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    seqs = _sequences(rows, max_length, truncation_mode)
    modes = (policy.training, reference.training)
    policy.eval()
    reference.eval()
    device = next(policy.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for s in range(0, len(seqs), batch_rows):
                batch = seqs[s : s + batch_rows]
                width = max(len(t) for t, _ in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                score = torch.zeros((len(batch), width), dtype=torch.bool)  # positions that predict a completion token
                for i, (tokens, start) in enumerate(batch):
                    ids[i, : len(tokens)] = torch.tensor(tokens)
                    attn[i, : len(tokens)] = 1
                    score[i, start - 1 : len(tokens) - 1] = True
                ids, attn, score = ids.to(device), attn.to(device), score.to(device)
                logp = F.log_softmax(policy(input_ids=ids, attention_mask=attn).logits[score].float(), dim=-1)
                logq = F.log_softmax(reference(input_ids=ids, attention_mask=attn).logits[score].float(), dim=-1)
                total += float((logp.exp() * (logp - logq)).sum())
                count += int(score.sum())
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    return total / count if count else 0.0
