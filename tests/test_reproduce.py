"""The examples: the sDPO replication harness (quick mode, killed and resumed), its metrics against TRL's, the
inspection notebook (executed with nbclient at its CI size) and the plain-TRL callback script."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

ARMS = ["dpo", "sdpo", "sdpo_fixed_ref", "sdpo_random_2", "selective_dpo"]
# The quick test runs the replication's arms and, of the curriculum-DPO methods, SelectiveDPO (added to a copy of the
# config): the one method with harness code of its own (cross-fitting before the partition); grid_2d, ref_refresh
# 'kl' and sft_steps are partition/driver options, tested in tests/test_difficulty_methods.py. It keeps the suite's
# time. TruthfulQA (null in the CPU config) is switched on in the copy, so the harness's TruthfulQA path runs too.
# M0 is the tiny random Llama (real tokenizer) in both the quick test and the notebook: they check the harness's
# bookkeeping (folds, kill and resume, tables, report), which no number of the model changes; SmolLM2 itself is
# trained and scored by the trainer, scoring and TruthfulQA tests.
SUBSET = {"selective_dpo": 3}  # arms trained on a subset of the fold's pairs: how many
EXTRA_ARMS = {"selective_dpo": {"order": "column", "column": "crossfit_dpo_loss", "keep_fraction": 0.5, "chunks": 2,
                                "crossfit": {"folds": 2}, "stepwise": {"ref_refresh": "never"}}}


def quick_config(repo_root, shared_data, model_dir, tmp_path) -> Path:
    """examples/configs/reproduce.yaml with SelectiveDPO added, TruthfulQA on (6 questions in --quick) and M0 the
    model at ``model_dir``."""
    import yaml

    raw = yaml.safe_load((repo_root / "examples" / "configs" / "reproduce.yaml").read_text())
    raw["arms"].update(EXTRA_ARMS)
    raw["truthfulqa"] = str(shared_data / "truthfulqa" / "TruthfulQA.csv")
    raw["model"] = str(model_dir)
    path = tmp_path / "reproduce_quick.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def examples(repo_root, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(repo_root / "examples"))
    return repo_root / "examples"


def script_env(repo_root) -> dict:
    """The example scripts import this checkout's packages (a script's own folder is first on sys.path)."""
    return subprocess_env(TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def _short_pairs(shared_data, tokenizer, n: int, max_length: int):
    from partitioner import TokenizeConfig, load_preferences, tokenize_preferences

    ds = load_preferences({"orca": shared_data / "orca_dpo_pairs/validation.jsonl",
                           "en": shared_data / "llamafactory_demo/dpo_en_demo.json"}, drop_duplicates=True)
    kept, _ = tokenize_preferences(ds, tokenizer, TokenizeConfig(max_length))
    short = [i for i, p in enumerate(kept["prompt_ids"]) if len(p) < max_length // 2]
    return kept.select(short[:n])


def test_row_metrics_are_trls_eval_metrics(examples, tiny_model_dir, shared_data, smollm2_tokenizer, tmp_path):
    """The report's per-row reward accuracy and DPO loss, averaged, equal DPOTrainer.evaluate's (ref = M0)."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from reproduce_report import pair_metrics
    from scorers.models import load_causal_lm
    from trainer_plugin.reference import score_pairs

    pairs = _short_pairs(shared_data, smollm2_tokenizer, 12, 128)
    m0, model = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c0, r0 = score_pairs(m0, pairs, max_length=128)
    c, r = score_pairs(model, pairs, max_length=128)
    tokens = ([len(x) for x in pairs["chosen_ids"]], [len(x) for x in pairs["rejected_ids"]])
    ours = pair_metrics(c, r, c0, r0, *tokens, beta=0.1)
    args = DPOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=len(pairs), max_length=128, beta=0.1,
                     bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, disable_tqdm=True)
    canonical = pairs.select_columns(["prompt", "chosen", "rejected"])
    trl_eval = DPOTrainer(model=model, ref_model=m0, args=args, train_dataset=canonical, eval_dataset=canonical,
                          processing_class=smollm2_tokenizer).evaluate()
    assert 0 < ours["reward_accuracy"].mean() < 1  # a real comparison, not a tie
    assert trl_eval["eval_rewards/accuracies"] == pytest.approx(ours["reward_accuracy"].mean(), abs=1e-6)
    assert trl_eval["eval_loss"] == pytest.approx(ours["dpo_loss"].mean(), abs=2e-3)
    assert ours["margin_per_token"][0] == pytest.approx(c[0] / tokens[0][0] - r[0] / tokens[1][0])
    m0_only = pair_metrics(c0, r0, c0, r0, *tokens, beta=0.1)
    assert m0_only["reward_accuracy"].sum() == 0 and m0_only["dpo_loss"].mean() == pytest.approx(math.log(2))


