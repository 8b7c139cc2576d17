"""γ (the reference margin) and the statistics the sDPO paper reads from it: the one implementation.

γ = chosen_logps − rejected_logps per pair; *reward accuracy* is the share of pairs with γ > 0. The paper orders
sources by M0's reward accuracy on them and tracks mean γ_ref on held-out pairs step by step. Every stage (scoring
job, partitioner, chunk statistics, trainer logs) computes them here.
"""

from __future__ import annotations

import numpy as np


def margins(chosen, rejected) -> np.ndarray:
    """γ per pair as float64 (inputs: sequences or arrays of summed log-probs)."""
    return np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)


def dpo_margins(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> np.ndarray:
    """The DPO implicit-reward margin per pair, β((log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))), as
    float64, in this one order of operations (the ``implicit_reward`` signal, SelectiveDPO's held-out loss and the
    replication's metrics all compute it here, so they agree to the bit)."""
    c, r, c0, r0 = (np.asarray(x, dtype=np.float64) for x in (chosen, rejected, ref_chosen, ref_rejected))
    return beta * ((c - c0) - (r - r0))


def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> np.ndarray:
    """TRL's sigmoid DPO loss per pair, −log σ(margin) of :func:`dpo_margins`, computed stably (log 2 at π = π_ref)."""
    return np.logaddexp(0.0, -dpo_margins(chosen, rejected, ref_chosen, ref_rejected, beta))


def margin_stats(chosen, rejected) -> dict:
    """``{"pairs", "reward_accuracy", "mean_margin", "median_margin"}`` of the pairs (None values when empty)."""
    g = margins(chosen, rejected)
    if not len(g):
        return {"pairs": 0, "reward_accuracy": None, "mean_margin": None, "median_margin": None}
    return {"pairs": int(len(g)), "reward_accuracy": float((g > 0).mean()), "mean_margin": float(g.mean()),
            "median_margin": float(np.median(g))}


def margin_stats_by(groups, chosen, rejected, names=None) -> dict[str, dict]:
    """:func:`margin_stats` per group (e.g. per source), keyed by the group's name, names in sorted order.

    ``groups`` holds each pair's group: its name, or (with ``names``) an integer code into ``names``.
    """
    g = margins(chosen, rejected)
    if names is None:
        names, codes = np.unique(np.asarray([str(x) for x in groups], dtype=object), return_inverse=True)
    else:
        codes = np.asarray(groups)
    out = {}
    for code, name in sorted(enumerate(names), key=lambda kv: str(kv[1])):
        mask = codes == code
        if mask.any():
            out[str(name)] = margin_stats(g[mask], np.zeros(int(mask.sum())))
    return out
