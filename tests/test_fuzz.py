"""Fuzzing as a habit (hypothesis): arbitrary bytes under every extension and codec, arbitrary JSON values in every
field of every layout, arbitrary values for every option of every command's config dataclasses. Each must end in a
counted reject (rows in = kept + rejected) or a one-line ``UserError``, never another exception.

Examples per test: the ``ci`` profile (default, 40; registered in ``conftest.py``);
``pytest --hypothesis-profile=long tests/test_fuzz.py`` runs 1,000. Every example is bounded by the input sizes drawn (a few KB), and the whole test by ``pytest-timeout``.
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import gzip
import json
import lzma
import math
import tempfile
import typing
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner.data.formats import MULTI_FORMATS
from partitioner.data.loading import load_preferences_with_rejects
from sdpo_core.errors import UserError

EXTENSIONS = [".jsonl", ".json", ".csv", ".parquet", ".arrow"]


def _zst(data: bytes) -> bytes:
    out = pa.BufferOutputStream()
    with pa.CompressedOutputStream(out, "zstd") as f:
        f.write(data)
    return out.getvalue().to_pybytes()


CODECS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": _zst}


def _load(name: str, content: bytes):
    """Load one file; returns the report, or None for a one-line UserError. Anything else propagates (a bug)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        try:
            ds, report = load_preferences_with_rejects([str(path)], work_dir=Path(tmp) / "work")
        except UserError as e:
            assert "\n" not in str(e).strip() and len(str(e)) < 2000
            return None
        assert report.rows_in == report.rows_kept + report.rows_rejected
        # rows are counted as rows, pairs beside them: a multi-response row may give several pairs
        assert len(ds) == report.pairs >= report.rows_kept
        if not any(s.format in MULTI_FORMATS for s in report.sources):
            assert len(ds) == report.rows_kept
        assert report.rejects_table().num_rows == report.rows_rejected + report.pairs_rejected
        return report


@pytest.mark.timeout(600)
@given(data=st.binary(max_size=3000), ext=st.sampled_from(EXTENSIONS), codec=st.sampled_from(list(CODECS)))
def test_arbitrary_bytes_under_every_extension_and_codec(data, ext, codec):
    _load(f"d{ext}{codec}", CODECS[codec](data))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON_VALUES,
                                 "content": st.text(max_size=20) | JSON_VALUES})
RATING = st.integers(min_value=0, max_value=10) | st.floats(allow_nan=True) | JSON_VALUES
# One row of each layout the loader detects, every field drawn as any JSON value or as the layout's own kind.
LAYOUT_ROWS = {
    "standard": st.fixed_dictionaries({"prompt": st.text(max_size=20) | JSON_VALUES,
                                       "chosen": st.text(max_size=20) | JSON_VALUES,
                                       "rejected": st.text(max_size=20) | JSON_VALUES}),
    "conversational": st.fixed_dictionaries({"prompt": st.lists(MESSAGE, max_size=2) | JSON_VALUES,
                                             "chosen": st.lists(MESSAGE, max_size=2) | JSON_VALUES,
                                             "rejected": st.lists(MESSAGE, max_size=2) | JSON_VALUES}),
    "implicit": st.fixed_dictionaries({"chosen": st.text(max_size=30) | JSON_VALUES,
                                       "rejected": st.text(max_size=30) | JSON_VALUES}),
    "openai": st.fixed_dictionaries({"input": st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=2)})
                                     | JSON_VALUES,
                                     "preferred_output": st.lists(MESSAGE, max_size=1) | JSON_VALUES,
                                     "non_preferred_output": st.lists(MESSAGE, max_size=1) | JSON_VALUES}),
    "sharegpt": st.fixed_dictionaries({
        "conversations": st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"])
                                                         | JSON_VALUES, "value": st.text(max_size=20) | JSON_VALUES}),
                                  max_size=2) | JSON_VALUES,
        "chosen": st.fixed_dictionaries({"from": st.just("gpt"), "value": st.text(max_size=20)}) | JSON_VALUES,
        "rejected": st.fixed_dictionaries({"from": st.just("gpt"), "value": st.text(max_size=20)}) | JSON_VALUES}),
    "messages": st.fixed_dictionaries({"chosen_messages": st.lists(MESSAGE, max_size=2) | JSON_VALUES,
                                       "rejected_messages": st.lists(MESSAGE, max_size=2) | JSON_VALUES}),
    "hh": st.fixed_dictionaries({"chosen": st.text(max_size=10).map(lambda t: f"\n\nHuman: {t}\n\nAssistant: a")
                                 | JSON_VALUES, "rejected": st.text(max_size=10) | JSON_VALUES}),
    # multi-response layouts (several pairs a row): ratings drawn as numbers, or any JSON value
    "ultrafeedback": st.fixed_dictionaries({
        "instruction": st.text(max_size=20) | JSON_VALUES,
        "completions": st.lists(st.fixed_dictionaries({"response": st.text(max_size=20) | JSON_VALUES,
                                                       "overall_score": RATING}), max_size=4) | JSON_VALUES}),
    "rated_responses": st.fixed_dictionaries({
        "prompt": st.text(max_size=20) | st.lists(MESSAGE, max_size=2) | JSON_VALUES,
        "responses": st.lists(st.text(max_size=20) | MESSAGE, max_size=4) | JSON_VALUES,
        "ratings": st.lists(RATING, max_size=4) | JSON_VALUES}),
    "chosen_rejected_lists": st.fixed_dictionaries({
        "prompt": st.text(max_size=20) | JSON_VALUES,
        "chosen": st.lists(st.text(max_size=20), min_size=1, max_size=3) | st.lists(st.lists(MESSAGE, max_size=2),
                                                                                  min_size=1, max_size=2) | JSON_VALUES,
        "rejected": st.lists(st.text(max_size=20), max_size=3) | st.lists(st.lists(MESSAGE, max_size=2), max_size=2)
        | JSON_VALUES}),
}


