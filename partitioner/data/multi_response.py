"""Multi-response rows (several rated responses to one prompt) expanded into preference pairs, as Curri-DPO does.

Curri-DPO (Pattnaik et al., *Enhancing Alignment using Curriculum Learning & Ranked Preferences*, arXiv 2403.07230)
takes a prompt's rated responses, pairs the best one with each lower-rated one, and trains on the pairs with the
largest rating gap (the easiest) first. Here each row of a multi-response layout (:data:`.formats.MULTI_FORMATS`)
becomes the pairs of :func:`expand_row`; ordering them is the partitioner's job (signal ``rating_gap``, or the
``pair_rank`` column).

Layouts (the prompt is ``prompt`` or, when that is absent or null, ``instruction``; text or messages):
  ``ultrafeedback``          ``completions``: objects with the response in ``response``/``text``/``content`` and the
                             rating in ``overall_score``/``rating``/``score`` (``fine-grained_score`` as a fallback)
  ``rated_responses``        ``responses`` (texts, assistant messages, or message lists) and ``ratings`` or
                             ``scores``: numbers, one per response
  ``chosen_rejected_lists``  ``chosen`` and ``rejected`` as lists of responses (texts, or message lists): every
                             chosen response outranks every rejected one

Pairings (``LoadConfig.pairing``):
  ``best_vs_rest``  each top-rated response with each lower-rated one (Curri-DPO's pairs: n-1 per prompt when one
                    response is on top; responses tied on top each get their pairs)
  ``all``           every (higher-rated, lower-rated) combination: n(n-1)/2 per prompt without ties
Responses with equal ratings are never paired. ``chosen_rejected_lists`` gives every chosen x rejected pair with
either pairing (all chosen responses share the top rank).

Each pair row carries ``score_chosen``/``score_rejected`` (the ratings, as floats), ``group_id`` (16-hex content hash
of the prompt and its rated responses: the pairs of one input row share it) and ``pair_rank`` (1 = the group's
largest rating gap; ties by the chosen response's rating, then input order), and the input row's other columns.
``chosen_rejected_lists`` rows have no ratings, so their pairs get no ``score_chosen``/``score_rejected``: invented
1/0 scores would put every such pair at one made-up gap (and, mixed with rated data, at its hard end) where the
``rating_gap`` signal should say "no rating" (a missing column, or NaN beside rated sources; both stop the partition
with one line); order them by a model signal such as ``ref_margin`` instead. Their ``pair_rank`` is input order.

Row rejects (``partitioner.data.rejects``): ``too_few_responses``, ``length_mismatch``, ``bad_rating``,
``tied_ratings``, ``conflicting_ratings``, and the usual ``missing_field``/``non_text``/``empty_text``/
``no_assistant_turn``/``unknown_role``/``invalid_unicode`` for a bad prompt or response. A response given twice with
the same rating counts once (so no pair is emitted twice).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from sdpo_core.columns import CHOSEN, PROMPT, REJECTED, ROW_ID, SOURCE

from .convert import OTHER_LAYOUT_COLUMNS
from .fields import RowReject, field_value, message_value, messages_value, text_value
from .formats import MULTI_FORMATS, PROMPT_KEYS, PreferenceDataError, detect_row_format

PAIRINGS = ("best_vs_rest", "all")
TEXT_KEYS = ("response", "text", "content")  # a completion's response, first present wins
RATING_KEYS = ("overall_score", "rating", "score", "fine-grained_score")  # a completion's rating, see _rating_key
RATINGS_KEYS = ("ratings", "scores")
SCORE_CHOSEN, SCORE_REJECTED, GROUP_ID, PAIR_RANK = "score_chosen", "score_rejected", "group_id", "pair_rank"
# Input columns named like a column a pair row gets (or like another layout's key, which would make the pair row
# look like that layout) pass through as orig_<name>.
_RENAMED = {ROW_ID, SOURCE, PROMPT, CHOSEN, REJECTED, SCORE_CHOSEN, SCORE_REJECTED, GROUP_ID, PAIR_RANK,
            *OTHER_LAYOUT_COLUMNS}


@dataclass
class Group:
    """One row's prompt and its responses with their ratings (input order), as read from the row."""

    prompt: str | list
    responses: list  # text, or message lists
    ratings: list[float]  # chosen_rejected_lists: 1.0 chosen, 0.0 rejected (ranks, not emitted)
    names: list[str]  # where each response is in the row, for reject details
    rated: bool
    consumed: set


