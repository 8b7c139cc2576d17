"""The log-prob backend contract: tokenized pairs in, DPOTrainer's reference log-prob sums out.

A backend scores rows that carry TRL's token columns (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) and
returns, per row, the sums of per-token log-probs over the completion tokens that ``DataCollatorForPreference``
keeps after truncation, and how many tokens that is. Every backend (transformers, vLLM offline, vLLM server) applies the
same truncation through :func:`kept_view`, so their results are comparable with each other and with TRL.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from sdpo_core.columns import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from sdpo_core.errors import ConfigError


@dataclass(frozen=True)
class KeptView:
    """What the collator keeps of ``prompt + completion``: ``prompt[prompt_start:] + completion[:n_completion]``
    (keep_start) or ``prompt[prompt_start:] + completion[completion_start:]`` (keep_end).

    ``n_scored`` counts the completion tokens that get a log-prob: all kept completion tokens except one that
    sits at position 0 of the kept sequence (nothing predicts it; TRL's shifted labels skip it too).
    """

    prompt_start: int
    completion_start: int
    completion_end: int

    def n_prompt(self, n_prompt_total: int) -> int:
        return n_prompt_total - self.prompt_start

    @property
    def n_completion(self) -> int:
        return self.completion_end - self.completion_start


def kept_view(n_prompt: int, n_completion: int, max_length: int | None, truncation_mode: str) -> KeptView:
    """The part of ``prompt + completion`` that ``DataCollatorForPreference`` keeps (TRL 1.x).

    keep_start keeps the first ``max_length`` tokens; keep_end keeps the last ``max_length``.
    With keep_start and a prompt of ``>= max_length`` tokens no completion token is kept (the prompt itself is
    not cut here: such rows are rejected as ``prompt_too_long`` before scoring, as DPOTrainer drops them).
    """
    total = n_prompt + n_completion
    if max_length is None or total <= max_length:
        return KeptView(0, 0, n_completion)
    if truncation_mode == "keep_start":
        return KeptView(0, 0, max(0, max_length - n_prompt))
    if truncation_mode == "keep_end":
        drop = total - max_length
        return KeptView(min(drop, n_prompt), max(0, drop - n_prompt), n_completion)
    raise ConfigError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")


def n_scored_tokens(n_prompt: int, n_completion: int, max_length: int | None, truncation_mode: str) -> int:
    """How many completion tokens DPOTrainer sums for one side of a pair."""
    view = kept_view(n_prompt, n_completion, max_length, truncation_mode)
    n = view.n_completion
    if n and view.n_prompt(n_prompt) == 0:
        n -= 1  # the first kept token is at position 0: no label predicts it
    return n


class LogProbBackend(abc.ABC):
    """Scores tokenized preference pairs with a reference model.

    Subclasses implement :meth:`score`; :meth:`close` frees the model.
    """

    max_length: int | None
    truncation_mode: str

    @abc.abstractmethod
    def score(self, rows: list[dict]) -> dict[str, list]:
        """Score ``rows`` (each a mapping with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``).

        Returns:
            ``{"chosen_logps": [float], "rejected_logps": [float], "chosen_tokens": [int], "rejected_tokens": [int]}``
            in the order of ``rows``; sums over the completion tokens TRL keeps (see :func:`kept_view`).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model and any worker processes."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_columns(row) -> tuple[list[int], list[int], list[int]]:
    return list(row[PROMPT_IDS]), list(row[CHOSEN_IDS]), list(row[REJECTED_IDS])
