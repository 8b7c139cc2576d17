"""Option values that cannot mean anything (issue 35), drawn by hypothesis: each ends in one refusal line, or in a
config (a run's recorded settings) equal to what was given.

* non-finite numbers in float options, from the command line, YAML and Python;
* count options against the partition (or the pairs) they run on, refused before any model is touched;
* one option given twice in one YAML file, in any two spellings.

No model is loaded or trained here: M0 is a stand-in that raises :class:`_Reached` when the driver first touches it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from types import SimpleNamespace

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdpo_cli.main import main
from sdpo_cli.options import Options, build
from sdpo_core.errors import UserError
from tests.test_fuzz import float_options


def _refused(argv: list[str]) -> str:
    """The one line ``sdpo ARGV`` stops with (exit 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdpo: error:"), (code, lines)
    return lines[0]


# ------------------------------------------------------------------------------------- non-finite numbers


def _commands():
    from partitioner.run import RunConfig
    from sdpo_cli.crossfit import CrossFitCommand
    from sdpo_cli.partition import PartitionCommand
    from sdpo_cli.score import ScoreCommand
    from trainer_plugin.config import StepwiseConfig

    return {"run": RunConfig, "score": ScoreCommand, "partition": PartitionCommand, "crossfit": CrossFitCommand,
            "train": StepwiseConfig}


COMMAND_FLOATS = [(cmd, *o) for cmd, cls in _commands().items() for o in float_options(cls)]
NON_FINITE_TEXT = {"nan": "nan", "NaN": ".NaN", "inf": ".inf", "-Infinity": "-.inf", "1e400": "1e400"}


def _trl_float_options() -> list[str]:
    """TRL's DPOConfig options that take a float (sdpo train and crossfit pass them on): NaN is refused there too."""
    import typing

    from trl import DPOConfig

    hints = typing.get_type_hints(DPOConfig)
    return sorted(f.name for f in dataclasses.fields(DPOConfig) if f.init and f.name != "output_dir"
                  and {a for a in typing.get_args(hints[f.name]) or (hints[f.name],)} - {type(None)} == {float})


@given(option=st.sampled_from(COMMAND_FLOATS), text=st.sampled_from(sorted(NON_FINITE_TEXT)),
       spelling=st.sampled_from(["flag", "flag=", "yaml flat", "yaml nested", "python"]), data=st.data())
def test_non_finite_floats_are_one_line_refusals_from_every_spelling(option, text, spelling, data, tmp_path_factory):
    """A float option given NaN or ±infinity (a list option: as one of its numbers) stops with one line naming it
    before the command does anything, however it is spelled; and a finite value in its range is kept as given."""
    command, name, owner, field_name, is_list = option
    value = f"0.5,{text}" if is_list else text
    if spelling == "python":
        with pytest.raises(UserError) as e:
            owner(**{field_name: [0.5, float(text)] if is_list else float(text)})
        assert "\n" not in str(e.value) and field_name in str(e.value)
        return
    tmp = tmp_path_factory.mktemp("cfg")
    argv = [command]
    if spelling.startswith("yaml"):
        literal = f"[0.5, {NON_FINITE_TEXT[text]}]" if is_list else NON_FINITE_TEXT[text]
        section, _, leaf = name.rpartition(".")
        line = f"{section}:\n  {leaf}: {literal}\n" if section and spelling == "yaml nested" else f"{name}: {literal}\n"
        (tmp / "c.yaml").write_text(line)
        argv += ["--config", str(tmp / "c.yaml")]
    else:
        flag = "--" + data.draw(st.sampled_from([name, name.replace("_", "-")]))
        argv += [f"{flag}={value}"] if spelling == "flag=" else [flag, value]
    line = _refused(argv + ["--output-dir", str(tmp / "out")])
    assert field_name in line.replace("-", "_"), line
    assert not (tmp / "out").exists()  # refused before anything was written


@given(option=st.sampled_from(COMMAND_FLOATS), data=st.data())
def test_finite_floats_in_range_are_kept_as_given(option, data):
    """The counterpart: a finite value inside the declared range is the config's value (or, for a list whose
    numbers must also sum or increase, one refusal line)."""
    command, name, owner, field_name, is_list = option
    meta = next(f.metadata for f in dataclasses.fields(owner) if f.name == field_name)
    number = st.floats(min_value=meta.get("min", -1e6), max_value=meta.get("max", 1e6), allow_nan=False)
    value = data.draw(st.lists(number, min_size=1, max_size=3) if is_list else number)
    cls = _commands()[command]
    options = Options(argparse.ArgumentParser())
    options.add_dataclass(cls)
    raw = data.draw(st.sampled_from([value, ",".join(map(repr, value)) if is_list else repr(value)]))
    try:
        config = build(cls, {name: options.converters[name](raw)})
    except UserError as e:  # a list's own rules (sum to 1, increasing), or a bound the field's checks exclude
        assert "\n" not in str(e) and (is_list or value in (meta.get("min"), meta.get("max"))), str(e)
        return
    section = name.rpartition(".")[0] or next((f.name for f in dataclasses.fields(cls)
                                               if f.metadata.get("section") is owner), "")
    leaf = getattr(config, section) if section else config
    assert getattr(leaf, field_name) == value
    assert dataclasses.asdict(leaf)[field_name] == value  # what a run records (run.json, manifest)


@pytest.mark.parametrize("command", ["train", "crossfit"])
def test_nan_is_refused_in_trls_float_options_too(command, tmp_path):
    """sdpo train and crossfit take DPOConfig's options: NaN in any of its floats is refused by the converter."""
    for name in _trl_float_options():
        line = _refused([command, f"--{name}", "nan", "--output-dir", str(tmp_path / "out")])
        assert name in line.replace("-", "_") and "nan" in line


# ------------------------------------------------------------------------------- counts against the data


class _Reached(Exception):
    """M0 was touched: the run went past its checks."""


class _Unloadable:
    """M0 that raises :class:`_Reached` when the driver first reads it (loads its tokenizer)."""

    @property
    def config(self):
        raise _Reached


ARGS = SimpleNamespace(world_size=1, process_index=0, seed=0, max_length=None, truncation_mode="keep_start",
                       beta=0.1, output_dir="unused")


@pytest.fixture(scope="module")
def partitions(tmp_path_factory):
    """Partitions of 1..4 chunks (12 key-only rows: the driver stops before it tokenizes)."""
    from partitioner import PartitionConfig, partition_preferences

    table = pa.table({"row_id": [f"{i:016x}" for i in range(12)], "source": ["a", "b"] * 6,
                      "difficulty": [float(i) for i in range(12)]})
    return {n: partition_preferences(table, tmp_path_factory.mktemp(f"p{n}") / "part", PartitionConfig(chunks=n),
                                     progress=False) for n in range(1, 5)}


@given(chunks=st.integers(1, 4), steps=st.none() | st.integers(1, 6), sft_steps=st.integers(0, 6))
def test_step_counts_are_checked_against_the_partition_before_the_model(partitions, chunks, steps, sft_steps):
    """steps beyond the partition's chunks, or sft_steps beyond the steps trained, is one line naming both numbers,
    before M0 is touched; any other count reaches M0 with the config as given (steps not clamped)."""
    from trainer_plugin.config import StepwiseConfig, StepwiseInputError
    from trainer_plugin.driver import train_stepwise

    config = StepwiseConfig(steps=steps, sft_steps=sft_steps)
    trained = chunks if steps is None else steps
    if (steps or 0) > chunks or sft_steps > trained:
        with pytest.raises(StepwiseInputError) as e:
            train_stepwise(partitions[chunks], _Unloadable(), args=ARGS, config=config)
        message = str(e.value)
        assert "\n" not in message
        if (steps or 0) > chunks:
            assert f"steps {steps} " in message and f"{chunks} chunks" in message
        else:
            assert f"sft_steps {sft_steps} " in message and f" {trained} " in message
        return
    assert config.steps_for(chunks) == trained
    with pytest.raises(_Reached):
        train_stepwise(partitions[chunks], _Unloadable(), args=ARGS, config=config)
    assert (config.steps, config.sft_steps) == (steps, sft_steps)


@pytest.mark.parametrize("how", ["flags", "yaml"])
def test_sdpo_train_refuses_more_steps_than_chunks_in_one_line(partitions, how, tmp_path):
    options = {"steps": "5", "sft-steps": "1"}
    if how == "flags":
        argv = [f for k, v in options.items() for f in (f"--{k}", v)]
    else:
        (tmp_path / "c.yaml").write_text("steps: 5\nsft_steps: 1\n")
        argv = ["--config", str(tmp_path / "c.yaml")]
    line = _refused(["train", str(partitions[3]), "--output-dir", str(tmp_path / "run"), *argv])
    assert "steps 5 is more than the partition's 3 chunks" in line
    assert not (tmp_path / "run").exists()


@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(any), folds=st.integers(2, 7),
       seed=st.integers(0, 3))