# --------------------------------------------------------------------------------------------- reading
def _prompt(row: Mapping) -> tuple[str | list, str]:
    key = next((k for k in PROMPT_KEYS if row.get(k) is not None), PROMPT)
    value = field_value(row, key)
    if isinstance(value, str):
        return text_value(value, key), key
    prompt = messages_value(value, key)
    if prompt[-1]["role"] == "assistant":
        raise RowReject("no_assistant_turn", f"{key} ends with an assistant turn; nothing left to prefer")
    return prompt, key


def _response(value, what: str) -> str | list:
    """A response: text, one assistant message, or a list of messages with an assistant turn."""
    if isinstance(value, str):
        return text_value(value, what)
    if isinstance(value, Mapping):
        value = [message_value(value, what)]
    elif isinstance(value, list):
        value = messages_value(value, what)
    elif value is None:
        raise RowReject("missing_field", f"{what} is missing or null")
    else:
        raise RowReject("non_text", f"{what} is {type(value).__name__}, expected text or messages")
    if not any(m["role"] == "assistant" for m in value):
        raise RowReject("no_assistant_turn", f"{what} has no assistant turn")
    return value


def _rating(value, what: str) -> float:
    # bool is a number in Python, but true/false is a label, not a rating; numpy numbers are Real too
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = "missing or null" if value is None else f"{type(value).__name__}, expected a number"
        raise RowReject("bad_rating", f"{what} is {shown}")
    try:
        rating = float(value)
    except OverflowError:  # an integer past float's range (its digits are not shown: there may be thousands)
        raise RowReject("bad_rating", f"{what} is an integer too large for a rating") from None
    if not math.isfinite(rating):
        raise RowReject("bad_rating", f"{what} is {rating}, expected a finite number")
    return rating


def _list(row: Mapping, key: str) -> list:
    value = field_value(row, key)
    if not isinstance(value, list):
        raise RowReject("non_text", f"{key} is {type(value).__name__}, expected a list")
    return value


def _rating_key(completions: list) -> str:
    """The one rating key of a row: the first of RATING_KEYS that any completion has (not null).

    A row never mixes keys: UltraFeedback's overall_score (1-10) and fine-grained_score (a mean of 1-5 aspect
    ratings) are on different scales, so a completion lacking the row's key is a ``bad_rating``, not a fallback.
    """
    for key in RATING_KEYS:
        if any(isinstance(c, Mapping) and c.get(key) is not None for c in completions):
            return key
    raise RowReject("bad_rating", f"no completion has a rating ({', '.join(RATING_KEYS)})")


def read_group(row: Mapping, fmt: str) -> Group:
    """The prompt and rated responses of a row of multi-response layout ``fmt``.

    Raises:
        RowReject: the row is unusable (see the module docstring for the reasons).
    """
    prompt, prompt_key = _prompt(row)
    if fmt == "ultrafeedback":
        completions = _list(row, "completions")
        if len(completions) < 2:
            raise RowReject("too_few_responses", f"{len(completions)} completion(s), a pair needs 2")
        rating_key = _rating_key(completions)
        responses, ratings, names = [], [], [f"completions[{i}]" for i in range(len(completions))]
        for what, c in zip(names, completions):
            if not isinstance(c, Mapping):
                raise RowReject("non_text", f"{what} is {type(c).__name__}, expected an object")
            text_key = next((k for k in TEXT_KEYS if c.get(k) is not None), TEXT_KEYS[0])
            responses.append(_response(c.get(text_key), f"{what}.{text_key}"))
            ratings.append(_rating(c.get(rating_key), f"{what}.{rating_key}"))
        return Group(prompt, responses, ratings, names, True, {prompt_key, "completions"})
    if fmt == "rated_responses":
        ratings_key = next((k for k in RATINGS_KEYS if row.get(k) is not None), RATINGS_KEYS[0])
        values, scores = _list(row, "responses"), _list(row, ratings_key)
        if len(values) != len(scores):
            raise RowReject("length_mismatch", f"{len(values)} responses but {len(scores)} {ratings_key}")
        if len(values) < 2:
            raise RowReject("too_few_responses", f"{len(values)} response(s), a pair needs 2")
        names = [f"responses[{i}]" for i in range(len(values))]
        responses = [_response(v, what) for what, v in zip(names, values)]
        ratings = [_rating(v, f"{ratings_key}[{i}]") for i, v in enumerate(scores)]
        return Group(prompt, responses, ratings, names, True, {prompt_key, "responses", ratings_key})
    if fmt == "chosen_rejected_lists":
        sides = {name: _list(row, name) for name in (CHOSEN, REJECTED)}
        for name, values in sides.items():
            if not values:
                raise RowReject("too_few_responses", f"{name} has no responses; a pair needs one on each side")
        responses, ratings, names = [], [], []
        for name, rank in ((CHOSEN, 1.0), (REJECTED, 0.0)):
            for i, v in enumerate(sides[name]):
                names.append(f"{name}[{i}]")
                if isinstance(v, Mapping):  # a message object here is one turn, not a response of its own
                    raise RowReject("non_text", f"{names[-1]} is an object; each response is text or a message list")
                responses.append(_response(v, names[-1]))
                ratings.append(rank)
        return Group(prompt, responses, ratings, names, False, {prompt_key, CHOSEN, REJECTED})
    raise PreferenceDataError(f"{fmt!r} is not a multi-response layout ({', '.join(MULTI_FORMATS)})")


