"""The Ray executor's pieces that need no Ray: the install hint without it, and the driver's part assembly."""

from __future__ import annotations

import sys

import datasets
import pytest

from partitioner import ScoringConfig, score_preferences
from partitioner.scoring.ray_executor import INDEX_COLUMN, INSTALL_HINT, PART_COLUMN, RayUnavailableError, PartAssembler
from sdpo_cli.main import main


@pytest.fixture
def no_ray(monkeypatch):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError


def test_api_without_ray_gives_install_hint(no_ray, tmp_path):
    pairs = datasets.Dataset.from_list([{"row_id": "a", "source": "s", "prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(RayUnavailableError, match=r"pip install 'sdpo-curriculum\[ray\]'"):
        score_preferences(pairs, tmp_path / "out", ScoringConfig(model="/nonexistent/model"), executor="ray")
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_cli_without_ray_prints_one_line(no_ray, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    rc = main(["score", str(data), "-o", str(tmp_path / "out"), "--executor", "ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == f"sdpo: error: {INSTALL_HINT}"


def test_unknown_executor_is_refused(tmp_path):
    pairs = datasets.Dataset.from_list([{"row_id": "a", "source": "s", "prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(ValueError, match="executor must be 'local' or 'ray'"):
        score_preferences(pairs, tmp_path / "out", ScoringConfig(), executor="spark")


def test_part_assembler_orders_dedupes_and_waits_for_every_row():
    import pyarrow as pa

    def block(rows):  # rows: (part, index) pairs as actors return them, in any order
        return pa.table({"v": [f"{k}:{i}" for k, i in rows], PART_COLUMN: [k for k, _ in rows],
                         INDEX_COLUMN: [i for _, i in rows]})

    asm = PartAssembler(kept_len=7, todo=[0, 1], rows_per_part=4)  # part 0: rows 0-3, part 1: rows 4-6
    assert list(asm.add(block([(1, 6), (0, 2), (0, 0)]))) == []
    assert list(asm.add(block([(0, 2), (1, 4)]))) == []  # a retried row comes back twice
    done = list(asm.add(block([(0, 3), (0, 1), (1, 5)])))  # completes both parts, out of order
    assert [k for k, _ in done] == [0, 1]
    assert [t.column("v").to_pylist() for _, t in done] == [["0:0", "0:1", "0:2", "0:3"], ["1:4", "1:5", "1:6"]]
    assert done[0][1].column_names == ["v"]  # helper columns dropped
    assert list(asm.add(block([(1, 5)]))) == [] and asm.duplicates == 2 and asm.missing() == {}
    partial = PartAssembler(kept_len=7, todo=[1], rows_per_part=4)
    list(partial.add(block([(1, 4)])))
    assert partial.missing() == {1: 2}  # a part with rows missing is never handed out