def test_crossfit_folds_are_checked_against_the_pairs_before_the_model(sizes, folds, seed, tmp_path_factory):
    """More folds than the pairs fill (dealt within each source) is one line naming both numbers, before M0 is
    touched; every other number of folds holds out pairs in every fold and reaches M0."""
    from datasets import Dataset

    from trainer_plugin.selective import CrossFitConfig, cross_fitted_difficulty, crossfit_folds

    sources = [f"s{k}" for k, n in enumerate(sizes) for _ in range(n)]
    ids = [f"{i:016x}" for i in range(len(sources))]
    rows = Dataset.from_dict({"row_id": ids, "source": sources, "chosen_logps": [-1.0] * len(ids),
                              "rejected_logps": [-2.0] * len(ids)})
    filled = len(set(crossfit_folds(ids, sources, folds, seed)))
    run = lambda: cross_fitted_difficulty(rows, _Unloadable(), args=ARGS,  # noqa: E731
                                          work_dir=tmp_path_factory.mktemp("cf"),
                                          crossfit=CrossFitConfig(folds=folds, fold_seed=seed))
    if filled < folds:
        with pytest.raises(UserError) as e:
            run()
        assert "\n" not in str(e.value) and f"folds {folds} " in str(e.value) and f" {len(ids)} pairs" in str(e.value)
    else:
        with pytest.raises(_Reached):
            run()


