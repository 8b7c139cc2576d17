"""Partitioner on real rows (orca + LLaMA-Factory en, loaded by the real loader).

Where real model scores are not needed, rows get a cheap deterministic stand-in score from their real text
lengths (``chosen_logps = -chars(chosen)/4`` etc.); one slow test uses real scores of the tiny model fixture and
trains one DPO step on a shard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from partitioner import (
    PartitionConfig,
    PartitionError,
    load_partition,
    load_partition_dict,
    partition_preferences,
    read_manifest,
    verify_partition,
)
from partitioner.data.rejects import reject_record, write_rejects
from partitioner.io import read_arrow_stream, write_arrow_stream, write_json, write_marker
from partitioner.scoring.folder import ScoringError, finish, write_part
from sdpo_cli.main import main as sdpo_main


def _chars(messages) -> int:
    return sum(len(m["content"]) for m in messages) if isinstance(messages, list) else len(messages)


@pytest.fixture(scope="module")
def loaded(shared_data):
    from partitioner.data.loading import load_preferences

    return load_preferences([str(shared_data / "orca_dpo_pairs" / "validation.jsonl"),
                             str(shared_data / "llamafactory_demo" / "dpo_en_demo.json")])


@pytest.fixture(scope="module")
def scored(loaded):
    """The real rows with stand-in scores: logps from text lengths; difficulty = -(chosen - rejected)."""

    def add(r):
        c, j = -_chars(r["chosen"]) / 4.0, -_chars(r["rejected"]) / 4.0
        return {"chosen_logps": c, "rejected_logps": j, "ref_margin": c - j, "difficulty": round(j - c)}

    return loaded.map(add)


def _write_scored_dir(ds, path, rejects=(), rows_per_part=128):
    """A scored folder (CONTRACTS.md section 2) holding ``ds``'s rows, written by the scoring job's own writer."""
    table = ds.data.table
    n_parts = 0
    for k, lo in enumerate(range(0, len(ds), rows_per_part)):
        write_part(path, k, table.slice(lo, rows_per_part))
        n_parts += 1
    settings = {"schema_version": 1, "library_version": "test", "model": {"name_or_path": "stand-in"},
                "dtype": "float32", "tokenizer": {}, "scoring": {},
                "signals": [{"name": "ref_margin", "column": "ref_margin", "direction": "higher_is_easier",
                             "formula": "chosen_logps - rejected_logps"}],
                "difficulty": {"signal": "ref_margin", "column": "difficulty", "direction": "higher_is_harder"}}
    return finish(path, settings, n_parts, list(rejects), len(ds) + len(rejects), len(ds))


def _rows(out) -> list[pl.DataFrame]:
    return [pl.read_ipc_stream(out / c["file"]) for c in read_manifest(out)["chunks"]]


def _run(ds, tmp_path, name="out", **kw):
    return partition_preferences(ds, tmp_path / name, PartitionConfig(**kw), progress=False)


# ------------------------------------------------------------------------------------------------ orderings


@pytest.mark.parametrize("order", ["easy_to_hard", "hard_to_easy"])
def test_score_orders_sorted_with_row_id_ties(scored, tmp_path, order):
    out = _run(scored, tmp_path, order=order, chunks=3)
    df = pl.concat(_rows(out))
    assert df.height == len(scored) and df["row_id"].n_unique() == len(scored)
    desc = order == "hard_to_easy"
    expected = df.sort(["difficulty", "row_id"], descending=[desc, False])
    assert df["row_id"].to_list() == expected["row_id"].to_list()
    assert df["difficulty"].n_unique() < df.height  # real ties exist, so the row_id tie-break was exercised
    m = read_manifest(out)
    mins = [c["difficulty"]["min"] for c in m["chunks"]]
    assert mins == sorted(mins, reverse=desc)


def test_signal_from_scoring_json(scored, tmp_path):
    scored_dir = _write_scored_dir(scored, tmp_path / "scored")
    out = partition_preferences(scored_dir, tmp_path / "out", PartitionConfig(signal="ref_margin", chunks=2),
                                progress=False)
    df = pl.concat(_rows(out))
    # ref_margin is higher_is_easier: easy first = largest margin first
    assert df["row_id"].to_list() == df.sort(["ref_margin", "row_id"], descending=[True, False])["row_id"].to_list()
    assert read_manifest(out)["ordering"]["signal"] == "ref_margin"


def test_random_is_seeded_and_independent_of_input_order(scored, tmp_path):
    a = pl.concat(_rows(_run(scored, tmp_path, "a", order="random", seed=7)))["row_id"].to_list()
    b = pl.concat(_rows(_run(scored.shuffle(seed=1), tmp_path, "b", order="random", seed=7)))["row_id"].to_list()
    c = pl.concat(_rows(_run(scored, tmp_path, "c", order="random", seed=8)))["row_id"].to_list()
    assert a == b and a != c and sorted(a) == sorted(c)


def test_by_source_one_chunk_per_source_by_reward_accuracy(scored, tmp_path):
    out = _run(scored, tmp_path, order="by_source")
    chunks = _rows(out)
    acc = (pl.from_arrow(scored.data.table.select(["source", "chosen_logps", "rejected_logps"]))
           .group_by("source").agg(((pl.col("chosen_logps") - pl.col("rejected_logps")) > 0).mean().alias("acc"))
           .sort(["acc", "source"], descending=[True, False]))
    assert [c["source"].unique().to_list() for c in chunks] == [[s] for s in acc["source"]]
    assert acc["acc"][0] > acc["acc"][1]  # the two real sources differ, so the order is meaningful
    m = read_manifest(out)
    assert m["ordering"]["sources"] == acc["source"].to_list()


@pytest.mark.parametrize("ascending", [True, False])
def test_column_order(scored, tmp_path, ascending):
    out = _run(scored, tmp_path, order="column", column="chosen_logps", ascending=ascending, chunks=4)
    df = pl.concat(_rows(out))
    assert df["row_id"].to_list() == df.sort(["chosen_logps", "row_id"], descending=[not ascending, False])["row_id"].to_list()


# ------------------------------------------------------------------------------------------------ chunkings


def test_chunkings(scored, tmp_path):
    n = len(scored)
    sizes = lambda out: [c["rows"] for c in read_manifest(out)["chunks"]]  # noqa: E731
    assert sizes(_run(scored, tmp_path, "eq", chunks=5)) == [len(a) for a in np.array_split(np.arange(n), 5)]
    assert sizes(_run(scored, tmp_path, "fr", fractions=[0.2, 0.3, 0.5])) == [
        round(0.2 * n), round(0.5 * n) - round(0.2 * n), n - round(0.5 * n)]
    # thresholds on the difficulty: every row of chunk i is below the cut, every row of chunk i+1 at/above it
    chunks = _rows(_run(scored, tmp_path, "th", thresholds=[0, 100]))
    assert len(chunks) == 3
    assert chunks[0]["difficulty"].max() < 0 <= chunks[1]["difficulty"].min()
    assert chunks[1]["difficulty"].max() < 100 <= chunks[2]["difficulty"].min()
    # quantiles: cut at the median value, ties kept together
    chunks = _rows(_run(scored, tmp_path, "q", quantiles=[0.5]))
    median = float(np.quantile(scored["difficulty"], 0.5))
    assert chunks[0]["difficulty"].max() < median <= chunks[1]["difficulty"].min()
    # min_chunk_size merges the small first chunk into the next
    small = sizes(_run(scored, tmp_path, "min", fractions=[0.05, 0.45, 0.5], min_chunk_size=50))
    assert small == [round(0.5 * n), n - round(0.5 * n)]


def test_shuffle_within_keeps_chunk_membership(scored, tmp_path):
    plain = _rows(_run(scored, tmp_path, "p", chunks=3))
    shuffled = _rows(_run(scored, tmp_path, "s", chunks=3, shuffle_within=True, seed=3))
    for a, b in zip(plain, shuffled):
        assert sorted(a["row_id"]) == sorted(b["row_id"]) and a["row_id"].to_list() != b["row_id"].to_list()


# ------------------------------------------------------------------------------ shards, manifest, accounting


def test_scored_folder_accounting_and_rejects_carried(scored, tmp_path):
    rejects = [reject_record("validation", 3, "tokenize", "prompt_too_long", "prompt 1100 >= 1024", {"x": 1}),
               reject_record("dpo_en_demo", 9, "load", "identical_pair", "chosen == rejected", {"y": 2})]
    scored_dir = _write_scored_dir(scored, tmp_path / "scored", rejects)
    out = partition_preferences(scored_dir, tmp_path / "out", PartitionConfig(chunks=3), progress=False)
    m = verify_partition(out)
    assert m["rows_kept"] == len(scored) and m["rows_rejected"] == 2 and m["rows_in"] == len(scored) + 2
    assert m["reject_reasons"] == {"identical_pair": 1, "prompt_too_long": 1}
    assert read_arrow_stream(out / "rejects.arrow").equals(read_arrow_stream(scored_dir / "rejects.arrow"))
    assert m["scoring"]["difficulty"]["signal"] == "ref_margin" and "parts" not in m["scoring"]
    assert m["inputs"][0]["kind"] == "scored"
    # the scored folder's rows_in must add up
    meta = json.loads((scored_dir / "scoring.json").read_text())
    meta["rows_in"] += 1
    (scored_dir / "scoring.json").write_text(json.dumps(meta))
    with pytest.raises(ScoringError, match="incomplete"):  # scoring.json no longer matches its _SUCCESS marker
        partition_preferences(scored_dir, tmp_path / "out2", PartitionConfig(), progress=False)
    sha = write_json(scored_dir / "scoring.json", meta)
    write_marker(scored_dir / "_SUCCESS", {"rows_scored": len(scored), "scoring_json_sha256": sha})
    with pytest.raises(PartitionError, match="row accounting"):
        partition_preferences(scored_dir, tmp_path / "out2", PartitionConfig(), progress=False)


def test_deterministic_bytes(scored, tmp_path):
    cfg = dict(order="random", seed=5, fractions=[0.3, 0.7], shuffle_within=True, shard_format="both")
    a, b = _run(scored, tmp_path, "a", **cfg), _run(scored, tmp_path, "b", **cfg)
    ma, mb = read_manifest(a), read_manifest(b)
    for c in ma["chunks"]:
        assert (a / c["file"]).read_bytes() == (b / c["file"]).read_bytes()
        assert (a / c["parquet"]["file"]).read_bytes() == (b / c["parquet"]["file"]).read_bytes()
    for name in ("rejects.arrow", "rejects.parquet", "README.md"):  # the card too: no time, no absolute path
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ma.pop("created_at"), mb.pop("created_at")
    assert ma == mb


def test_verify_catches_corruption(scored, tmp_path):
    out = _run(scored, tmp_path, chunks=3)
    verify_partition(out)
    assert sdpo_main(["verify", str(out)]) == 0
    shard = out / "chunk-001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PartitionError, match="checksum"):
        verify_partition(out)
    assert sdpo_main(["verify", str(out)]) == 1

    out = _run(scored, tmp_path, "missing", chunks=3)
    (out / "chunk-002.arrow").unlink()
    with pytest.raises(PartitionError, match="missing"):
        verify_partition(out)
    with pytest.raises(PartitionError, match="missing"):
        load_partition(out)

    out = _run(scored, tmp_path, "count", chunks=3)
    m = json.loads((out / "manifest.json").read_text())
    m["chunks"][0]["rows"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PartitionError, match="rows"):
        verify_partition(out)
    with pytest.raises(PartitionError, match="rows"):
        load_partition(out)


_CHILD = """
import sys, time
import pyarrow as pa
from partitioner import PartitionConfig, partition_preferences
from partitioner.io import read_arrow_stream
from partitioner.partition import shards
write = shards.ShardWriter.write
def slow_write(self, batch):  # only slows the real writer down so the parent can kill it mid-write
    write(self, batch)
    print("batch", self.path.name, flush=True)
    time.sleep(0.05)
