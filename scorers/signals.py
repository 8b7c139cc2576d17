"""Difficulty signals: each a documented formula over a scored part's columns, with a direction.

"Easy" means the reference model (or the data's own labels) already agrees with the preference label. Each signal
writes one column; ``difficulty`` (higher = harder) is the chosen signal turned to that direction:
``difficulty = -value`` for a :attr:`Direction.HIGHER_IS_EASIER` signal, ``value`` otherwise.

:data:`SIGNALS` is the one list of them: each :class:`Signal` is declared once with what it reads (the part's columns,
and the :class:`ModelPass` that writes those no reference pass does), how it computes, its direction and the help
text README.md's signal table shows (``tests/test_registries.py`` holds the table to it). README.md, section "How the
code is laid out", has the recipe for adding one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from sdpo_core.columns import (
    CHOSEN_LOGPS,
    CHOSEN_TOKENS,
    POLICY_CHOSEN_LOGPS,
    POLICY_REJECTED_LOGPS,
    PROMPT_IDS,
    PROMPT_LOGPS,
    PROMPT_TOKENS,
    REJECTED_LOGPS,
    REJECTED_TOKENS,
    REWARD_CHOSEN,
    REWARD_REJECTED,
    ROW_ID,
    Direction,
)
from sdpo_core.errors import ConfigError, UserError
from sdpo_core.stats import dpo_margins

# The rating columns rating_gap reads unless ScoringConfig.rating_columns names others.
DEFAULT_RATING_COLUMNS = ("score_chosen", "score_rejected")


def prompt_rows(rows) -> list[dict]:
    """Each row's prompt as a pseudo-pair whose chosen side is the prompt after its first token, so any backend's
    summed completion log-probs are the prompt's own (rejected side: one token, cheap; its score is not used)."""
    out = []
    for r in rows:
        prompt = list(r["prompt_ids"])
        out.append({"prompt_ids": prompt[:1], "chosen_ids": prompt[1:], "rejected_ids": prompt[1:2]})
    return out


def _same_rows(rows) -> list:
    return rows


@dataclass(frozen=True)
class ModelPass:
    """A pass of a model over each part besides the reference log-probs, whose scores become columns signals read.

    The pass runs when a signal needs it, or when its model option is set (its columns are then written anyway).
    """

    name: str
    model_option: str | None  # the ScoringConfig option naming the model; None: the reference model, any backend
    model_help: str  # what the model is (the error's words when a signal needs it and its option is unset)
    writes: tuple[tuple[str, str, str], ...]  # (column written, key of the model's scores, Arrow type name)
    rows: Callable[[list], list] = _same_rows  # what the model scores, from the part's tokenized rows


PROMPT_PASS = ModelPass("prompt", None, "the reference model, over the prompts' own tokens",
                        ((PROMPT_LOGPS, "chosen_logps", "float64"), (PROMPT_TOKENS, "chosen_tokens", "int64")),
                        rows=prompt_rows)
POLICY_PASS = ModelPass("policy", "policy_model", "the model compared with the reference",
                        ((POLICY_CHOSEN_LOGPS, "chosen_logps", "float64"),
                         (POLICY_REJECTED_LOGPS, "rejected_logps", "float64")))
REWARD_PASS = ModelPass("reward", "reward_model", "a sequence-classification model path",
                        ((REWARD_CHOSEN, "chosen", "float64"), (REWARD_REJECTED, "rejected", "float64")))
# In the order their columns are appended to a scored part.
MODEL_PASSES = (PROMPT_PASS, POLICY_PASS, REWARD_PASS)


@dataclass(frozen=True)
class SignalParams:
    """The scoring options a signal's formula reads."""

    beta: float = 0.1  # implicit_reward's β
    seed: int = 0  # random's seed
    rating_columns: tuple[str, str] = DEFAULT_RATING_COLUMNS  # the columns rating_gap reads

    def column(self, name: str) -> str:
        """The part's column a signal's declared column ``name`` is read from (rating columns may be renamed)."""
        return dict(zip(DEFAULT_RATING_COLUMNS, self.rating_columns)).get(name, name)


@dataclass(frozen=True)
class Signal:
    name: str
    column: str  # the column the values are written to
    direction: Direction
    formula: str  # as scoring.json records it
    help: str  # README.md's signal table shows it
    reads: tuple[str, ...]  # the part's columns the formula reads, in compute's argument order
    compute: Callable[..., list[float]]  # compute(params, *columns) -> one value per row
    model_pass: ModelPass | None = None  # the pass that writes columns of ``reads`` the reference pass does not

    def meta(self) -> dict:
        return {"name": self.name, "column": self.column, "direction": self.direction.value, "formula": self.formula}


def _per_token(logps: float, tokens: int) -> float:
    return logps / tokens if tokens else 0.0