def test_sdpo_crossfit_checks_the_partition_before_the_fold_runs(tiny_model_dir, shared_data, smollm2_tokenizer,
                                                                  tmp_path):
    """The partition of the cross-fitted pairs is tried on their keys first: more chunks than the kept rows is one
    line naming both numbers, and no fold run has started."""
    from partitioner import ScoringConfig, score_preferences
    from tests.test_trainer import MAX_LENGTH, _rows

    scored = score_preferences(_rows(shared_data, smollm2_tokenizer, 4), tmp_path / "scored",
                               ScoringConfig(model=str(tiny_model_dir), max_length=MAX_LENGTH, progress=False))
    line = _refused(["crossfit", str(scored), "-o", str(tmp_path / "p"), "--chunks", "3"])
    assert "4 cross-fitted pairs" in line and "cannot cut 2 rows into 3 chunks" in line, line
    assert not (tmp_path / "p.crossfit").exists() and not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------ an option given twice


def _run_int_options() -> dict[str, int]:
    """RunConfig's nested integer options with a lower bound -> that bound (each takes any value from it up)."""
    import typing

    from partitioner.run import RunConfig

    out = {}
    for f in dataclasses.fields(RunConfig):
        section = f.metadata.get("section")
        for leaf in dataclasses.fields(section) if section else ():
            if typing.get_type_hints(section)[leaf.name] in (int, int | None) and "min" in leaf.metadata:
                out[f"{f.name}.{leaf.name}"] = max(1, leaf.metadata["min"])
    return out


RUN_INTS = _run_int_options()
SPELLINGS = ["flat", "flat-dashed", "dotted", "nested"]


def _spell(option: str, how: str) -> tuple[str, str, str]:
    """(the YAML line, the spelling as an error names it, the flat key or '') of ``option`` spelled ``how``."""
    section, leaf = option.split(".")
    if how == "nested":
        return f"{section}: {{{leaf}: VALUE}}", f"{section}: {{{leaf}}}", ""
    if how == "dotted":
        return f"{option}: VALUE", option, ""
    key = leaf.replace("_", "-") if how == "flat-dashed" else leaf
    return f"{key}: VALUE", key, leaf


@given(entries=st.lists(st.tuples(st.sampled_from(sorted(RUN_INTS)), st.sampled_from(SPELLINGS),
                                  st.integers(0, 50)), min_size=1, max_size=3),
       flag=st.none() | st.tuples(st.sampled_from(sorted(RUN_INTS)), st.booleans(), st.integers(0, 50)))
def test_an_option_given_twice_in_one_yaml_file_is_one_line(entries, flag, tmp_path_factory):
    """Each option once per file, in any spelling (flat, dashed, dotted, nested; a flat name several configs share
    stands for each of them): given twice it is one line naming both spellings (or, for the same key written twice,
    both lines); given once, the config holds the file's value, and a flag for it wins over the file."""
    from partitioner.run import RunConfig
    from sdpo_core.errors import ConfigError

    options = Options(argparse.ArgumentParser())
    options.add_dataclass(RunConfig)
    lines, spelled, expected, keys = [], {}, {}, []
    twice = None  # the first option given twice: (its first spelling, its second)
    for option, how, offset in entries:
        line, spelling, flat = _spell(option, how)
        if flat and flat not in options.flat_owners:
            continue  # no flat spelling for this option
        value = RUN_INTS[option] + offset
        lines.append(line.replace("VALUE", str(value)))
        keys.append(line.split(":")[0])
        for q in options.flat_owners[flat] if flat else [option]:
            if q in spelled and twice is None:
                twice = (spelled[q], spelling)
            spelled.setdefault(q, spelling)
            expected[q] = value
    repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)  # YAML itself would keep the last
    if not lines:
        return
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    argv = []
    if flag is not None:
        option, flat, offset = flag
        leaf = option.split(".")[1]
        name = leaf if flat and leaf in options.flat_owners else option
        argv = [f"--{name}", str(RUN_INTS[option] + offset)]
        for q in options.flat_owners[leaf] if name == leaf else [option]:
            expected[q] = RUN_INTS[option] + offset
    parsed = options.parser.parse_args(options.normalise_argv(argv))
    if repeated or twice:
        with pytest.raises(ConfigError) as e:
            options.values(parsed, str(path))
        message = str(e.value)
        assert "\n" not in message
        if repeated:  # read first, before the keys are taken as options
            assert f"gives {repeated!r} twice (lines" in message, (message, lines)
        else:
            assert f"twice: as {twice[0]!r} and as {twice[1]!r}" in message, (message, lines)
        return
    config = build(RunConfig, options.values(parsed, str(path)))
    for q, value in expected.items():
        section, leaf = q.split(".")
        assert getattr(getattr(config, section), leaf) == value, (q, lines, argv)
