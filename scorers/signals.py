"""Difficulty signals: each a documented formula over a scored part's columns, with a direction.

"Easy" means the reference model (or the data's own labels) already agrees with the preference label. Each signal
writes one column; ``difficulty`` (higher = harder) is the chosen signal turned to that direction:
``difficulty = -value`` for a ``higher_is_easier`` signal, ``value`` otherwise.

=======================  ======================  ===================================================================
signal (column)          direction               formula
=======================  ======================  ===================================================================
ref_margin               higher_is_easier        γ = chosen_logps − rejected_logps (sums over the kept completion
                                                 tokens under the reference model; the sDPO paper's γ_ref)
ref_margin_per_token     higher_is_easier        chosen_logps/chosen_tokens − rejected_logps/rejected_tokens (length-
                                                 normalised γ; a side with 0 scored tokens counts 0)
implicit_reward          higher_is_easier        β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)], π the
                                                 ``policy_model``, π_ref the reference model (DPO's implicit reward
                                                 margin)
rating_gap               higher_is_easier        score_chosen − score_rejected (dataset columns, e.g. UltraFeedback
                                                 ratings, as Curry-DPO uses)
reward_model             higher_is_easier        r(prompt, chosen) − r(prompt, rejected) under a sequence-
                                                 classification reward model (first logit)
prompt_perplexity        higher_is_harder        exp(−prompt_logps / prompt_tokens): the reference model's per-token
                                                 perplexity of the prompt (its first max_length tokens; 2D-Curri-DPO's
                                                 prompt-complexity axis, see partitioner order grid_2d)
length_gap               higher_is_easier        rejected_tokens − chosen_tokens (summed log-probs favour the shorter
                                                 side; an ablation baseline)
random                   higher_is_harder        uniform in [0, 1) from sha256(seed, row_id): seeded, independent of
                                                 batching and parts (an ablation baseline)
=======================  ======================  ===================================================================
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from .columns import (
    CHOSEN_LOGPS,
    CHOSEN_TOKENS,
    POLICY_CHOSEN_LOGPS,
    PROMPT_LOGPS,
    PROMPT_TOKENS,
    POLICY_REJECTED_LOGPS,
    REJECTED_LOGPS,
    REJECTED_TOKENS,
    REWARD_CHOSEN,
    REWARD_REJECTED,
    ROW_ID,
)
from .errors import ConfigError, UserError
from .stats import dpo_margins


@dataclass(frozen=True)
class Signal:
    name: str
    column: str
    direction: str  # "higher_is_easier" | "higher_is_harder"
    formula: str

    def meta(self) -> dict:
        return {"name": self.name, "column": self.column, "direction": self.direction, "formula": self.formula}


SIGNALS = {
    s.name: s
    for s in (
        Signal("ref_margin", "ref_margin", "higher_is_easier", "chosen_logps - rejected_logps"),
        Signal("ref_margin_per_token", "ref_margin_per_token", "higher_is_easier",
               "chosen_logps / chosen_tokens - rejected_logps / rejected_tokens"),
        Signal("implicit_reward", "implicit_reward", "higher_is_easier",
               "beta * ((policy_chosen_logps - chosen_logps) - (policy_rejected_logps - rejected_logps))"),
        Signal("rating_gap", "rating_gap", "higher_is_easier", "score_chosen - score_rejected"),
        Signal("reward_model", "reward_margin", "higher_is_easier", "reward_chosen - reward_rejected"),
        Signal("prompt_perplexity", "prompt_perplexity", "higher_is_harder", "exp(-prompt_logps / prompt_tokens)"),
        Signal("length_gap", "length_gap", "higher_is_easier", "rejected_tokens - chosen_tokens"),
        Signal("random", "random", "higher_is_harder", "uniform[0,1) from sha256(seed, row_id)"),
    )
}


def get_signal(name: str) -> Signal:
    """The signal called ``name``.

    Raises:
        ConfigError: unknown name (one line, listing the known ones).
    """
    try:
        return SIGNALS[name]
    except KeyError:
        raise ConfigError(f"unknown signal {name!r}; choose from {', '.join(SIGNALS)}") from None


def parse_signals(names) -> list[Signal]:
    """Signals from a list or a comma-separated string, de-duplicated in order."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ConfigError("at least one signal is needed")
    return [get_signal(n) for n in dict.fromkeys(names)]


def _per_token(logps: float, tokens: int) -> float:
    return logps / tokens if tokens else 0.0


def random_value(seed: int, row_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def compute_signal(signal: Signal, cols: dict, *, beta: float = 0.1, seed: int = 0,
                   rating_columns: tuple[str, str] = ("score_chosen", "score_rejected")) -> list[float]:
    """Values of ``signal`` for one part, from its columns (a dict of equal-length lists).

    Raises:
        UserError: a column the signal needs is missing (one line).
    """

    def need(*names):
        missing = [n for n in names if n not in cols]
        if missing:
            raise UserError(f"signal {signal.name!r} needs column(s) {', '.join(missing)}, which the data lacks")
        return [cols[n] for n in names]

    name = signal.name
    if name == "ref_margin":
        c, r = need(CHOSEN_LOGPS, REJECTED_LOGPS)
        return [a - b for a, b in zip(c, r)]
    if name == "ref_margin_per_token":
        c, r, nc, nr = need(CHOSEN_LOGPS, REJECTED_LOGPS, CHOSEN_TOKENS, REJECTED_TOKENS)
        return [_per_token(a, x) - _per_token(b, y) for a, b, x, y in zip(c, r, nc, nr)]
    if name == "implicit_reward":
        c, r, pc, pr = need(CHOSEN_LOGPS, REJECTED_LOGPS, POLICY_CHOSEN_LOGPS, POLICY_REJECTED_LOGPS)
        return dpo_margins(pc, pr, c, r, beta).tolist()
    if name == "rating_gap":
        sc, sr = need(*rating_columns)
        return [math.nan if a is None or b is None else float(a) - float(b) for a, b in zip(sc, sr)]
    if name == "reward_model":
        c, r = need(REWARD_CHOSEN, REWARD_REJECTED)
        return [a - b for a, b in zip(c, r)]
    if name == "prompt_perplexity":
        lp, n = need(PROMPT_LOGPS, PROMPT_TOKENS)
        return [math.exp(-a / k) if k else 1.0 for a, k in zip(lp, n)]
    if name == "length_gap":
        nc, nr = need(CHOSEN_TOKENS, REJECTED_TOKENS)
        return [float(y - x) for x, y in zip(nc, nr)]
    if name == "random":
        (ids,) = need(ROW_ID)
        return [random_value(seed, str(i)) for i in ids]
    raise ConfigError(f"unknown signal {name!r}")


def needs_prompt_logps(signals) -> bool:
    """Whether any of ``signals`` reads the prompt's own log-probs (an extra scoring pass over the prompts)."""
    return any(s.name == "prompt_perplexity" for s in signals)


def prompt_rows(rows) -> list[dict]:
    """Each row's prompt as a pseudo-pair whose chosen side is the prompt after its first token, so any backend's
    summed completion log-probs are the prompt's own (rejected side: one token, cheap; its score is not used)."""
    out = []
    for r in rows:
        prompt = list(r["prompt_ids"])
        out.append({"prompt_ids": prompt[:1], "chosen_ids": prompt[1:], "rejected_ids": prompt[1:2]})
    return out


def to_difficulty(signal: Signal, values: list[float]) -> list[float]:
    """Turn a signal's values into difficulty (higher = harder)."""
    return [-v if signal.direction == "higher_is_easier" else v for v in values]