def random_value(seed: int, row_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _difference(params, first, second) -> list[float]:
    return [a - b for a, b in zip(first, second)]


def _per_token_margin(params, chosen, rejected, n_chosen, n_rejected) -> list[float]:
    return [_per_token(a, x) - _per_token(b, y) for a, b, x, y in zip(chosen, rejected, n_chosen, n_rejected)]


def _implicit_reward(params, chosen, rejected, policy_chosen, policy_rejected) -> list[float]:
    return dpo_margins(policy_chosen, policy_rejected, chosen, rejected, params.beta).tolist()


def _rating_gap(params, chosen, rejected) -> list[float]:
    return [math.nan if a is None or b is None else float(a) - float(b) for a, b in zip(chosen, rejected)]


def _perplexity(params, logps, tokens) -> list[float]:
    return [math.exp(-a / k) if k else 1.0 for a, k in zip(logps, tokens)]


def _length(params, ids) -> list[float]:
    return [float(len(i)) for i in ids]


def _float_difference(params, first, second) -> list[float]:
    return [float(a - b) for a, b in zip(first, second)]


def _random(params, row_ids) -> list[float]:
    return [random_value(params.seed, str(i)) for i in row_ids]


EASIER, HARDER = Direction.HIGHER_IS_EASIER, Direction.HIGHER_IS_HARDER
SIGNALS = {s.name: s for s in (
    Signal("ref_margin", "ref_margin", EASIER, "chosen_logps - rejected_logps",
           "γ = chosen_logps − rejected_logps under the reference (the paper's γ_ref)",
           (CHOSEN_LOGPS, REJECTED_LOGPS), _difference),
    Signal("ref_margin_per_token", "ref_margin_per_token", EASIER,
           "chosen_logps / chosen_tokens - rejected_logps / rejected_tokens",
           "chosen_logps/chosen_tokens − rejected_logps/rejected_tokens (length-normalised γ; a side with 0 scored "
           "tokens counts 0)",
           (CHOSEN_LOGPS, REJECTED_LOGPS, CHOSEN_TOKENS, REJECTED_TOKENS), _per_token_margin),
    Signal("implicit_reward", "implicit_reward", EASIER,
           "beta * ((policy_chosen_logps - chosen_logps) - (policy_rejected_logps - rejected_logps))",
           "β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)], π = `--policy-model` (DPO's implicit "
           "reward margin; β = `--beta`)",
           (CHOSEN_LOGPS, REJECTED_LOGPS, POLICY_CHOSEN_LOGPS, POLICY_REJECTED_LOGPS), _implicit_reward,
           POLICY_PASS),
    Signal("rating_gap", "rating_gap", EASIER, "score_chosen - score_rejected",
           "score_chosen − score_rejected from dataset columns (UltraFeedback-style ratings; other columns: "
           "`--rating-columns`)",
           DEFAULT_RATING_COLUMNS, _rating_gap),
    Signal("reward_model", "reward_margin", EASIER, "reward_chosen - reward_rejected",
           "r(prompt, chosen) − r(prompt, rejected) under a sequence-classification `--reward-model` (its first "
           "logit)",
           (REWARD_CHOSEN, REWARD_REJECTED), _difference, REWARD_PASS),
    Signal("prompt_perplexity", "prompt_perplexity", HARDER, "exp(-prompt_logps / prompt_tokens)",
           "exp(−prompt_logps/prompt_tokens): the reference model's per-token perplexity of the prompt (its first "
           "max_length tokens; one more pass over the prompts, on any backend; 2D-Curri-DPO's prompt complexity)",
           (PROMPT_LOGPS, PROMPT_TOKENS), _perplexity, PROMPT_PASS),
    Signal("prompt_length", "prompt_length", HARDER, "len(prompt_ids)",
           "the prompt's length in tokens as DPOTrainer tokenizes it (chat template included): a prompt complexity "
           "without a model pass",
           (PROMPT_IDS,), _length),
    Signal("length_gap", "length_gap", EASIER, "rejected_tokens - chosen_tokens",
           "rejected_tokens − chosen_tokens (summed log-probs favour the shorter side; an ablation baseline)",
           (REJECTED_TOKENS, CHOSEN_TOKENS), _float_difference),
    Signal("random", "random", HARDER, "uniform[0,1) from sha256(seed, row_id)",
           "uniform in [0, 1) from sha256(seed, row_id): seeded, independent of batching and parts (the paper's "
           "random-partition ablation)",
           (ROW_ID,), _random),
)}


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


def check_models(signals, options) -> None:
    """Every model the ``signals``' passes need is named by its option in ``options`` (a ScoringConfig).

    Raises:
        ConfigError: a signal's model option is unset (one line; the first pass's, in :data:`MODEL_PASSES` order).
    """
    for model_pass in MODEL_PASSES:
        option = model_pass.model_option
        for s in signals:
            if s.model_pass is model_pass and option and not getattr(options, option):
                raise ConfigError(f"signal {s.name} needs {option} ({model_pass.model_help})")


def passes_to_run(signals, options) -> list[ModelPass]:
    """The model passes a part needs: those the ``signals`` read, and those whose model ``options`` names."""
    needed = {s.model_pass for s in signals if s.model_pass}
    return [p for p in MODEL_PASSES if p in needed or (p.model_option and getattr(options, p.model_option))]


def compute_signal(signal: Signal, cols: dict, *, beta: float = 0.1, seed: int = 0,
                   rating_columns: tuple[str, str] = DEFAULT_RATING_COLUMNS) -> list[float]:
    """Values of ``signal`` for one part, from its columns (a dict of equal-length lists).

    Raises:
        UserError: a column the signal needs is missing (one line).
    """
    params = SignalParams(beta=beta, seed=seed, rating_columns=tuple(rating_columns))
    names = [params.column(n) for n in signal.reads]
    missing = [n for n in names if n not in cols]
    if missing:
        raise UserError(f"signal {signal.name!r} needs column(s) {', '.join(missing)}, which the data lacks")
    return signal.compute(params, *(cols[n] for n in names))


def to_difficulty(signal: Signal, values: list[float]) -> list[float]:
    """Turn a signal's values into difficulty (higher = harder)."""
    return [-v if signal.direction == Direction.HIGHER_IS_EASIER else v for v in values]
