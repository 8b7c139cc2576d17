"""The folders the code writes against CONTRACTS.md: every documented file exists and every JSON file has exactly
the documented keys (optional keys, noted in parentheses after a table, may be absent)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import real_pairs

MAX_LENGTH = 256


def _tables(repo_root: Path) -> dict[str, set[str]]:
    """``{"settings.json": {keys}, ...}`` from the "Keys of `X`:" tables of CONTRACTS.md."""
    text = (repo_root / "CONTRACTS.md").read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r"Keys of (?:a |an )?(.+?):\n\n\| key \| meaning \|\n\|---\|---\|\n((?:\|.*\n)+)", text):
        out[m.group(1)] = set(re.findall(r"^\| `([a-z_0-9]+)` \|", m.group(2), flags=re.M))
    return out


def _files(repo_root: Path, section: str) -> list[str]:
    text = (repo_root / "CONTRACTS.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}")[1].split("\n## ")[0]
    table = body.split("| file | what |")[1].split("\n\n")[0]
    return re.findall(r"^\| `([^`]+)`", table, flags=re.M)


def _check(keys: set[str], obj: dict, optional: set[str] = frozenset()):
    assert set(obj) - optional == keys - optional and keys - optional <= set(obj), \
        f"documented {sorted(keys)}, written {sorted(obj)}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data, tiny_model_dir):
    from trl import DPOConfig

    from partitioner import PartitionConfig, ScoringConfig, partition_preferences, score_preferences
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    root = tmp_path_factory.mktemp("contracts")
    scored = score_preferences(real_pairs(shared_data, 4, 4), root / "scored",
                               ScoringConfig(model=str(tiny_model_dir), max_length=MAX_LENGTH, progress=False))
    part = partition_preferences(scored, root / "part", PartitionConfig(chunks=2), progress=False)
    args = DPOConfig(output_dir=str(root / "run"), per_device_train_batch_size=4, max_length=MAX_LENGTH,
                     bf16=False, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    train_stepwise(part, str(tiny_model_dir), args=args, config=StepwiseConfig(ref_mode="precomputed", steps=1))
    return scored, part, root / "run"


def test_section_tables_parse(repo_root):
    tables = _tables(repo_root)
    assert {"`settings.json`", "`scoring.json`", "`_SUCCESS`", "`manifest.json`", "`run.json`",
            "`steps.json`"} <= set(tables)


def test_scored_folder_matches(folders, repo_root):
    scored = folders[0]
    t = _tables(repo_root)
    for name in _files(repo_root, "2. Scored folder"):
        assert list(scored.glob(name.replace("NNNNN", "*"))), f"{name} missing"
    _check(t["`settings.json`"], json.loads((scored / "settings.json").read_text()))
    _check(t["`scoring.json`"], json.loads((scored / "scoring.json").read_text()))
    _check(t["`_SUCCESS`"], json.loads((scored / "_SUCCESS").read_text()))
    _check(t["part marker `parts/part-NNNNN.done`"], json.loads((scored / "parts" / "part-00000.done").read_text()))


def test_partition_folder_matches(folders, repo_root):
    part = folders[1]
    t = _tables(repo_root)
    for name in _files(repo_root, "3. Partition folder"):
        if "parquet" not in name:
            assert list(part.glob(name.replace("NNN", "*").split(",")[0])), f"{name} missing"
    manifest = json.loads((part / "manifest.json").read_text())
    _check(t["`manifest.json`"], manifest)
    for chunk in manifest["chunks"]:
        _check(t["`chunks` entry"], chunk, optional={"parquet"})


def test_parquet_partition_folder_matches(folders, repo_root, tmp_path):
    """With Parquet shards: the documented files are there (Parquet instead of Arrow chunks), the manifest has the
    documented keys plus the optional rejects_parquet."""
    from partitioner import PartitionConfig, partition_preferences

    part = partition_preferences(folders[0], tmp_path / "part", PartitionConfig(chunks=2, shard_format="parquet"),
                                 progress=False)
    t = _tables(repo_root)
    for name in _files(repo_root, "3. Partition folder"):
        if not name.startswith("chunk-000.arrow"):
            assert list(part.glob(name.replace("NNN", "*").split(",")[0])), f"{name} missing"
    assert not list(part.glob("chunk-*.arrow"))
    manifest = json.loads((part / "manifest.json").read_text())
    _check(t["`manifest.json`"] | {"rejects_parquet"}, manifest, optional={"rejects_parquet"})
    assert set(manifest["rejects_parquet"]) == {"file", "sha256"}
    for chunk in manifest["chunks"]:
        _check(t["`chunks` entry"], chunk, optional={"parquet"})
        assert chunk["file"].endswith(".parquet") and "parquet" not in chunk


def test_training_run_folder_matches(folders, repo_root):
    run = folders[2]
    t = _tables(repo_root)
    for name in _files(repo_root, "4. Training run folder"):
        assert list(run.glob(name.replace("step_t", "step_1"))), f"{name} missing"
    _check(t["`run.json`"], json.loads((run / "run.json").read_text()))
    steps = json.loads((run / "steps.json").read_text())
    _check(t["`steps.json`"], steps)
    marker = json.loads((run / "step_1" / "_COMPLETE").read_text())
    _check(t["step record (`step_t/_COMPLETE`, and each entry of `steps.json`'s `steps`)"], marker,
           optional={"rescored_remaining", "kl_to_reference"})
    assert steps["steps"] == [marker]
