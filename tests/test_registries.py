"""The extension points' registries against README.md's tables and the command line's choices.

Each registry (signals, orders, chunkings, layouts, backends, reference modes, refresh rules) declares every entry once, with its help text; README.md
has one table per registry whose rows are the entries, in the registry's order, with that help, and no other row.
The configs the command line is generated from accept exactly the registries' names.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from partitioner.data.formats import FORMATS, LAYOUTS, MULTI_FORMATS, consumed_columns
from partitioner.data.loading import LoadConfig
from partitioner.partition import config as partition_config
from partitioner.partition.chunking import CHUNKING_NAMES, CHUNKINGS
from partitioner.partition.ordering import ORDER_NAMES, ORDERS
from partitioner.scoring.backends import BACKEND_NAMES, BACKENDS
from partitioner.scoring.config import ScoringConfig
from partitioner.scoring.part_scorer import MODEL_LOADERS
from sdpo_core import columns
from sdpo_core.columns import Direction
from scorers.signals import (
    DEFAULT_RATING_COLUMNS,
    MODEL_PASSES,
    SIGNALS,
    compute_signal,
    get_signal,
    parse_signals,
    to_difficulty,
)
from trainer_plugin.config import REF_MODES, REF_REFRESHES
from trainer_plugin.ref_modes import REFERENCE_MODES
from trainer_plugin.ref_refresh import REFRESH_RULES

README = Path(__file__).resolve().parents[1] / "README.md"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def readme_table(first_header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The one README table whose first header cell is ``first_header``: its header, and its rows by the first
    cell's name (without backticks), in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and _cells(line)[0] == first_header and set(lines[i + 1]) <= set("|-: "):
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                name = cells[0].strip("`")
                assert name not in rows, f"README table {first_header!r}: row {name!r} twice"
                rows[name] = cells
            found.append((_cells(line), rows))
    assert len(found) == 1, f"README.md has {len(found)} tables headed {first_header!r}, expected one"
    return found[0]


@pytest.mark.parametrize("header,registry", [
    ("signal", SIGNALS), ("order", ORDERS), ("chunking", CHUNKINGS), ("layout", LAYOUTS), ("backend", BACKENDS),
    ("ref mode", REFERENCE_MODES), ("ref refresh", REFRESH_RULES),
])
def test_readme_table_is_the_registry(header, registry):
    """Every entry in its README table, in the registry's order, with its help (the last cell); no other row."""
    _, rows = readme_table(header)
    assert list(rows) == list(registry), f"README table {header!r}: rows differ from the registry's entries"
    for name, entry in registry.items():
        assert rows[name][-1] == entry.help, f"README table {header!r}, row {name!r}: help differs from the registry"


def test_readme_signal_table_columns():
    """The signal table's other cells: the column written, the direction, the columns read."""
    header, rows = readme_table("signal")
    assert header == ["signal", "column", "direction", "reads", "what it measures"]
    for name, s in SIGNALS.items():
        assert rows[name][1:4] == [f"`{s.column}`", f"`{s.direction.value}`", ", ".join(f"`{c}`" for c in s.reads)]


def test_command_line_choices_are_the_registries_names():
    """The configs the flags come from check (and list in their help) exactly the registries' names."""
    assert partition_config.ORDERS == ORDER_NAMES
    assert REF_MODES == tuple(REFERENCE_MODES) and REF_REFRESHES == tuple(REFRESH_RULES)
    assert partition_config.CHUNKINGS == ("auto",) + CHUNKING_NAMES  # auto: picked from the options given
    fields = {f.name: f for f in dataclasses.fields(LoadConfig)}
    assert tuple(fields["format"].metadata["choices"]) == FORMATS == tuple(LAYOUTS)
    with pytest.raises(ValueError, match="backend must be one of " + ", ".join(BACKEND_NAMES)):
        ScoringConfig(backend="nope")
    with pytest.raises(ValueError, match="choose from " + ", ".join(SIGNALS)):
        ScoringConfig(signals=["nope"])


def test_orders_and_chunkings_agree_on_group_keys():
    """A chunking that cuts at a group key names the one order whose key is a group per row."""
    group_orders = {c.order for c in CHUNKINGS.values() if c.order}
    assert group_orders == {o.name for o in ORDERS.values() if o.key_is_group}


def test_layouts():
    assert MULTI_FORMATS == ("ultrafeedback", "rated_responses", "chosen_rejected_lists")
    assert consumed_columns("mapping", {"prompt": "q", "chosen": "a", "rejected": "b"}) == {"q", "a", "b"}
    for fmt in MULTI_FORMATS:
        with pytest.raises(ValueError, match="several pairs a row"):
            consumed_columns(fmt)


# Columns every scored part has before any extra model pass: the loader's, the tokenizer's, the reference pass's.
SCORED = {columns.ROW_ID, columns.PROMPT_IDS, columns.CHOSEN_LOGPS, columns.REJECTED_LOGPS, columns.CHOSEN_TOKENS,
          columns.REJECTED_TOKENS, *DEFAULT_RATING_COLUMNS}


def test_every_signal_reads_columns_something_writes():
    """A signal reads the scored part's own columns, or those of the model pass it names; a pass with a model
    option can be loaded, and the option is a ScoringConfig field."""
    for s in SIGNALS.values():
        written = {column for column, _, _ in s.model_pass.writes} if s.model_pass else set()
        assert set(s.reads) <= SCORED | written, s.name
        assert not s.model_pass or set(s.reads) & written, f"{s.name} names a pass it does not read"
        assert isinstance(s.direction, Direction)
        assert type(s.meta()["direction"]) is str  # scoring.json's text, as before the enum
    options = {p.model_option for p in MODEL_PASSES if p.model_option}
    assert set(MODEL_LOADERS) == options
    assert options <= {f.name for f in dataclasses.fields(ScoringConfig)}


def _part(n: int = 3) -> dict:
    """A part's columns with every column any signal reads."""
    cols = {c: [-1.5 * (i + 1) for i in range(n)] for c in (
        columns.CHOSEN_LOGPS, columns.REJECTED_LOGPS, columns.POLICY_CHOSEN_LOGPS, columns.POLICY_REJECTED_LOGPS,
        columns.PROMPT_LOGPS, columns.REWARD_CHOSEN, columns.REWARD_REJECTED, *DEFAULT_RATING_COLUMNS)}
    for c in (columns.CHOSEN_TOKENS, columns.REJECTED_TOKENS, columns.PROMPT_TOKENS):
        cols[c] = [i + 2 for i in range(n)]
    cols[columns.PROMPT_IDS] = [list(range(i + 1)) for i in range(n)]
    cols[columns.ROW_ID] = [f"{i:016x}" for i in range(n)]
    return cols


def test_every_signal_computes_one_value_a_row():
    for s in SIGNALS.values():
        values = compute_signal(s, _part())
        assert len(values) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in values), s.name


def test_prompt_length():
    """The signal added by README.md's recipe: the prompt's tokens, higher = harder, no model pass."""
    s = get_signal("prompt_length")
    assert s.model_pass is None and s.direction == Direction.HIGHER_IS_HARDER
    assert compute_signal(s, {columns.PROMPT_IDS: [[5, 6, 7], [8]]}) == [3.0, 1.0]
    assert to_difficulty(s, [3.0, 1.0]) == [3.0, 1.0]
    with pytest.raises(ValueError, match="needs column"):
        compute_signal(s, {})
    assert [p.name for p in parse_signals("ref_margin,prompt_length")] == ["ref_margin", "prompt_length"]
