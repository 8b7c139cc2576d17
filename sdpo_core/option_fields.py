"""Options that several config dataclasses have, each declared once here: a function returning the option's
``field(...)`` (default, help, range or choices), called by every config that has it, as
:func:`scorers.flex_attention.packed_attention_field` is for ``packed_attention``. Two configs that each wrote the
option out drifted apart (``ScoringConfig.max_length`` declared its minimum, ``TokenizeConfig.max_length`` checked
it by hand; one ``dtype`` listed its choices, another only named them in its help);
``tests/test_architecture.py`` fails when two configs declare an option of the same name differently.
"""

from __future__ import annotations

from dataclasses import field

from .columns import DTYPES, TRUNCATION_MODES


def dtype_field():
    """``dtype``: what a model is loaded in (``ScoringConfig``, ``StepwiseConfig``, ``sdpo truthfulqa``)."""
    return field(default="float32", metadata={"choices": DTYPES, "help": "dtype the model is loaded in."})


def max_length_field():
    """``max_length``: ``DPOConfig.max_length`` as the tokenizer and the scorer apply it (``TokenizeConfig``,
    ``ScoringConfig``); at least 2 tokens, a prompt token and a completion token."""
    return field(default=1024, metadata={
        "min": 2, "help": "DPOConfig.max_length: prompt+completion longer than this is cut."})


def truncation_mode_field():
    """``truncation_mode``: ``DPOConfig.truncation_mode`` (``TokenizeConfig``, ``ScoringConfig``)."""
    return field(default="keep_start", metadata={
        "choices": TRUNCATION_MODES, "help": "DPOConfig.truncation_mode: which end of a too-long sequence is kept."})


def batch_tokens_field():
    """``batch_tokens``: the token budget of one forward pass (``ScoringConfig``, ``sdpo truthfulqa``)."""
    return field(default=4096, metadata={"min": 1, "help": "Token budget per forward pass."})


def device_field(**config_local):
    """``device``: the torch device a model runs on (``ScoringConfig``, ``sdpo truthfulqa``); ``config_local``:
    metadata about one config's own use of it (``ScoringConfig``'s ``guards_resume=False``)."""
    return field(default=None, metadata={"help": "torch device; default cpu.", **config_local})