def test_paired_statistics():
    """Bootstrap interval around a known mean, McNemar's exact p on a known table, Holm's step-down."""
    import numpy as np

    from sdpo_eval.paired_stats import holm, mcnemar, paired_bootstrap

    rng = np.random.default_rng(0)
    d = rng.normal(0.5, 1.0, size=2000)
    b = paired_bootstrap([d], levels=(0.95, 0.999))
    lo, hi = b["intervals"][0.95]
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.1)
    assert b["intervals"][0.999][0] < lo and b["p_value"] == pytest.approx(1e-4)
    two = paired_bootstrap([d[:1000], d[1000:] - 1.0])  # repetitions resampled too: a wider interval
    assert two["mean"] == pytest.approx(d.mean() - 0.5)
    a = np.array([1] * 10 + [0] * 2 + [1] * 50)
    c = np.array([0] * 10 + [1] * 2 + [1] * 50)
    m = mcnemar(a, c)
    assert (m["a_only"], m["b_only"]) == (10, 2) and m["p_value"] == pytest.approx(0.03857, abs=1e-4)
    assert mcnemar(a, a)["p_value"] == 1.0
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_cluster_bootstrap_counts_runs_and_strata():
    """Strata equally weighted; runs that disagree widen the interval beyond the row-only one; a fixed seed gives the
    same interval; the p-value is floored at 1 / resamples."""
    import numpy as np

    from sdpo_eval.paired_stats import cluster_bootstrap

    rng = np.random.default_rng(1)
    big, small = rng.normal(0.0, 0.1, 400), rng.normal(1.0, 0.1, 20)  # equal weights: mean ~0.5, not ~0.05
    r = cluster_bootstrap([[big, small]], levels=(0.95,), resamples=20000)
    assert r["mean"] == pytest.approx((big.mean() + small.mean()) / 2) and r["runs"] == 1 and r["n"] == 420
    assert r["p_value"] == pytest.approx(1 / 20000)
    runs = [[rng.normal(shift, 1.0, 200)] for shift in (-0.3, 0.5, 0.1, 0.9)]  # runs disagree beyond row error
    both = cluster_bootstrap(runs, levels=(0.95,), resamples=20000, seed=3)
    rows_only = cluster_bootstrap(runs, levels=(0.95,), resamples=20000, seed=3, resample_clusters=False)
    width = lambda x: x["intervals"][0.95][1] - x["intervals"][0.95][0]  # noqa: E731
    assert width(both) > 1.5 * width(rows_only) and both["between_run_sd"] == pytest.approx(
        np.std([r[0].mean() for r in runs], ddof=1))
    assert cluster_bootstrap(runs, resamples=20000, seed=3)["intervals"] == both["intervals"]


def test_bad_settings_are_one_line_errors(examples, tmp_path, capsys):
    from reproduce_sdpo import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_length: 256\nbatch: 4\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown option 'batch'" in capsys.readouterr().err
    assert main(["--arms", "dpo,nope", "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown arm(s) nope" in capsys.readouterr().err
    bad.write_text("training: {seed: 3}\narms: {dpo: {order: random, chunks: 1}}\n")
    assert main(["--config", str(bad)]) == 2
    assert "training.seed is set by the harness" in capsys.readouterr().err
    bad.write_text("folds: 1\narms: {dpo: {order: random, chunks: 1}}\n")
    assert main(["--config", str(bad)]) == 2
    assert "folds must be >= 2, got 1" in capsys.readouterr().err
    bad.write_text("folds: 2\nfolds: 3\narms: {dpo: {order: random, chunks: 1}}\n")  # the product's YAML reading
    assert main(["--config", str(bad)]) == 2
    assert "folds" in capsys.readouterr().err
    bad.write_text("repetitions: [zero]\narms: {dpo: {order: random, chunks: 1}}\n")  # each value's type
    assert main(["--config", str(bad)]) == 2
    assert "repetitions: expected an integer" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--report", str(tmp_path / "R.md"), "--rows-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce_sdpo: error:") and len(err.strip().splitlines()) == 1



def test_identity_names_the_data_by_content(examples, repo_root, tmp_path):
    """The same files in another folder (another checkout) give the same identity, so a rerun there resumes and
    its rows join the committed ones; other bytes give another identity; the committed run is the committed
    config's (when ../shared is here: HH is read from it)."""
    import dataclasses
    import shutil

    from reproduce_design import DEFAULT_CONFIG, ReproConfig

    cfg = ReproConfig.from_yaml(DEFAULT_CONFIG)
    bundled = repo_root / "partitioner" / "bundled"
    copies = {}
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("orca_dpo_pairs.jsonl", "llamafactory_dpo_en_demo.json"):
            shutil.copy(bundled / f, folder / f)
        copies[name] = dataclasses.replace(cfg, sources={"orca": str(folder / "orca_dpo_pairs.jsonl"),
                                                         "llamafactory_en": str(folder),
                                                         "hh_harmless": "Anthropic/hh-rlhf"},
                                           sample_per_source={}, train_sources=None, primary_sources=None)
    a, b = copies["a"].identity(), copies["b"].identity()
    assert a == b and a["sources"]["orca"].startswith("sha256:") and a["sources"]["hh_harmless"] == "Anthropic/hh-rlhf"
    with open(tmp_path / "b" / "orca_dpo_pairs.jsonl", "a") as f:
        f.write("\n")
    assert copies["b"].identity()["sources"]["orca"] != a["sources"]["orca"]
    (tmp_path / "b" / "extra.json").write_text("[]")  # a folder source: any file added changes it
    assert copies["b"].identity()["sources"]["llamafactory_en"] != a["sources"]["llamafactory_en"]
    if (repo_root.parent / "shared" / "data").is_dir():
        committed = json.loads((examples / "results" / "run.json").read_text())["config"]["identity"]
        assert committed == json.loads(json.dumps(cfg.identity()))

def _run(cmd, repo_root, timeout=900) -> str:
    proc = subprocess.run(cmd, cwd=repo_root, env=script_env(repo_root), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def _fake_results(out: Path, rep: int, arms: list[str], rows: list[str], identity: dict, shift: float) -> None:
    """A finished results folder of one repetition (what ``run`` leaves), with made-up scores."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"identity": identity, "repetitions": [rep],
                                                 "arms": {a: {"order": "random"} for a in arms}, "analysis": {}}))
    for k in (0, 1):
        held = rows[k::2]
        for i, arm in enumerate(arms):
            r = {"repetition": rep, "fold": k, "arm": arm, "row_id": held, "chosen_logps": [-1.0 - shift - i] * 2,
                 "rejected_logps": [-2.0] * 2, "chunks": [2], "probe_row_id": held[:1], "probe_scores": [],
                 "truthfulqa": [], "command": f"python reproduce_sdpo.py --repetitions {rep}",
                 "machine": {"processor": f"host {rep}"}, "train_seconds": 1.0}
            path = out / "results" / f"rep{rep}" / f"fold{k}" / f"{arm}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(r))


def test_export_adds_repetitions_to_the_committed_rows(examples, tmp_path):
    """A repetition run later (``--repetitions 1``, another day or machine) joins the committed rows of the same
    configuration; rerunning a repetition replaces its own rows only, and the same export gives the same bytes."""
    from types import SimpleNamespace

    from reproduce_rows import export_rows, load_tables

    rows = ["r0", "r1", "r2", "r3"]
    m0 = {"row_id": rows, "source": ["a"] * 4, "chosen_logps": [-1.0] * 4, "rejected_logps": [-2.0] * 4,
          "chosen_tokens": [3] * 4, "rejected_tokens": [3] * 4}
    data = {"m0": m0, "m0_truthfulqa": [], "sample": {"a": rows}, "questions": [], "m0_scoring_seconds": 1.0}
    identity, arms, rows_dir = {"model": "m"}, ["dpo", "sdpo"], tmp_path / "rows"
    for rep in (0, 1):
        _fake_results(tmp_path / f"out{rep}", rep, arms, rows, identity, shift=rep)
        cfg = SimpleNamespace(arms={a: {"order": "random"} for a in arms}, repetitions=[rep])
        export_rows(tmp_path / f"out{rep}", rows_dir, cfg, data, {"processor": f"host {rep}"})
    tables = load_tables(rows_dir)
    assert sorted({(r["repetition"], r["arm"]) for r in tables["arms"]}) == [
        ("0", "dpo"), ("0", "sdpo"), ("1", "dpo"), ("1", "sdpo")] and len(tables["arms"]) == 16
    run = tables["run"]
    assert [(m["repetition"], m["fold"], m["arm"]) for m in run["models"]] == [
        (rep, k, a) for rep in (0, 1) for k in (0, 1) for a in arms]
    assert run["config"]["repetitions"] == [0, 1] and len(run["commands"]) == 2
    assert [m["machine"]["processor"] for m in run["models"]] == ["host 0"] * 4 + ["host 1"] * 4
    before = {p.name: p.read_bytes() for p in rows_dir.iterdir()}
    export_rows(tmp_path / "out1", rows_dir, SimpleNamespace(arms={a: {} for a in arms}, repetitions=[1]), data,
                {"processor": "host 1"})
    assert {p.name: p.read_bytes() for p in rows_dir.glob("*.csv.gz")} == {
        n: b for n, b in before.items() if n.endswith(".csv.gz")}  # rep 1's rows replaced by the same rows
    assert [r["chosen_logps"] for r in load_tables(rows_dir)["arms"] if r["repetition"] == "0"] == [
        repr(-1.0), repr(-1.0), repr(-2.0), repr(-2.0)] * 2  # rep 0's rows kept as committed


@pytest.mark.slow
def test_quick_mode_killed_resumes_and_reports(repo_root, shared_data, tiny_model_dir, tmp_path):
    """--quick (M0 the tiny Llama), cross-fitted: killed inside a stepwise run once its step 1 is complete; the rerun keeps the
    finished results, resumes that run after step 1 and finishes the rest; every sampled pair is held out exactly
    once, never trained on by its own fold's models, and HH (held out only) never trained on; --report fills a
    RESULTS.md from the per-row tables."""
    import gzip

    out = tmp_path / "quick"
    cmd = [sys.executable, str(repo_root / "examples" / "reproduce_sdpo.py"), "--quick", "--output-dir", str(out),
           "--config", str(quick_config(repo_root, shared_data, tiny_model_dir, tmp_path))]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=script_env(repo_root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    in_arm, killed, first = False, False, []
    for line in proc.stdout:
        first.append(line)
        in_arm = in_arm or "fold 0 sdpo: training" in line
        if in_arm and "stepwise step 2/2" in line:  # logged once step 1 of the 2-step arm is complete
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    assert killed, "".join(first)[-3000:]
    run_dir = out / "runs" / "rep0" / "fold0" / "sdpo"
    step1 = (run_dir / "step_1" / "_COMPLETE").stat().st_mtime_ns
    finished = {p: p.read_bytes() for p in (out / "results").glob("rep0/fold0/*.json")}
    assert sorted(p.stem for p in finished) == ["dpo"]

    second = _run(cmd, repo_root)
    assert {p: p.read_bytes() for p in finished} == finished
    assert "fold 0 dpo: training" not in second and "fold 0 sdpo: training" in second
    assert (run_dir / "step_1" / "_COMPLETE").stat().st_mtime_ns == step1  # step 1 kept, not retrained
    resumed = second.split("fold 0 sdpo: training")[1].split("fold 0 sdpo_fixed_ref")[0]
    assert "stepwise step 1/2" not in resumed and "stepwise step 2/2" in resumed

    sample = json.loads((out / "sample.json").read_text())
    sampled = {r for ids in sample.values() for r in ids}
    assert len(sampled) == 24 and {s: len(v) for s, v in sample.items()} == {
        "hh_harmless": 8, "llamafactory_en": 8, "orca": 8}
    from partitioner import load_partition

    held = {}
    for k in (0, 1):
        train = None
        for arm in ARMS:
            r = json.loads((out / "results" / "rep0" / f"fold{k}" / f"{arm}.json").read_text())
            rows = {rid for chunk in load_partition(out / r["partition"]) for rid in chunk["row_id"]}
            if arm in SUBSET:  # SelectiveDPO keeps the easiest share of the same pairs
                assert len(rows) == SUBSET[arm] and rows <= train and r["crossfit_seconds"] > 0
            else:
                assert train is None or rows == train  # every arm trains the same pairs
                train = rows
            assert not rows & set(r["row_id"])  # never a pair of its own fold
            assert not rows & set(sample["hh_harmless"])  # HH is held out only
            held.setdefault(arm, []).extend(r["row_id"])
            assert len(r["probe_scores"]) == len(r["chunks"]) - 1 and len(r["truthfulqa"]) == 3
            assert not list((out / "runs" / "rep0" / f"fold{k}" / arm).glob("step_*/*.safetensors"))
        assert len(train) == 6
    for arm in ARMS:
        assert sorted(held[arm]) == sorted(sampled)  # each pair held out exactly once
    fixed = json.loads((out / "results" / "rep0" / "fold0" / "sdpo_fixed_ref.json").read_text())
    stepwise = json.loads((out / "results" / "rep0" / "fold0" / "sdpo.json").read_text())
    assert fixed["chunks"] == stepwise["chunks"] == [3, 3]
    assert all("M0" in s for s in fixed["reference_source"])
    assert stepwise["reference_source"][1:] == ["scored with M(1)"]

    rows_dir = out / "rows"
    with gzip.open(rows_dir / "arms.csv.gz", "rt") as f:
        assert sum(1 for _ in f) == 1 + 24 * len(ARMS)
    tables = {p.name: p.read_bytes() for p in rows_dir.glob("*.csv.gz")}
    report = tmp_path / "report" / "RESULTS.md"
    report.parent.mkdir()
    template = (repo_root / "examples" / "RESULTS.md").read_text()
    report.write_text(template)
    _run([*cmd, "--report", str(report)], repo_root)
    text = report.read_text()
    assert text.split("<!-- BEGIN")[0] == template.split("<!-- BEGIN")[0]
    assert text.split("<!-- END generated -->")[1] == template.split("<!-- END generated -->")[1]
    assert "| primary | sdpo − sdpo_fixed_ref | held-out DPO loss vs M0 | primary |" in text
    assert "| hh_harmless | sdpo − dpo | own preference accuracy (summed log-probs) | hh_harmless |" in text
    assert "*Stratum hh_harmless*" in text and "2000 resamples, seed 0" in text
    assert (report.parent / "reproduce_differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name: p.read_bytes() for p in rows_dir.glob("*.csv.gz")} == tables  # --report only reads them


@pytest.mark.slow
def test_notebook_executes_at_ci_size(repo_root, tiny_model_dir, tmp_path, monkeypatch):
    """examples/inspect_partition.ipynb runs top to bottom (two arms, quick sizes, M0 the tiny Llama) with nbclient."""
    import nbformat
    from nbclient import NotebookClient

    for key, value in script_env(repo_root).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    monkeypatch.setenv("SDPO_NOTEBOOK_SIZE", "ci")
    monkeypatch.setenv("SDPO_NOTEBOOK_OUT", str(tmp_path / "nb"))
    monkeypatch.setenv("SDPO_NOTEBOOK_MODEL", str(tiny_model_dir))
    nb = nbformat.read(repo_root / "examples" / "inspect_partition.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(repo_root / "examples")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "arms ['dpo', 'sdpo']" in text and "p (Holm)" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # the partition plot and the two results plots
    assert len(list((tmp_path / "nb" / "results").glob("rep0/fold*/*.json"))) == 4


def test_trl_with_callback_script(repo_root, tiny_model_dir, tmp_path):
    """The plain-TRL example: one DPOTrainer, reference refreshed at the end of every chunk but the last."""
    out = _run([sys.executable, str(repo_root / "examples" / "trl_with_callback.py"), "--model", str(tiny_model_dir),
                "--output-dir", str(tmp_path / "cb"), "--pairs-per-source", "8", "--max-length", "128"], repo_root)
    m = re.search(r"chunks of \[([\d, ]+)\] pairs; reference moved to the policy after optimizer steps \[([\d, ]*)\] "
                  r"of (\d+)",
                  out)
    assert m, out[-2000:]
    sizes = [int(x) for x in m.group(1).split(",")]
    ends = [sum(math.ceil(n / 2) for n in sizes[: i + 1]) for i in range(len(sizes))]  # batch 2
    assert len(sizes) == 3 and [int(x) for x in m.group(2).split(",")] == ends[:-1] and int(m.group(3)) == ends[-1]
    assert (tmp_path / "cb" / "model" / "model.safetensors").exists()


def test_reading_cites_only_generated_figures(examples, repo_root):
    """Every figure the reading of examples/RESULTS.md cites is one of its generated section (tables written by
    --report from the committed per-row tables), sign included: the reading can claim only what the numbers say."""
    from reproduce_report import BEGIN, END

    text = (repo_root / "examples" / "RESULTS.md").read_text(encoding="utf-8").replace("−", "-")
    generated = text.split(BEGIN)[1].split(END)[0]
    reading = text.split("\n## Reading\n", 1)[1]
    figures = re.findall(r"(?<![\w.])[-+]?\d+\.\d+", reading)
    assert len(figures) >= 10, "the reading cites its figures"
    missing = [f for f in figures if not re.search(r"(?<![\d.])" + re.escape(f) + r"(?![\d])", generated)]
    assert not missing, f"figures of the reading not in the generated section: {missing}"
