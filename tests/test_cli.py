"""The ``sdpo`` command line: start-up cost of the light commands, one flag style everywhere, typed ``--config``."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from partitioner import PartitionConfig, partition_preferences
from sdpo_cli.main import COMMANDS, main

HEAVY = ("torch", "transformers", "trl", "vllm", "ray")


@pytest.fixture(scope="module")
def small_partition(tmp_path_factory):
    table = pa.table({"row_id": [f"{i:016x}" for i in range(30)], "source": ["a", "b"] * 15,
                      "difficulty": [float(i) for i in range(30)]})
    return partition_preferences(table, tmp_path_factory.mktemp("p") / "part", PartitionConfig(chunks=3),
                                 progress=False)


_PROBE = """
import sys, time
t0 = time.perf_counter()
from sdpo_cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
elapsed = time.perf_counter() - t0
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("PROBE", rc, elapsed, ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["verify", "{part}"], ["stats", "{part}"], ["verify", "--help"]])
def test_light_commands_start_without_torch(args, small_partition, repo_root):
    """``sdpo --help``, ``verify`` and ``stats`` import no torch/transformers/TRL: what makes them start in a fraction
    of a second (asserted as what it stands for, the modules loaded, not as a time that a busy machine can miss)."""
    argv = [a.format(part=small_partition) for a in args]
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv], capture_output=True,
                          text=True, cwd=repo_root, timeout=120)
    probe = [line for line in proc.stderr.splitlines() if line.startswith("PROBE")][-1].split(" ")
    assert probe[1] == "0", proc.stderr
    assert probe[3:] == [""], f"sdpo {' '.join(args)} imported {probe[3]}"


def test_every_subcommand_has_help_and_config(capsys):
    for name in COMMANDS:
        assert main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--config YAML" in out, name


def test_dashes_and_underscores_and_typed_yaml(small_partition, tmp_path, capsys):
    cfg = tmp_path / "stats.yaml"
    cfg.write_text("json: 'yes'\n")
    assert main(["stats", str(small_partition), "--config", str(cfg)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rows"] for r in rows] == [10, 10, 10]
    cfg.write_text("json: 'false'\n")  # a quoted "false" is false, not a non-empty (true) string
    assert main(["stats", str(small_partition), "--config", str(cfg)]) == 0
    assert not capsys.readouterr().out.lstrip().startswith("[")
    assert main(["stats", str(small_partition), "--json", "false"]) == 0
    assert not capsys.readouterr().out.lstrip().startswith("[")
    assert main(["stats", "--json", "true", str(small_partition)]) == 0  # a value, then the positional
    assert capsys.readouterr().out.lstrip().startswith("[")


@pytest.mark.parametrize("yaml_text, words", [
    ("chunks: [1, 2]\n", "chunks: expected an integer"),
    ("output_dir: 7\n", "output_dir: expected text"),
    ("shuffle_within: maybe\n", "shuffle_within: expected true/false"),
    ("shuffle-within: 2\n", "shuffle_within: expected true/false"),
    ("chunk_count: 3\n", "unknown option 'chunk_count'"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("a: [unclosed\n", "not valid YAML"),
    ("a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
     "expands to more than"),
])
def test_bad_config_values_are_one_line_errors(yaml_text, words, small_partition, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    rc = main(["partition", str(small_partition), "-o", str(tmp_path / "o"), "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("sdpo: error:") and words in err[0], err
    assert len(err[0]) <= 320


def test_large_config_and_bad_flag_are_one_line(small_partition, tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("x: " + "a" * (2 << 20) + "\n")
    assert main(["stats", str(small_partition), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "limited to" in err[0]
    assert main(["verify", str(small_partition), "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdpo: error:") and "--no-such-flag" in err[0]


def test_a_bug_is_not_shown_as_the_users_fault(monkeypatch, small_partition):
    """Only errors raised for the user become one line; a KeyError from a bug keeps its traceback."""
    import sdpo_cli.verify as verify

    def broken(values):
        raise KeyError("internal")

    monkeypatch.setattr(verify, "run", broken)
    with pytest.raises(KeyError):
        main(["verify", str(small_partition)])


def _parse(cls, argv: list[str], config: str | None = None):
    """``cls`` built from ``argv`` (and a YAML file) by the same Options/build the command line uses."""
    import argparse

    from sdpo_cli.options import Options, build

    parser = argparse.ArgumentParser()
    options = Options(parser)
    options.add_dataclass(cls)
    return build(cls, options.values(parser.parse_args(options.normalise_argv(argv)), config))


def test_a_composition_takes_flat_dotted_and_nested_options(tmp_path):
    """RunConfig nests the loader's, scorer's and partitioner's configs: a unique name is a flat flag, a shared one
    (seed) sets every config that has it unless the dotted flag names one; the composition's own defaults stay."""
    from partitioner.run import RunConfig

    config = _parse(RunConfig, ["--seed", "3", "--partition.seed", "7", "--model", "m", "--limit-per-source", "5"])
    assert (config.scoring.seed, config.partition.seed, config.scoring.model, config.load.limit_per_source) == (
        3, 7, "m", 5)
    assert config.partition.order == "by_source" and config.partition.chunking == "source"
    assert "length_gap" in config.scoring.signals
    (tmp_path / "c.yaml").write_text("scoring:\n  seed: 2\n  dtype: bfloat16\npartition.chunks: 4\n"
                                     "order: easy_to_hard\n")
    config = _parse(RunConfig, ["--seed", "9"], str(tmp_path / "c.yaml"))
    assert (config.scoring.seed, config.partition.seed, config.scoring.dtype) == (9, 9, "bfloat16")
    assert (config.partition.order, config.partition.chunking, config.partition.chunks) == ("easy_to_hard", "equal", 4)


def test_unknown_nested_option_is_one_line(small_partition, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("scoring:\n  sead: 2\n")
    assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdpo: error:") and "scoring.sead" in err[0]
