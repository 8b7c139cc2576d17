"""A collated DPO batch (``DataCollatorForPreference``'s padded rows) re-laid as packed lines for the packed forward.

TRL's collator gives ``2B`` right-padded rows (chosen rows first, then rejected) with a ``completion_mask``; it has
already applied ``max_length``/``truncation_mode``, so the tokens each side keeps are read from the rows themselves
and each pair becomes one packed row (:func:`scorers.packing.pair_row`: the prompt once when both sides keep the
same prompt tokens, two segments otherwise). Pairs are laid end to end in lines of at most ``batch_tokens`` tokens
(:func:`scorers.packing.token_batches`, longest first; a pair longer than the budget is a line of its own), or all
in one line in batch order.

Every target (a completion token that gets a log-prob) also gets its *flat index*: its rank among the ``True``
entries of TRL's ``completion_mask[:, 1:]`` in row-major order, i.e. where TRL's fused LM head puts that token's
log-prob. Per-token values computed on the lines are put back in TRL's ``(2B, L - 1)`` layout with it
(:meth:`PackedBatch.to_trl_layout`), so TRL's loss and metric code sees exactly what its own forward would give.
"""

from __future__ import annotations

from dataclasses import dataclass

from scorers.attention import layout_tensor
from scorers.packing import PackedRow, pack_line, pair_row, token_batches
from sdpo_core.errors import UserError


class PackedLayoutError(UserError):
    """The batch is not in ``DataCollatorForPreference``'s layout (right-padded rows, prompt then completion)."""


@dataclass
class PackedLine:
    """One forward's input: a packed line and the targets it scores."""

    input_ids: object  # (1, n) long
    position_ids: object  # (1, n) long
    layout: object  # (1, 1, pairs, 3) long, on CPU (read with .tolist() by the attention)
    predictors: object  # (m,) long: index in the line of the hidden state that predicts each target
    labels: object  # (m,) long
    flat_index: object  # (m,) long: the target's rank in TRL's completion_mask[:, 1:]
    tokens: int


@dataclass
class PackedBatch:
    lines: list[PackedLine]
    label_mask: object  # (2B, L - 1) bool: TRL's completion_mask[:, 1:]
    n_targets: int

    @property
    def tokens(self) -> int:
        return sum(line.tokens for line in self.lines)

    def to_trl_layout(self, flat):
        """A ``(n_targets,)`` tensor in flat-index order, scattered into TRL's ``(2B, L - 1)`` layout (zeros
        elsewhere); differentiable in ``flat``."""
        return flat.new_zeros(self.label_mask.shape).masked_scatter(self.label_mask, flat)


def _split_row(ids: list[int], attention: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    """``(prompt tokens, completion tokens)`` of one collated row; raises if it is not prompt, completion, padding."""
    n = sum(attention)
    p = next((i for i, c in enumerate(completion) if c), n)
    if attention[:n] != [1] * n or any(attention[n:]) or completion[p:n] != [1] * (n - p) or any(completion[n:]):
        raise PackedLayoutError(
            "the packed DPO forward needs DataCollatorForPreference's batches (right-padded rows: prompt tokens, "
            "then completion tokens); this batch's attention_mask/completion_mask differ; use packing=False")
    return ids[:p], ids[p:n]


def pack_collated(input_ids, attention_mask, completion_mask, batch_tokens: int | None, device) -> PackedBatch:
    """The collated batch as packed lines of at most ``batch_tokens`` tokens each (``None``: one line)."""
    import torch

    def as_long(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    ids, attention, completion = input_ids.tolist(), attention_mask.tolist(), completion_mask.tolist()
    n_rows = len(ids)
    if n_rows % 2:
        raise PackedLayoutError(f"a DPO batch has chosen and rejected rows, 2 per pair; got {n_rows} rows")
    n_pairs = n_rows // 2
    sides = [_split_row(ids[r], attention[r], completion[r]) for r in range(n_rows)]
    rows: list[PackedRow] = [pair_row(i, *sides[i], *sides[n_pairs + i]) for i in range(n_pairs)]

    label_mask = completion_mask[:, 1:].bool()
    per_row = [sum(c[1:]) for c in completion]  # targets per TRL row, in row order
    row_start = [0] * n_rows
    for r in range(1, n_rows):
        row_start[r] = row_start[r - 1] + per_row[r - 1]

    lines = []
    lengths = [len(r.ids) for r in rows]
    for group in [list(range(n_pairs))] if batch_tokens is None else token_batches(lengths, batch_tokens):
        line, layout = pack_line([rows[i] for i in group])
        seen = [0] * n_rows  # targets placed so far per TRL row; within a side they come in token order
        flat = []
        for _, _, pair, side in line.targets:
            r = side * n_pairs + pair
            flat.append(row_start[r] + seen[r])
            seen[r] += 1
        for i in group:
            for r in (i, n_pairs + i):
                if seen[r] != per_row[r]:
                    raise RuntimeError(f"packed row {i} scores {seen[r]} tokens of TRL row {r}, TRL {per_row[r]}")
        lines.append(PackedLine(
            input_ids=as_long(line.ids).unsqueeze(0),
            position_ids=as_long(line.pos).unsqueeze(0),
            layout=layout_tensor([layout], "cpu"),
            predictors=as_long([t[0] for t in line.targets]),
            labels=as_long([t[1] for t in line.targets]),
            flat_index=as_long(flat),
            tokens=len(line.ids),
        ))
    return PackedBatch(lines=lines, label_mask=label_mask, n_targets=sum(per_row))