shards.ShardWriter.write = slow_write
partition_preferences(read_arrow_stream(sys.argv[1]), sys.argv[2],
                                PartitionConfig(chunks=3, batch_rows=16), progress=False)
print("done", flush=True)
"""


@pytest.mark.parametrize("kill_after", [3, 20])  # inside chunk 0; after chunk 0 was committed
def test_killed_write_leaves_no_manifest(scored, tmp_path, repo_root, kill_after):
    src = tmp_path / "rows.arrow"
    write_arrow_stream(scored.data.table, src)
    out = _run(scored, tmp_path, "out", order="random", chunks=2)  # a previous, complete partition
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out)], cwd=repo_root,
                            stdout=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("batch")
        if seen >= kill_after:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "manifest.json").exists()
    assert (kill_after < 20) or (out / "chunk-000.arrow").exists()  # a committed shard, but no manifest
    for reader in (read_manifest, verify_partition, load_partition):
        with pytest.raises(PartitionError, match="manifest"):
            reader(out)
    # a rerun clears the debris and completes
    partition_preferences(read_arrow_stream(src), out, PartitionConfig(chunks=3), progress=False)
    verify_partition(out)
    assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_shards_load_in_datasets_polars_pyarrow(scored, tmp_path):
    from datasets import Dataset

    out = _run(scored, tmp_path, chunks=2)
    m = read_manifest(out)
    for c in m["chunks"]:
        path = out / c["file"]
        ds = Dataset.from_file(str(path))
        df = pl.read_ipc_stream(path)
        with pa.OSFile(str(path), "rb") as f:
            table = pa.ipc.open_stream(f).read_all()
        assert len(ds) == df.height == table.num_rows == c["rows"]
        assert ds["row_id"] == df["row_id"].to_list() == table.column("row_id").to_pylist()
        assert ds.features["chosen"] == scored.features["chosen"]  # features survive (messages stay messages)
    dd = load_partition_dict(out)
    assert list(dd) == ["step_0", "step_1"] and sum(len(d) for d in dd.values()) == len(scored)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, data, message", [
    (dict(signal="nope"), "scored", "unknown signal 'nope'"),
    (dict(chunks=5), "three", "more chunks than rows"),
    (dict(fractions=[0.5, 0.6]), "scored", "fractions must sum to 1"),
    (dict(), "empty", "no rows"),
    (dict(order="easy_to_hard"), "unscored", "needs scores"),
    (dict(order="by_source"), "unscored", "by_source' needs scored input"),
])
def test_bad_input_one_line_errors(scored, loaded, tmp_path, kw, data, message):
    data = {"scored": scored, "three": scored.select(range(3)), "empty": scored.select([]), "unscored": loaded}[data]
    with pytest.raises(PartitionError) as e:
        partition_preferences(data, tmp_path / "out", PartitionConfig(**kw), progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--order", "random", "--chunks", "1000"], "more chunks than rows"),
    (["--order", "random", "--fractions", "0.5,0.6"], "fractions must sum to 1"),
    (["--signal", "nope"], "unknown signal"),
    (["--order", "column", "--column", "prompt"], "not numeric"),
])
def test_cli_errors(scored, tmp_path, repo_root, args, message):
    scored_dir = _write_scored_dir(scored, tmp_path / "scored")
    proc = subprocess.run([sys.executable, "-m", "sdpo_cli", "partition", str(scored_dir), "-o",
                           str(tmp_path / "out"), "--no-progress", *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdpo: error:") and message in lines[0], proc.stderr


def test_unscored_files_with_score_order_cli(shared_data, tmp_path, monkeypatch, capsys):
    """Loader inputs + a score order run the scorer first; with a bad model path that is a one-line error."""
    orca = str(shared_data / "orca_dpo_pairs" / "validation.jsonl")
    assert sdpo_main(["partition", orca, "-o", str(tmp_path / "o"), "--model", str(tmp_path / "no-model"),
                      "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sdpo: error:") and "no-model" in err[-1]


# ------------------------------------------------------------------------------------------ stats and CLI


def test_stats_plot_and_cli(scored, tmp_path, capsys):
    from partitioner import partition_stats, plot_partition

    scored_dir = _write_scored_dir(scored, tmp_path / "scored")
    out = tmp_path / "out"
    assert sdpo_main(["partition", str(scored_dir), "-o", str(out), "--chunks", "3", "--no-progress"]) == 0
    df = partition_stats(out)
    assert df["rows"].to_list() == [c["rows"] for c in read_manifest(out)["chunks"]]
    assert abs(df["share"].sum() - 1) < 1e-9
    assert df["difficulty_mean"].to_list() == sorted(df["difficulty_mean"].to_list())
    # reward accuracy per chunk, recomputed from the shards
    for row, chunk in zip(df.iter_rows(named=True), _rows(out)):
        assert row["reward_accuracy"] == pytest.approx(((chunk["chosen_logps"] - chunk["rejected_logps"]) > 0).mean())
    assert df["reward_accuracy"][0] > df["reward_accuracy"][2]  # easy chunks: the model prefers chosen more often
    fig = plot_partition(out, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000 and len(fig.axes) == 2
    capsys.readouterr()
    assert sdpo_main(["stats", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rows"] for r in rows] == df["rows"].to_list()
    assert sdpo_main(["stats", str(out), "--plot", str(tmp_path / "q.png")]) == 0
    assert "difficulty_mean" in capsys.readouterr().out and (tmp_path / "q.png").exists()


# ------------------------------------------------------------------------ real scores -> shards -> DPOTrainer


@pytest.mark.slow
def test_real_scores_partition_feeds_dpo_trainer(loaded, tiny_model_dir, tmp_path):
    from datasets import concatenate_datasets
    from partitioner import ScoringConfig, score_preferences
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer

    sources = loaded.unique("source")
    small = concatenate_datasets([loaded.filter(lambda r, s=s: r["source"] == s).select(range(6)) for s in sources])
    scored_dir = score_preferences(small, tmp_path / "scored",
                                   ScoringConfig(model=str(tiny_model_dir), max_length=256, progress=False))
    out = partition_preferences(scored_dir, tmp_path / "out", PartitionConfig(order="by_source"), progress=False)
    m = verify_partition(out)
    assert len(m["chunks"]) == len(sources) and m["scoring"]["model"]["resolved"] == str(tiny_model_dir)
    step0 = load_partition(out)[0]
    args = DPOConfig(output_dir=str(tmp_path / "train"), max_steps=1, per_device_train_batch_size=2,
                     bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, max_length=256,
                     save_strategy="no", logging_steps=1)
    trainer = DPOTrainer(model=load_causal_lm(str(tiny_model_dir)), args=args, train_dataset=step0,
                         processing_class=load_tokenizer(str(tiny_model_dir)))
    result = trainer.train()
    assert result.global_step == 1 and np.isfinite(result.training_loss)


def test_partition_scores_first_with_every_scoring_option(shared_data, tiny_model_dir, tmp_path):
    """`sdpo partition FILES` with a score order scores through the path `sdpo run` takes, so the scoring options
    (signals, difficulty signal, seed, dtype) reach the scorer as they do in `sdpo score`."""
    orca = str(shared_data / "orca_dpo_pairs" / "validation.jsonl")
    out = tmp_path / "part"
    assert sdpo_main(["partition", orca, "-o", str(out), "--model", str(tiny_model_dir), "--max-length", "256",
                      "--limit-per-source", "12", "--signals", "length_gap,random", "--seed", "4", "--chunks", "2",
                      "--no-progress"]) == 0
    settings = json.loads((tmp_path / "part.scored" / "scoring.json").read_text())
    assert [s["name"] for s in settings["signals"]] == ["length_gap", "random"]
    assert settings["difficulty"]["signal"] == "length_gap" and settings["scoring"]["seed"] == 4
    manifest = read_manifest(out)
    assert manifest["ordering"]["seed"] == 4 and manifest["rows_in"] == 12
