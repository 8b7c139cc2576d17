"""Ray stays optional: without it, ``executor="ray"`` fails at once with the one-line install hint."""

from __future__ import annotations

import sys

import datasets
import pytest

from partitioner.cli import main
from scorers.job import ScoringConfig, score_preferences
from scorers.ray_executor import INSTALL_HINT, RayUnavailableError


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