@pytest.mark.timeout(600)
@given(layout=st.sampled_from(sorted(LAYOUT_ROWS)), data=st.data(), ext=st.sampled_from([".jsonl", ".json"]))
def test_arbitrary_json_values_in_every_field_of_every_layout(layout, data, ext):
    rows = data.draw(st.lists(LAYOUT_ROWS[layout], min_size=1, max_size=6))
    try:
        text = "".join(json.dumps(r) + "\n" for r in rows) if ext == ".jsonl" else json.dumps(rows)
    except ValueError:
        return  # not JSON-serialisable (NaN is written as NaN: Python's json does; Arrow's parser may refuse)
    report = _load(f"d{ext}", text.encode("utf-8", errors="surrogatepass"))
    if report is not None:
        assert report.rows_in == len(rows)


def _config_classes():
    from sdpo_cli.crossfit import CrossFitCommand
    from sdpo_cli.inspect import InspectCommand
    from sdpo_cli.partition import PartitionCommand
    from sdpo_cli.score import ScoreCommand
    from sdpo_cli.truthfulqa import TruthfulQACommand
    from partitioner.data.loading import LoadConfig
    from partitioner.partition.config import PartitionConfig
    from partitioner.run import RunConfig
    from partitioner.scoring.config import ScoringConfig
    from partitioner.scoring.ray_executor import RayConfig
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.selective import CrossFitConfig

    return [LoadConfig, ScoringConfig, PartitionConfig, RunConfig, RayConfig, StepwiseConfig, CrossFitConfig,
            TruthfulQACommand, ScoreCommand, PartitionCommand, InspectCommand, CrossFitCommand]


CLASSES = _config_classes()
OPTION_VALUES = (st.none() | st.booleans() | st.integers(min_value=-10**20, max_value=10**20)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
                 | st.lists(st.text(max_size=5) | st.integers(), max_size=3)
                 | st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=2))


@pytest.mark.timeout(600)
@given(cls=st.sampled_from(CLASSES), data=st.data())
def test_arbitrary_values_for_every_option(cls, data):
    """Each field of each config dataclass, set from flag text or a YAML value of any kind, through the same
    converters the command line uses: a config, or a one-line UserError."""
    from sdpo_cli.options import Options, build

    options = Options(argparse.ArgumentParser())
    options.add_dataclass(cls)
    names = sorted(options.converters)  # every flag: a composition's nested options too
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    values = {}
    try:
        for name in chosen:
            raw = data.draw(OPTION_VALUES | OPTION_VALUES.map(str))  # a YAML value, or flag text
            values[name] = options.converters[name](raw)
        build(cls, values)
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip()


def float_options(cls) -> list[tuple[str, type, str, bool]]:
    """``(option, dataclass, field, is_list)`` for every float or list-of-floats field of ``cls``, a nested config's
    under its dotted and its flat option name."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "section" in f.metadata:
            for leaf, owner, name, is_list in float_options(f.metadata["section"]):
                out += [(f"{f.name}.{leaf}", owner, name, is_list), (f.metadata.get("prefix", "") + leaf, owner, name,
                                                                     is_list)]
            continue
        members = [a for a in typing.get_args(hints[f.name]) or (hints[f.name],) if a is not type(None)]
        if float in members or list[float] in members:
            out.append((f.name, cls, f.name, float not in members))
    return out


FLOAT_OPTIONS = sorted({(cls.__name__, *o): (cls, *o) for cls in CLASSES for o in float_options(cls)}.values(),
                       key=lambda o: (o[0].__name__, o[1]))
NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "NaN", "inf", "-Infinity", 10**400]


def _one_line_refusal(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    assert str(e.value).strip() and "\n" not in str(e.value).strip() and len(str(e.value)) < 300
    return str(e.value)


@pytest.mark.parametrize("cls, option, owner, name, is_list", FLOAT_OPTIONS,
                         ids=[f"{o[0].__name__}-{o[1]}" for o in FLOAT_OPTIONS])
def test_non_finite_values_for_every_float_option(cls, option, owner, name, is_list):
    """NaN and ±infinity in every float field of every config (a list field: as one of its numbers) are refused
    with one line, given as flag text or a YAML value (the command line's converters, then the config) or from
    Python (the field's own dataclass): a comparison with NaN is false, so it passed every range check before."""
    from sdpo_cli.options import Options, build

    options = Options(argparse.ArgumentParser())
    options.add_dataclass(cls)
    assert option in options.converters
    for raw in NON_FINITE:
        given = ([0.5, raw] if not isinstance(raw, str) else f"0.5,{raw}") if is_list else raw
        message = _one_line_refusal(lambda: build(cls, {option: options.converters[option](given)}))
        assert name in message.replace("-", "_") or name in option
    for value in (math.nan, math.inf, -math.inf):
        _one_line_refusal(lambda: owner(**{name: [0.5, value] if is_list else value}))

