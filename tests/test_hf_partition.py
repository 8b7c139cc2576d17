"""A partition folder is a dataset repository: its card's configs load with ``datasets.load_dataset`` (the chunks as
splits in curriculum order, the rejects as their own config), Parquet shards are a first-class output that
``datasets``, polars, pyarrow, ``sdpo verify`` and ``sdpo train`` read, and the folder is laid out to be uploaded
as it is. Also the two selection recipes: keep the easy share or the hard share of a curriculum."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import real_pairs
from partitioner import PartitionConfig, partition_preferences, partition_stats, read_manifest, verify_partition
from partitioner.io import read_arrow_stream
from partitioner.partition.folder import load_partition
from partitioner.scoring.folder import finish, write_part
from sdpo_cli.main import main as sdpo_main

MAX_LENGTH = 256
FORMATS = ["arrow", "parquet", "both"]


@pytest.fixture(scope="module")
def scored_dir(shared_data, tiny_model_dir, tmp_path_factory):
    """Real pairs (orca + llamafactory) scored by the tiny Llama: a real scored folder with its scoring.json."""
    from partitioner import ScoringConfig, score_preferences

    return score_preferences(real_pairs(shared_data, 8, 8), tmp_path_factory.mktemp("hf") / "scored",
                             ScoringConfig(model=str(tiny_model_dir), max_length=MAX_LENGTH, progress=False))


@pytest.fixture(scope="module")
def parts(scored_dir, tmp_path_factory):
    """One partition per shard format, the same settings; keep_fraction leaves rejects for the rejects config."""
    root = tmp_path_factory.mktemp("parts")
    return {fmt: partition_preferences(scored_dir, root / fmt, PartitionConfig(chunks=3, keep_fraction=0.75,
                                                                               shard_format=fmt), progress=False)
            for fmt in FORMATS}


def _read(path) -> pa.Table:
    return pq.read_table(path) if str(path).endswith(".parquet") else read_arrow_stream(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_dataset_reads_chunks_as_splits_in_order_and_the_rejects_config(parts, fmt, tmp_path):
    from datasets import load_dataset

    part = parts[fmt]
    m = verify_partition(part)
    assert m["rows_rejected"] > 0 and len(m["chunks"]) == 3
    dd = load_dataset(str(part), cache_dir=str(tmp_path / "cache"))
    assert list(dd) == ["chunk_000", "chunk_001", "chunk_002"]  # the curriculum order
    chunks = load_partition(part)
    for split, chunk, entry in zip(dd.values(), chunks, m["chunks"], strict=True):
        assert split["row_id"] == chunk["row_id"] == _read(part / entry["file"]).column("row_id").to_pylist()
        assert split.features == chunk.features  # messages stay messages, token ids stay int lists
        assert split["chosen_logps"] == pytest.approx(chunk["chosen_logps"])
    rejects = load_dataset(str(part), "rejects", cache_dir=str(tmp_path / "cache"))
    assert list(rejects) == ["train"]
    expected = read_arrow_stream(part / "rejects.arrow")
    assert rejects["train"].num_rows == m["rows_rejected"] == expected.num_rows
    assert rejects["train"]["original"] == expected.column("original").to_pylist()
    assert rejects["train"]["reason"] == expected.column("reason").to_pylist()
    assert "beyond_keep_fraction" in rejects["train"]["reason"]


def test_parquet_shards_open_in_polars_and_pyarrow_with_the_arrow_types(parts):
    arrow, parquet = parts["arrow"], parts["parquet"]
    ma, mp = read_manifest(arrow), read_manifest(parquet)
    assert {p.name for p in parquet.glob("chunk-*")} == {f"chunk-{i:03d}.parquet" for i in range(3)}
    assert mp["columns"] == ma["columns"] and mp["rejects_sha256"] == ma["rejects_sha256"]
    for ca, cp in zip(ma["chunks"], mp["chunks"], strict=True):
        assert cp["file"].endswith(".parquet") and "parquet" not in cp and ca["rows"] == cp["rows"]
        a_table = read_arrow_stream(arrow / ca["file"])
        p_table = pq.read_table(parquet / cp["file"])
        assert p_table.num_rows == cp["rows"] and p_table.column("row_id").equals(a_table.column("row_id"))
        assert pl.read_parquet(parquet / cp["file"]).equals(pl.read_ipc_stream(arrow / ca["file"]))
    # 'both' is the Arrow layout plus copies; the card reads the copies
    mb = read_manifest(parts["both"])
    assert [c["sha256"] for c in mb["chunks"]] == [c["sha256"] for c in ma["chunks"]]
    assert [c["parquet"]["sha256"] for c in mb["chunks"]] == [c["sha256"] for c in mp["chunks"]]
    assert "path: chunk-000.parquet" in (parts["both"] / "README.md").read_text()


def test_verify_covers_parquet_shards_and_the_card(parts, tmp_path, capsys):
    part = tmp_path / "p"
    shutil.copytree(parts["parquet"], part)
    assert sdpo_main(["verify", str(part)]) == 0
    assert "dataset card included" in capsys.readouterr().out
    for name, edit in [("README.md", lambda b: b.replace(b"# Stepwise", b"# My stepwise")),
                       ("chunk-001.parquet", lambda b: b[:-200] + bytes(200)),
                       ("rejects.parquet", lambda b: b + b"\0")]:
        saved = (part / name).read_bytes()
        (part / name).write_bytes(edit(saved))
        assert sdpo_main(["verify", str(part)]) == 1
        err = capsys.readouterr().err
        assert name in err and "checksum mismatch" in err and len(err.strip().splitlines()) == 1
        (part / name).write_bytes(saved)
    assert sdpo_main(["verify", str(part)]) == 0


def test_card_holds_statistics_scoring_and_order(parts, scored_dir):
    part = parts["arrow"]
    m = read_manifest(part)
    card = (part / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(card.encode()).hexdigest() == m["card_sha256"]
    scoring = json.loads((scored_dir / "scoring.json").read_text())
    assert f"`{scoring['model']['name_or_path'].rsplit('/', 1)[-1]}` (a local folder)" in card
    assert scoring["model"]["content_hash"] in card
    assert str(scored_dir.parent) not in card and "/tmp" not in card  # no absolute path
    for s in scoring["signals"]:
        assert f"| `{s['name']}` | `{s['column']}` | {s['direction']} |" in card
    assert "- order: `easy_to_hard` by signal `difficulty`" in card and "- keep fraction: `0.75`" in card
    # the per-chunk table is what `sdpo stats` computes, to 3 decimals
    table = [ln for ln in card.splitlines() if ln.startswith("| `chunk_")]
    stats = partition_stats(part)
    assert len(table) == stats.height == 3
    for line, row in zip(table, stats.iter_rows(named=True)):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[2] == str(row["rows"]) and cells[-1] == row["sources"]
        assert float(cells[4]) == pytest.approx(row["difficulty_mean"], abs=5e-4)
        assert f"{row['reward_accuracy']:.3f}" in cells
    assert "| `beyond_keep_fraction` | " + str(m["reject_reasons"]["beyond_keep_fraction"]) + " |" in card
    # no timestamp: a rerun writes the same card
    again = partition_preferences(scored_dir, part.parent / "again", PartitionConfig(chunks=3, keep_fraction=0.75),
                                  progress=False)
    assert (again / "README.md").read_bytes() == (part / "README.md").read_bytes()


def test_folder_is_upload_ready(parts, tmp_path):
    """What `huggingface-cli upload` / `HfApi.upload_folder` would send, checked offline: the card's metadata
    parses as the Hub parses it, its configs name plain files of the folder, no hidden, linked or oddly named
    file, and the uploaded set of files loads from another place (as the Hub's copy would, by name)."""
    from datasets import load_dataset
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    for fmt, part in parts.items():
        files = sorted(p.name for p in part.iterdir())
        for p in part.iterdir():
            assert p.is_file() and not p.is_symlink() and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", p.name), p
        card = DatasetCard.load(part / "README.md")
        configs = MetadataConfigs.from_dataset_card_data(card.data)
        assert list(configs) == ["default", "rejects"] and configs.get_default_config_name() == "default"
        paths = [f["path"] for c in configs.values() for f in c["data_files"]]
        assert all(path in files for path in paths)  # plain names in the folder: no absolute path, no '..'
        splits = [f["split"] for f in configs["default"]["data_files"]]
        assert all(re.fullmatch(r"\w+(\.\w+)*", s) for s in splits)
        suffixes = {path.rsplit(".", 1)[1] for path in paths}
        assert suffixes == {"arrow" if fmt == "arrow" else "parquet"}  # one builder reads every config
        # upload_folder's selection: every file under the folder but its default ignores (.git, the hub's cache)
        listed = sorted(p.relative_to(part).as_posix() for p in part.glob("**/*") if p.is_file())
        sent = list(filter_repo_objects(listed, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
        assert sent == listed == files
        repo = tmp_path / fmt / "user__curriculum"
        repo.mkdir(parents=True)
        for name in sent:
            shutil.copyfile(part / name, repo / name)
        dd = load_dataset(str(repo), cache_dir=str(tmp_path / "cache"))
        assert [len(d) for d in dd.values()] == [c["rows"] for c in read_manifest(part)["chunks"]]
        verify_partition(repo)


def test_training_inputs_read_a_parquet_partition(parts):
    from trainer_plugin.inputs import load_chunks, load_held_out

    arrow, _ = load_chunks(parts["arrow"])
    parquet, manifest = load_chunks(parts["parquet"])
    assert manifest == read_manifest(parts["parquet"])
    for a, p in zip(arrow, parquet, strict=True):
        assert a.features == p.features and a.to_list() == p.to_list()
    held_out = load_held_out(str(parts["parquet"] / "chunk-002.parquet"))
    assert held_out["row_id"] == arrow[2]["row_id"]


@pytest.mark.slow
def test_sdpo_train_reads_a_parquet_partition(parts, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert sdpo_main(["train", str(parts["parquet"]), "--model_name_or_path", str(tiny_model_dir),
                      "--output_dir", str(out), "--ref_mode", "precomputed", "--steps", "1",
                      "--per_device_train_batch_size", "2", "--max_length", str(MAX_LENGTH),
                      "--gradient_checkpointing", "false", "--save_strategy", "no", "--report_to", "none"]) == 0
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert len(steps) == 1 and steps[0]["rows"] == read_manifest(parts["parquet"])["chunks"][0]["rows"]
    verify_partition(parts["parquet"])  # training wrote nothing into the partition


def test_a_readme_not_ours_is_never_overwritten(gap_scored, tmp_path):
    from partitioner.partition.folder import PartitionError

    out = tmp_path / "repo"
    out.mkdir()
    (out / "README.md").write_text("# my dataset\n")
    with pytest.raises(PartitionError, match="not a partition .contains README.md"):
        partition_preferences(gap_scored[0], out, PartitionConfig(chunks=2), progress=False)
    assert (out / "README.md").read_text() == "# my dataset\n"


def test_cli_shard_format_and_keep_from_choices(scored_dir, tmp_path, capsys):
    for flag, value in (("--shard-format", "feather"), ("--keep-from", "middle")):
        assert sdpo_main(["partition", str(scored_dir), "-o", str(tmp_path / "o"), flag, value, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sdpo: error:") and value in err[0]
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert sdpo_main(["partition", str(scored_dir), "-o", str(tmp_path / "o"), "--keep-from", "end"]) == 2
    assert "needs a keep_fraction below 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ selection both ways


@pytest.fixture(scope="module")
def gap_scored(shared_data, tmp_path_factory):
    """Real pairs with an ``implicit_reward`` column (stand-in values, distinct: log-length ratios) declared as the
    scorer declares it (higher_is_easier): the signal both selection recipes read."""
    import math

    ds = real_pairs(shared_data, 20, 20)

    def chars(msgs):
        return sum(len(x["content"]) for x in msgs)

    def gap(r):
        c, j = chars(r["chosen"]), chars(r["rejected"])
        return {"chosen_logps": -c / 4.0, "rejected_logps": -j / 4.0,
                "implicit_reward": math.log(j + 1) - math.log(c + 1)}

    ds = ds.map(gap)
    ds = ds.add_column("difficulty", [-g for g in ds["implicit_reward"]])
    path = tmp_path_factory.mktemp("gap") / "scored"
    write_part(path, 0, ds.data.table)
    settings = {"schema_version": 1, "library_version": "test", "model": {"name_or_path": "stand-in"},
                "dtype": "float32", "tokenizer": {}, "scoring": {},
                "signals": [{"name": "implicit_reward", "column": "implicit_reward", "direction": "higher_is_easier",
                             "formula": "beta*[(logpi-logref)(chosen) - (logpi-logref)(rejected)]"}],
                "difficulty": {"signal": "implicit_reward", "column": "difficulty", "direction": "higher_is_harder"}}
    return finish(path, settings, 1, [], len(ds), len(ds)), ds


def _kept_gaps(part) -> list[float]:
    return [g for c in load_partition(part) for g in c["implicit_reward"]]


def test_keep_easy_recipe_selective_dpo_and_bees(gap_scored, tmp_path):
    """SelectiveDPO / BeeS: easy_to_hard + keep_fraction (keep_from start) keeps the largest gaps, easiest first."""
    scored, ds = gap_scored
    out = tmp_path / "easy"
    assert sdpo_main(["partition", str(scored), "-o", str(out), "--signal", "implicit_reward", "--keep-fraction",
                      "0.25", "--chunks", "2", "--no-progress"]) == 0
    gaps, all_gaps = _kept_gaps(out), sorted(ds["implicit_reward"], reverse=True)
    assert gaps == all_gaps[:10]  # the 10 largest gaps, largest (easiest) first
    m = verify_partition(out)
    assert (m["rows_kept"], m["rows_rejected"]) == (10, 30)
    assert m["ordering"]["keep_from"] == "start" and m["ordering"]["signal"] == "implicit_reward"


def test_keep_hard_recipe_small_implicit_reward_gaps(gap_scored, tmp_path):
    """arXiv 2508.04149: the same order with keep_from end keeps the smallest gaps, still trained easy -> hard."""
    scored, ds = gap_scored
    out = tmp_path / "hard"
    assert sdpo_main(["partition", str(scored), "-o", str(out), "--signal", "implicit_reward", "--keep-fraction",
                      "0.25", "--keep-from", "end", "--chunks", "2", "--no-progress"]) == 0
    gaps, all_gaps = _kept_gaps(out), sorted(ds["implicit_reward"], reverse=True)
    assert gaps == all_gaps[-10:]  # the 10 smallest gaps, in curriculum order (larger gap first)
    m = verify_partition(out)
    assert (m["rows_kept"], m["rows_rejected"], m["ordering"]["keep_from"]) == (10, 30, "end")
    rejects = read_arrow_stream(out / "rejects.arrow")
    assert set(rejects.column("detail").to_pylist()) == {"keep_fraction 0.25: the last 10 of 40 rows of the order "
                                                         "were kept"}
    assert "- keep from: `end`" in (out / "README.md").read_text()
    # the kept rows are exactly the hard_to_easy order's kept rows, reversed: same selection, easy-first training
    hard_first = partition_preferences(scored, tmp_path / "h2e", PartitionConfig(
        order="hard_to_easy", signal="implicit_reward", keep_fraction=0.25, chunks=2), progress=False)
    assert _kept_gaps(hard_first) == gaps[::-1]


def test_no_rejects_no_rejects_config(gap_scored, tmp_path):
    from datasets import load_dataset

    part = partition_preferences(gap_scored[0], tmp_path / "p", PartitionConfig(chunks=2, shard_format="parquet"),
                                 progress=False)
    assert read_manifest(part)["rows_rejected"] == 0
    assert "config_name: rejects" not in (part / "README.md").read_text()
    assert list(load_dataset(str(part), cache_dir=str(tmp_path / "cache"))) == ["chunk_000", "chunk_001"]
