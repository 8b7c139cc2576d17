"""Preference-data layouts, their detection, and conversion of one row to TRL's canonical form.

Canonical form (what DPOTrainer reads): ``prompt``, ``chosen``, ``rejected``, either all text (*standard*)
or all lists of ``{"role", "content"}`` messages (*conversational*), with an explicit prompt.

Layouts read (``format=`` names): :data:`LAYOUTS`, each declared once with its help text (README.md's layout table
shows it), the columns it consumes and its conversion.

The multi-response layouts (no conversion here) expand each row into several pairs (Curri-DPO; :mod:`.multi_response`).

Detection (:func:`detect_format`) is a vote: every row of a large sample gets its own layout
(:func:`detect_row_format`; a field that is null counts as absent) and the layout most rows fit wins. Every row is
then checked against that layout (:func:`convert_row`): a row of another layout is a ``mixed_format`` reject, a row
of the same family that lacks a field (a null or missing ``prompt`` in an explicit-prompt input) is a
``missing_field`` reject, and a ``prompt`` of the wrong type (a number, bytes) is ``non_text``. No row is ever
converted into another layout.

The one normalisation of text is TRL's: implicit prompts are extracted as TRL's ``extract_prompt`` does (longest
common prefix of turns for conversations, of characters for text); ShareGPT/OpenAI/HH turns are mapped to
``{"role", "content"}`` messages with their text unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sdpo_core.errors import UserError

from .fields import RowReject, field_value, messages_value, text_value

PROMPT_KEYS = ("prompt", "instruction")  # the prompt of a multi-response row, first present wins

# The keys of LoadConfig.column_mapping (system optional).
MAPPING_KEYS = ("prompt", "chosen", "rejected", "system")


class PreferenceDataError(UserError):
    """Input that cannot be read at all (one-line message): unknown layout, unreadable file, bad option."""


# --------------------------------------------------------------------------------------------- detection
def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def _is_response_list(value) -> bool:
    """Several responses: a non-empty list of texts, or of message lists. A list of message *objects* is one
    conversational response (TRL's conversational layout), never several."""
    return isinstance(value, list) and len(value) > 0 and (all(isinstance(v, str) for v in value)
                                                          or all(isinstance(v, list) for v in value))


def _looks_hh(text) -> bool:
    """An Anthropic-HH transcript: it has a ``Human:`` turn (an ``Assistant:`` turn is checked on conversion)."""
    return isinstance(text, str) and ("\n\nHuman:" in text or text.lstrip().startswith("Human:"))


def detect_row_format(row: Mapping) -> str | None:
    """The layout of one row, from its non-null keys and their value types; None when it matches none.

    A ``prompt`` that is present (not null) makes the row an explicit-prompt row whatever its type, so a prompt
    that is a number or bytes is reported as a bad prompt, never taken as an implicit-prompt row.
    """
    if not isinstance(row, Mapping):
        return None
    keys = {k for k, v in row.items() if v is not None}
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if "conversations" in keys and {"chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"chosen_messages", "rejected_messages"} <= keys:
        return "messages"
    # A row with chosen and rejected stays a pair layout even with a `completions`/`responses` column beside them.
    if keys & set(PROMPT_KEYS) and not {"chosen", "rejected"} <= keys:
        if "completions" in keys:
            return "ultrafeedback"
        if "responses" in keys and keys & {"ratings", "scores"}:
            return "rated_responses"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        if _is_response_list(chosen):
            return "chosen_rejected_lists"
        if _is_messages(chosen):
            return "conversational" if "prompt" in keys else "conversational_implicit"
        if isinstance(chosen, str):
            if "prompt" in keys:
                return "standard"
            return "hh" if _looks_hh(chosen) else "standard_implicit"
    return None


def vote_format(votes: Counter, columns) -> str:
    """The layout most rows fit (ties: the first in ``FORMATS``).

    Raises:
        PreferenceDataError: no row fits a known layout; the message lists the columns seen.
    """
    if not votes:
        raise PreferenceDataError(
            f"no known preference format fits columns {sorted(map(str, columns))[:20]}; expected one of "
            f"{', '.join(FORMATS[:-1])} (see partitioner/data/formats.py), or pass a column mapping, e.g. "
            "--column-mapping prompt=question,chosen=response_j,rejected=response_k"
        )
    best = max(votes.values())
    return next(f for f in FORMATS if votes.get(f) == best)


def detect_format(rows: list, columns=()) -> str:
    """The layout most of ``rows`` fit (see :func:`vote_format`)."""
    votes = Counter(f for f in map(detect_row_format, rows) if f is not None)
    return vote_format(votes, columns or sorted({k for r in rows if isinstance(r, Mapping) for k in r}))


# --------------------------------------------------------------------------------------------- helpers
def extract_prompt(chosen, rejected) -> tuple:
    """TRL's ``trl.data_utils.extract_prompt``, step for step (``tests/test_hostile_inputs.py`` checks it against
    TRL's own): the prompt is the longest common prefix of ``chosen`` and ``rejected`` (characters of text, turns
    of conversations), with a space before the first difference left to the completions. Kept here so loading does
    not import TRL (and torch).
    """
    for idx in range(min(len(chosen), len(rejected))):  # noqa: B007 - idx is used after the loop, as in TRL
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _check_conversational(prompt: list, chosen: list, rejected: list) -> tuple[list, list, list]:
    if not prompt:
        raise RowReject("empty_text", "prompt has no messages")
    if prompt[-1]["role"] == "assistant":
        raise RowReject("no_assistant_turn", "prompt ends with an assistant turn; nothing left to prefer")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise RowReject("no_assistant_turn", f"{name} has no turns after the prompt")
        if not any(m["role"] == "assistant" for m in turns):
            raise RowReject("no_assistant_turn", f"{name} has no assistant turn")
    if chosen == rejected:
        raise RowReject("identical_pair", "chosen and rejected are identical")
    return prompt, chosen, rejected


def _check_standard(prompt, chosen, rejected) -> tuple[str, str, str]:
    prompt = text_value(prompt, "prompt")
    chosen = text_value(chosen, "chosen")
    rejected = text_value(rejected, "rejected")
    if chosen == rejected:
        raise RowReject("identical_pair", "chosen and rejected are identical")
    return prompt, chosen, rejected


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _parse_hh(text: str, what: str) -> list[dict]:
    text = text if text.startswith("\n\n") else "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowReject("non_text", f"{what} has text before the first Human:/Assistant: turn")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content})
    if not turns:
        raise RowReject("non_text", f"{what} has no Human:/Assistant: turns")
    return turns


# --------------------------------------------------------------------------------------------- conversion
def _standard(row: Mapping, mapping) -> tuple:
    return _check_standard(field_value(row, "prompt"), field_value(row, "chosen"), field_value(row, "rejected"))


def _standard_implicit(row: Mapping, mapping) -> tuple:
    c, r = text_value(field_value(row, "chosen"), "chosen"), text_value(field_value(row, "rejected"), "rejected")
    return _check_standard(*extract_prompt(c, r))


def _conversational(row: Mapping, mapping) -> tuple:
    return _check_conversational(
        messages_value(field_value(row, "prompt"), "prompt"),
        messages_value(field_value(row, "chosen"), "chosen"),
        messages_value(field_value(row, "rejected"), "rejected"),
    )


def _full_conversations(ck: str, rk: str):
    """Rows whose columns ``ck``/``rk`` hold whole conversations; the prompt is their common turns (TRL's)."""

    def convert(row: Mapping, mapping) -> tuple:
        c_all, r_all = messages_value(field_value(row, ck), ck), messages_value(field_value(row, rk), rk)
        for name, turns in ((ck, c_all), (rk, r_all)):
            if not any(m["role"] == "assistant" for m in turns):
                raise RowReject("no_assistant_turn", f"{name} has no assistant turn")
        return _check_conversational(*extract_prompt(c_all, r_all))

    return convert


def _openai(row: Mapping, mapping) -> tuple:
    inp = field_value(row, "input")
    if not isinstance(inp, Mapping):
        raise RowReject("non_text", f"input is {type(inp).__name__}, expected an object with 'messages'")
    return _check_conversational(
        messages_value(inp.get("messages"), "input.messages"),
        messages_value(field_value(row, "preferred_output"), "preferred_output"),
        messages_value(field_value(row, "non_preferred_output"), "non_preferred_output"),
    )


def _sharegpt(row: Mapping, mapping) -> tuple:
    turns = messages_value(field_value(row, "conversations"), "conversations", "from", "value")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowReject("non_text", f"system is {type(system).__name__}, expected text")
    if system and system.strip() and not any(m["role"] == "system" for m in turns):
        turns = [{"role": "system", "content": system}] + turns
    return _check_conversational(
        turns,
        messages_value(field_value(row, "chosen"), "chosen", "from", "value"),
        messages_value(field_value(row, "rejected"), "rejected", "from", "value"),
    )


def _hh(row: Mapping, mapping) -> tuple:
    ct = _parse_hh(text_value(field_value(row, "chosen"), "chosen"), "chosen")
    rt = _parse_hh(text_value(field_value(row, "rejected"), "rejected"), "rejected")
    if ct[-1]["role"] != "assistant" or rt[-1]["role"] != "assistant":
        raise RowReject("no_assistant_turn", "transcript does not end with an Assistant: turn")
    if ct[:-1] != rt[:-1]:
        raise RowReject("prompt_mismatch", "chosen and rejected transcripts have different contexts")
    for m in ct + rt:
        if m["role"] == "user" and not m["content"].strip():
            raise RowReject("empty_text", "a Human: turn is empty")
    if not ct[-1]["content"].strip() or not rt[-1]["content"].strip():
        raise RowReject("empty_text", "the final Assistant: turn is empty")
    return _check_conversational(ct[:-1], ct[-1:], rt[-1:])


def _mapped(row: Mapping, mapping) -> tuple:
    return _convert_mapped(row, mapping or {})


def _pair_layout(fmt: str) -> Layout:
    """The layout ``fmt``, which must convert a row into one pair.

    Raises:
        PreferenceDataError: an unknown layout, or a multi-response one (a caller's mistake, not the data's).
    """
    layout = LAYOUTS.get(fmt)
    if layout is None:
        raise PreferenceDataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if layout.convert is None:
        raise PreferenceDataError(f"format {fmt!r} gives several pairs a row: expand it with "
                                  "partitioner.data.multi_response.expand_row")
    return layout


def consumed_columns(fmt: str, mapping: Mapping | None = None) -> set[str]:
    """The input columns layout ``fmt`` turns into prompt/chosen/rejected (the others pass through)."""
    layout = _pair_layout(fmt)
    return set((mapping or {}).values()) if layout.consumes is None else set(layout.consumes)


def convert_row(row: Mapping, fmt: str, mapping: Mapping | None = None) -> tuple[dict, dict]:
    """Convert one row of layout ``fmt`` to ``({"prompt", "chosen", "rejected"}, extras)``.

    Raises:
        RowReject: the row is unusable; ``reason`` says why.
    """
    if not isinstance(row, Mapping):
        raise RowReject("not_an_object", f"row is {type(row).__name__}, expected an object")
    if fmt != "mapping":
        own = detect_row_format(row)
        if own is not None and own != fmt and (fmt, own) not in _PROMPT_MISSING:
            raise RowReject("mixed_format", f"row looks like {own!r} in a {fmt!r} input")
    p, c, r = _pair_layout(fmt).convert(row, mapping)
    consumed = consumed_columns(fmt, mapping)
    extras = {k: v for k, v in row.items() if k not in consumed}
    return {"prompt": p, "chosen": c, "rejected": r}, extras


# (input layout, row layout) pairs where the row is the input's layout without its prompt: the conversion then
# rejects it as ``missing_field`` (prompt), which says more than ``mixed_format``.
_PROMPT_MISSING = {("standard", "standard_implicit"), ("standard", "hh"),
                   ("conversational", "conversational_implicit")}


def _convert_mapped(row: Mapping, mapping: Mapping) -> tuple:
    for key in ("prompt", "chosen", "rejected"):
        if key not in mapping:
            raise PreferenceDataError(f"column mapping needs prompt, chosen and rejected; got {dict(mapping)}")
    prompt, chosen, rejected = (field_value(row, mapping[k]) for k in ("prompt", "chosen", "rejected"))
    system = row.get(mapping["system"]) if "system" in mapping else None
    if isinstance(chosen, list) or isinstance(prompt, list):
        p = messages_value(prompt, "prompt") if isinstance(prompt, list) else [{"role": "user", "content": text_value(prompt, "prompt")}]
        if system and isinstance(system, str) and system.strip():
            p = [{"role": "system", "content": system}] + p
        wrap = lambda v, n: messages_value(v, n) if isinstance(v, list) else [{"role": "assistant", "content": text_value(v, n)}]  # noqa: E731
        return _check_conversational(p, wrap(chosen, "chosen"), wrap(rejected, "rejected"))
    if system is not None:
        if not isinstance(system, str):
            raise RowReject("non_text", f"system is {type(system).__name__}, expected text")
        p = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": text_value(prompt, "prompt")}
        ]
        return _check_conversational(
            p, [{"role": "assistant", "content": text_value(chosen, "chosen")}],
            [{"role": "assistant", "content": text_value(rejected, "rejected")}],
        )
    return _check_standard(prompt, chosen, rejected)


# --------------------------------------------------------------------------------------------- the layouts
@dataclass(frozen=True)
class Layout:
    """A preference-data layout (``LoadConfig.format``)."""

    name: str
    help: str  # README.md's layout table shows it
    consumes: tuple[str, ...] | None  # the columns turned into prompt/chosen/rejected; None: the column mapping's
    convert: Callable | None  # (row, column mapping) -> (prompt, chosen, rejected); None: several pairs a row


_PAIR = ("prompt", "chosen", "rejected")  # an implicit-prompt layout's null prompt (absent) is not passed through
# In detection's tie order (vote_format: the first wins).
LAYOUTS = {layout.name: layout for layout in (
    Layout("standard", "TRL standard, explicit prompt: `prompt`/`chosen`/`rejected` strings", _PAIR, _standard),
    Layout("standard_implicit", "TRL standard, implicit prompt: `chosen`/`rejected` strings sharing a prefix",
           _PAIR, _standard_implicit),
    Layout("conversational", "TRL conversational, explicit prompt: `prompt`/`chosen`/`rejected` message lists",
           _PAIR, _conversational),
    Layout("conversational_implicit", "TRL conversational, implicit prompt: whole conversations in "
           "`chosen`/`rejected`", _PAIR, _full_conversations("chosen", "rejected")),
    Layout("openai", "OpenAI DPO fine-tuning rows: `input.messages`, `preferred_output`, `non_preferred_output`",
           ("input", "preferred_output", "non_preferred_output"), _openai),
    Layout("sharegpt", "ShareGPT: `conversations` of `from`/`value` turns, `chosen`/`rejected` turns, optional "
           "`system`", ("conversations", "chosen", "rejected", "system"), _sharegpt),
    Layout("messages", "`chosen_messages`/`rejected_messages`: whole conversations (content as text or parts)",
           ("chosen_messages", "rejected_messages"), _full_conversations("chosen_messages", "rejected_messages")),
    Layout("hh", "Anthropic-HH transcripts: `Human:`/`Assistant:` turns in `chosen` and `rejected`", _PAIR, _hh),
    Layout("ultrafeedback", "`prompt` or `instruction`, and `completions`: objects with a response and a rating "
           "(several pairs a row)", (), None),
    Layout("rated_responses", "`prompt` or `instruction`, `responses` and `ratings` (or `scores`) of the same "
           "length (several pairs a row)", (), None),
    Layout("chosen_rejected_lists", "`prompt`, and `chosen`/`rejected` as lists of responses (texts or message "
           "lists), every chosen one above every rejected one (several pairs a row)", (), None),
    Layout("mapping", "any columns, named by a column mapping (`--column-mapping`: `prompt`, `chosen`, `rejected`, "
           "optional `system`)", None, _mapped),
)}
FORMATS = tuple(LAYOUTS)
# Layouts with several responses per prompt: each row becomes several pairs (:mod:`.multi_response`).
MULTI_FORMATS = tuple(layout.name for layout in LAYOUTS.values() if layout.convert is None)