# --------------------------------------------------------------------------------------------- pairing
def _as_messages(value, role: str) -> list:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _distinct(group: Group) -> tuple[list, list[float]]:
    """The responses with a repeat of the same response and rating dropped.

    Raises:
        RowReject: ``tied_ratings`` (no two ratings differ), ``conflicting_ratings`` (one response, two ratings).
    """
    if len(set(group.ratings)) < 2:  # chosen_rejected_lists rows always have two ranks
        raise RowReject("tied_ratings", f"all {len(group.ratings)} ratings are {group.ratings[0]:g}: no pair has "
                                        "a preference")
    responses, ratings, first = [], [], []
    for name, response, rating in zip(group.names, group.responses, group.ratings):
        if response in responses:
            j = responses.index(response)
            if ratings[j] != rating:
                how = f"rated {rating:g} and {ratings[j]:g}" if group.rated else "both chosen and rejected"
                raise RowReject("conflicting_ratings", f"{name} is the same response as {first[j]}, {how}")
            continue
        responses.append(response)
        ratings.append(rating)
        first.append(name)
    return responses, ratings


def pair_indices(ratings: list[float], pairing: str) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` index pairs of one group, largest rating gap first (ties: the higher chosen rating,
    then input order): position k in the list is pair rank k + 1.

    Raises:
        PreferenceDataError: an unknown ``pairing``.
    """
    if pairing not in PAIRINGS:
        raise PreferenceDataError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    top = max(ratings)
    pairs = [(i, j) for i, ri in enumerate(ratings) for j, rj in enumerate(ratings)
             if ri > rj and (pairing == "all" or ri == top)]
    return sorted(pairs, key=lambda p: (ratings[p[1]] - ratings[p[0]], -ratings[p[0]], p))


def _group_id(prompt, responses: list, ratings: list[float]) -> str:
    text = json.dumps([prompt, responses, ratings], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def expand_row(row, fmt: str, pairing: str) -> tuple[bool, list[dict]]:
    """``(conversational, pair rows)`` of one multi-response row: each pair row has ``prompt``/``chosen``/
    ``rejected`` in TRL's canonical form (all text, or all messages when the prompt or any response is messages),
    the pair columns (module docstring) and the row's other columns, in pair-rank order.

    Raises:
        RowReject: the row is unusable (``not_an_object``, ``mixed_format`` for a row of another layout, or a reason
            of :func:`read_group` / the pairing).
        PreferenceDataError: an unknown ``fmt`` or ``pairing``.
    """
    if not isinstance(row, Mapping):
        raise RowReject("not_an_object", f"row is {type(row).__name__}, expected an object")
    own = detect_row_format(row)
    if own is not None and own != fmt:
        raise RowReject("mixed_format", f"row looks like {own!r} in a {fmt!r} input")
    group = read_group(row, fmt)
    conversational = isinstance(group.prompt, list) or any(isinstance(r, list) for r in group.responses)
    if conversational:  # one kind per row, as DPOTrainer needs: text becomes a user / assistant message
        group.prompt = _as_messages(group.prompt, "user")
        group.responses = [_as_messages(r, "assistant") for r in group.responses]
    responses, ratings = _distinct(group)
    try:
        gid = _group_id(group.prompt, responses, ratings)
    except UnicodeEncodeError as e:
        raise RowReject("invalid_unicode", f"text holds a lone surrogate at {e.start}") from None
    extras = {(f"orig_{k}" if k in _RENAMED else k): v for k, v in row.items() if k not in group.consumed}
    out = []
    for rank, (i, j) in enumerate(pair_indices(ratings, pairing), start=1):
        pair = {**extras, PROMPT: group.prompt, CHOSEN: responses[i], REJECTED: responses[j], GROUP_ID: gid,
                PAIR_RANK: rank}
        if group.rated:
            pair[SCORE_CHOSEN], pair[SCORE_REJECTED] = ratings[i], ratings[j]
        out.append(pair)
    return conversational, out
