"""Tokenize preference pairs exactly as TRL's ``DPOTrainer`` does (TRL 1.x ``_prepare_dataset``).

We call TRL's own helpers (``_tokenize`` through ``scorers.compat``, ``common_prefix_length``, ``is_conversational``) in the same order
with the same arguments, so the ids are TRL's by construction; ``tests/test_tokenization.py`` checks them
against a real ``DPOTrainer`` on the real data.

What TRL does, per row:
  * standard (text) rows: EOS is appended to ``chosen``/``rejected`` unless already there; then
    ``prompt``, ``prompt+chosen`` and ``prompt+rejected`` are tokenized with the tokenizer's ``__call__``;
  * conversational rows: the chat template is applied to ``prompt`` (with the generation prompt),
    ``prompt+chosen`` and ``prompt+rejected``;
  * the completion starts where the tokenized prompt and prompt+completion diverge;
  * with ``max_length`` and ``truncation_mode="keep_start"``, rows whose prompt alone has ``>= max_length``
    tokens are dropped (silently, by TRL). We reject them with reason ``prompt_too_long`` instead, and flag
    rows whose prompt+completion the collator will cut (``chosen_truncated``/``rejected_truncated``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from scorers.compat import trl_tokenize
from sdpo_core.columns import CHOSEN_IDS, CHOSEN_TRUNCATED, PROMPT_IDS, REJECTED_IDS, REJECTED_TRUNCATED
from sdpo_core.columns import SOURCE
from sdpo_core.config import check_ranges
from sdpo_core.errors import UserError
from sdpo_core.option_fields import max_length_field, truncation_mode_field

logger = logging.getLogger(__name__)


class TokenizationError(UserError):
    """The data cannot be tokenized with this tokenizer (one-line message)."""


@dataclass
class TokenizeConfig:
    """How pairs are tokenized; mirrors the matching ``DPOConfig`` fields."""

    max_length: int | None = max_length_field()
    truncation_mode: str = truncation_mode_field()

    def __post_init__(self):
        check_ranges(self)


def tokenize_row(example: dict, tokenizer) -> dict:
    """Token ids of one canonical row, as DPOTrainer computes them (see module docstring)."""
    from trl.data_utils import common_prefix_length, is_conversational

    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if is_conversational(example):
        prompt_ids = trl_tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        prompt_chosen_ids = trl_tokenize(tokenizer, prompt + chosen, **kwargs)["input_ids"]
        prompt_rejected_ids = trl_tokenize(tokenizer, prompt + rejected, **kwargs)["input_ids"]
    else:
        eos = tokenizer.eos_token
        if not chosen.endswith(eos):
            chosen = chosen + eos
        if not rejected.endswith(eos):
            rejected = rejected + eos
        prompt_ids = trl_tokenize(tokenizer, prompt)["input_ids"]
        prompt_chosen_ids = trl_tokenize(tokenizer, prompt + chosen)["input_ids"]
        prompt_rejected_ids = trl_tokenize(tokenizer, prompt + rejected)["input_ids"]
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids)
    )
    return {
        PROMPT_IDS: prompt_ids[:prompt_len],
        CHOSEN_IDS: prompt_chosen_ids[prompt_len:],
        REJECTED_IDS: prompt_rejected_ids[prompt_len:],
    }


def check_tokenizer_for(dataset, tokenizer) -> None:
    """Raise a one-line error when conversational data meets a tokenizer without a chat template."""
    from trl.data_utils import is_conversational

    if len(dataset) and is_conversational(dataset[0]) and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizationError(
            f"the data is conversational but tokenizer {name!r} has no chat template; "
            "use a chat model's tokenizer or set tokenizer.chat_template"
        )
    if tokenizer.eos_token is None:
        raise TokenizationError("the tokenizer has no eos_token, which DPOTrainer needs")


def tokenize_preferences(dataset, tokenizer, config: TokenizeConfig | None = None, num_proc: int | None = None):
    """Add TRL's token-id columns and truncation flags; split off rows TRL would drop.

    Args:
        dataset: a ``datasets.Dataset`` with canonical ``prompt``/``chosen``/``rejected`` columns (the loader's
            output), plus ``row_id``/``source``.
        tokenizer: the reference model's tokenizer (pad token set).
        config: ``max_length``/``truncation_mode`` as in ``DPOConfig``.

    Returns:
        ``(kept, rejects)``: ``kept`` is the dataset with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
        ``chosen_truncated``, ``rejected_truncated`` added; ``rejects`` is a list of reject records (see
        ``partitioner.data.rejects``) for rows whose prompt alone fills ``max_length`` (TRL drops them silently).

    Raises:
        TokenizationError: conversational data and a tokenizer without a chat template.
    """
    from .rejects import reject_record

    config = config or TokenizeConfig()
    check_tokenizer_for(dataset, tokenizer)
    max_length = config.max_length

    def fn(example):
        out = tokenize_row(example, tokenizer)
        n_prompt = len(out[PROMPT_IDS])
        out[CHOSEN_TRUNCATED] = max_length is not None and n_prompt + len(out[CHOSEN_IDS]) > max_length
        out[REJECTED_TRUNCATED] = max_length is not None and n_prompt + len(out[REJECTED_IDS]) > max_length
        return out

    tokenized = dataset.map(fn, num_proc=num_proc, desc="Tokenizing as DPOTrainer does")
    rejects = []
    if max_length is not None and config.truncation_mode == "keep_start":
        lengths = [len(p) for p in tokenized[PROMPT_IDS]]
        too_long = [i for i, n in enumerate(lengths) if n >= max_length]
        if too_long:
            for i in too_long:
                row = dataset[i]
                rejects.append(
                    reject_record(
                        source=row.get(SOURCE),
                        row_index=i,
                        stage="tokenize",
                        reason="prompt_too_long",
                        detail=f"prompt has {lengths[i]} tokens >= max_length {max_length}; DPOTrainer would drop it",
                        original=row,
                    )
                )
            keep = sorted(set(range(len(tokenized))) - set(too_long))
            tokenized = tokenized.select(keep)
    n_trunc = sum(1 for a, b in zip(tokenized[CHOSEN_TRUNCATED], tokenized[REJECTED_TRUNCATED]) if a or b)
    if n_trunc:
        logger.info("%d of %d pairs exceed max_length=%s and are truncated (%s), as DPOTrainer does",
                    n_trunc, len(tokenized), max_length, config.truncation_mode)
    return tokenized, rejects
