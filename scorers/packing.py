"""Laying tokenized preference pairs out as model input rows, exactly as DPOTrainer's collator keeps them.

Packed layout (prefix sharing, Wang & Hegde 2024): one row per pair, ``prompt + chosen + rejected``; the rejected
tokens see the prompt but not the chosen ones, and their position ids continue after the prompt. Each prompt token
is computed once instead of twice. The first completion token of each side is predicted from the last prompt
position, so both sides gather that hidden state. When truncation makes the two sides keep different prompt slices
(``keep_end`` with long pairs), the pair is laid out as two independent segments (positions restart at 0), so the
result still equals the collator's view.

Plain layout: each side as its own row, as the collator builds them (used to check the packed layout, and for
attention implementations that take no custom layout).

Several packed rows are laid end to end in one line (:func:`pack_line`) with a *layout* tensor of their segment
lengths, which :mod:`scorers.attention` reads instead of a mask: no padding at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .backend import kept_view


@dataclass
class PackedRow:
    """One model input row: tokens, positions, segment ids (0 = shared prefix, 1/2 = sides; -1 = padding)."""

    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    # scored completion tokens: (predictor index in row, label, pair index in batch input, side 0/1)
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)

    def segment_lengths(self) -> tuple[int, int, int]:
        """``(n_prefix, n_side1, n_side2)``: the row's layout entry."""
        return self.seg.count(0), self.seg.count(1), self.seg.count(2)


def packed_row(pair_index: int, prompt, chosen, rejected, max_length, mode) -> PackedRow:
    """One pair as the collator keeps it (``max_length``/``mode`` applied with :func:`kept_view`), packed."""
    vc = kept_view(len(prompt), len(chosen), max_length, mode)
    vr = kept_view(len(prompt), len(rejected), max_length, mode)
    return pair_row(pair_index, prompt[vc.prompt_start :], chosen[vc.completion_start : vc.completion_end],
                    prompt[vr.prompt_start :], rejected[vr.completion_start : vr.completion_end])


def pair_row(pair_index: int, chosen_prompt, chosen, rejected_prompt, rejected) -> PackedRow:
    """One pair packed from the tokens each side keeps after truncation (``*_prompt + side`` is the side's row).

    Equal prompts are shared (one prefix, the sides after it); different ones (``keep_end`` cutting the two sides
    differently) make two independent segments. A completion token at position 0 of its row gets no target.
    """
    row = PackedRow()
    sides = (chosen, rejected)
    if list(chosen_prompt) == list(rejected_prompt):  # both sides keep the same prompt slice: share it
        prefix = list(chosen_prompt)
        n0 = len(prefix)
        row.ids += prefix
        row.pos += range(n0)
        row.seg += [0] * n0
        for side, kept in enumerate(sides):
            kept = list(kept)
            start = len(row.ids)
            row.ids += kept
            row.pos += range(n0, n0 + len(kept))
            row.seg += [side + 1] * len(kept)
            for k, label in enumerate(kept):
                if k == 0 and n0 == 0:
                    continue  # first token of the sequence: nothing predicts it (TRL's shifted labels skip it)
                pred = (n0 - 1) if k == 0 else start + k - 1
                row.targets.append((pred, label, pair_index, side))
    else:  # different prompt slices: two independent segments
        for side, (p, kept) in enumerate(((chosen_prompt, chosen), (rejected_prompt, rejected))):
            p, kept = list(p), list(kept)
            start = len(row.ids)
            row.ids += p + kept
            row.pos += range(len(p) + len(kept))
            row.seg += [side + 1] * (len(p) + len(kept))
            for k, label in enumerate(kept):
                t = len(p) + k
                if t > 0:
                    row.targets.append((start + t - 1, label, pair_index, side))
    return row


def plain_rows(pair_index: int, prompt, chosen, rejected, max_length, mode) -> list[PackedRow]:
    rows = []
    for side, completion in enumerate((chosen, rejected)):
        view = kept_view(len(prompt), len(completion), max_length, mode)
        p = prompt[view.prompt_start :]
        kept = completion[view.completion_start : view.completion_end]
        row = PackedRow(ids=p + kept, pos=list(range(len(p) + len(kept))), seg=[1] * (len(p) + len(kept)))
        row.targets = [(len(p) + k - 1, label, pair_index, side) for k, label in enumerate(kept) if len(p) + k > 0]
        rows.append(row)
    return rows


def pack_line(rows: list[PackedRow]) -> tuple[PackedRow, list[tuple[int, int, int]]]:
    """The rows laid end to end in one row, and each row's ``(n_prefix, n_side1, n_side2)`` in order."""
    line = PackedRow()
    layout = []
    for r in rows:
        off = len(line.ids)
        line.ids += r.ids
        line.pos += r.pos
        line.seg += r.seg
        line.targets += [(p + off, label, i, side) for p, label, i, side in r.targets]
        layout.append(r.segment_lengths())
    return line, layout


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group row indices, longest first, so that the rows' total length is ``<= batch_tokens`` (one row may exceed).

    For packed scoring, where a batch's rows are laid end to end in one sequence: no padding at all.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    used = 0
    for i in order:
        if batches and used + lengths[i] <= batch_tokens:
            batches[-1].append(i)
            used += lengths[i]
        else:
            batches.append([i])
            used = lengths[i]
    return batches


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group row indices, longest first, so that ``rows x longest row <= batch_tokens`` (a row alone may exceed it).

    Deterministic: ties are broken by index, so the same rows always form the same batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches

