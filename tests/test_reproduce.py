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

ARMS = ["dpo", "sdpo_by_source", "sdpo_easy_to_hard_2", "sdpo_easy_to_hard_3", "sdpo_random_2",
        "sdpo_hard_to_easy_2"]


@pytest.fixture()
def examples(repo_root, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(repo_root / "examples"))
    return repo_root / "examples"


def script_env(repo_root) -> dict:
    """The example scripts import this checkout's packages (a script's own folder is first on sys.path)."""
    return {**os.environ, "PYTHONPATH": str(repo_root), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def _short_pairs(shared_data, tokenizer, n: int, max_length: int):
    from partitioner import TokenizeConfig, load_preferences, tokenize_preferences

    ds = load_preferences({"orca": shared_data / "orca_dpo_pairs/validation.jsonl",
                           "en": shared_data / "llamafactory_demo/dpo_en_demo.json"}, drop_duplicates=True)
    kept, _ = tokenize_preferences(ds, tokenizer, TokenizeConfig(max_length))
    short = [i for i, p in enumerate(kept["prompt_ids"]) if len(p) < max_length // 2]
    return kept.select(short[:n])


def test_held_out_metrics_are_trls_eval_metrics(examples, tiny_model_dir, shared_data, smollm2_tokenizer, tmp_path):
    """rewards/accuracies, rewards/margins and the loss of DPOTrainer.evaluate (ref = M0) equal the harness's."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from reproduce_sdpo import held_out_metrics
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
    ours = held_out_metrics(c, r, c0, r0, [len(x) for x in pairs["chosen_ids"]],
                            [len(x) for x in pairs["rejected_ids"]], beta=0.1)
    args = DPOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=len(pairs), max_length=128, beta=0.1,
                     bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, disable_tqdm=True)
    canonical = pairs.select_columns(["prompt", "chosen", "rejected"])
    trl_eval = DPOTrainer(model=model, ref_model=m0, args=args, train_dataset=canonical, eval_dataset=canonical,
                          processing_class=smollm2_tokenizer).evaluate()
    assert 0 < ours["reward_accuracy"] < 1 and ours["reward_margin"] != 0  # a real comparison, not a tie
    assert trl_eval["eval_rewards/accuracies"] == pytest.approx(ours["reward_accuracy"], abs=1e-6)
    assert trl_eval["eval_rewards/margins"] == pytest.approx(ours["reward_margin"], abs=2e-3)
    assert trl_eval["eval_loss"] == pytest.approx(ours["dpo_loss"], abs=2e-3)
    assert ours["preference_accuracy"] == pytest.approx(sum(a > b for a, b in zip(c, r)) / len(c))
    assert ours["drift_chosen"] == pytest.approx(sum(a - b for a, b in zip(c, c0)) / len(c))
    m0_only = held_out_metrics(c0, r0, c0, r0, [1] * len(c0), [1] * len(c0), beta=0.1)
    assert m0_only["reward_accuracy"] == 0 and m0_only["dpo_loss"] == pytest.approx(math.log(2))


def test_bad_settings_are_one_line_errors(examples, tmp_path, capsys):
    from reproduce_sdpo import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_length: 256\nbatch: 4\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown option(s) batch" in capsys.readouterr().err
    assert main(["--arms", "dpo,nope", "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown arm(s) nope" in capsys.readouterr().err
    bad.write_text("training: {seed: 3}\n")
    assert main(["--config", str(bad)]) == 2
    assert "training.seed is set by the harness" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--report", str(tmp_path / "R.md"), "--output-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce_sdpo: error:") and len(err.strip().splitlines()) == 1


def _run(cmd, repo_root, timeout=600) -> str:
    proc = subprocess.run(cmd, cwd=repo_root, env=script_env(repo_root), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_quick_mode_killed_resumes_and_reports(repo_root, tmp_path):
    """--quick on SmolLM2: killed inside a stepwise run; the rerun keeps the finished (arm, seed) results, resumes
    the stepwise run after its last complete step and finishes the rest; --report fills a RESULTS.md."""
    out = tmp_path / "quick"
    cmd = [sys.executable, str(repo_root / "examples" / "reproduce_sdpo.py"), "--quick", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=repo_root, env=script_env(repo_root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    in_arm, killed, first = False, False, []
    for line in proc.stdout:
        first.append(line)
        in_arm = in_arm or "sdpo_easy_to_hard_3 seed 0: training" in line
        if in_arm and "stepwise step 2/3" in line:  # step 1 of the 3-step arm is complete
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    assert killed, "".join(first)[-3000:]
    run_dir = out / "runs" / "sdpo_easy_to_hard_3" / "seed_0"
    step1 = (run_dir / "step_1" / "_COMPLETE").stat().st_mtime_ns
    assert sorted(p.parent.name for p in (out / "results").glob("*/seed_0.json")) == sorted(ARMS[:3])

    finished = {p: p.read_bytes() for p in (out / "results").glob("*/seed_0.json")}
    second = _run(cmd, repo_root)
    assert {p: p.read_bytes() for p in finished} == finished
    for arm in ARMS[:3]:
        assert f"{arm} seed 0: done before, skipped" in second
    assert "stepwise step 1/3" not in second and "stepwise step 2/3" in second  # resumed after step 1
    assert (run_dir / "step_1" / "_COMPLETE").stat().st_mtime_ns == step1

    split = json.loads((out / "split.json").read_text())
    train = {r for ids in split["train"].values() for r in ids}
    held = {r for ids in split["held_out"].values() for r in ids}
    assert len(train) == 8 and len(held) == 8 and not train & held
    from partitioner import load_partition

    results = {}
    for arm in ARMS:
        r = json.loads((out / "results" / arm / "seed_0.json").read_text())
        results[arm] = r
        rows = {rid for chunk in load_partition(out / r["partition"]) for rid in chunk["row_id"]}
        assert rows == train  # every arm trains the same pairs, never a held-out one
        assert len(r["models"]) == len(r["chunks"]) + 1 and sum(r["chunks"]) == 8
        m0, final = r["models"][0], r["final"]
        assert m0["reward_accuracy"] == 0 and m0["dpo_loss"] == pytest.approx(math.log(2))
        assert abs(final["gamma"] - m0["gamma"]) > 1e-3  # M(T) is not M0
        for key in ("preference_accuracy", "preference_accuracy_per_token", "reward_accuracy"):
            assert 0 <= final[key] <= 1
        # quick mode also has the driver log γ_ref of M(t-1): the harness's own evaluation agrees with it
        for t, logged in enumerate(r["driver_held_out"]):
            assert r["models"][t]["gamma"] == pytest.approx(logged["mean_margin"], abs=1e-3)
        assert not list((out / "runs" / arm / "seed_0").glob("step_*/*.safetensors"))  # weights dropped
    assert [len(results[a]["chunks"]) for a in ARMS] == [1, 2, 2, 3, 2, 2]
    assert results["sdpo_by_source"]["chunks"] == [4, 4]

    summary = (out / "summary.md").read_text()
    assert all(f"| {arm} |" in summary for arm in ARMS) and "M0 (no training)" in summary
    for png in ("gamma_ref.png", "held_out_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = tmp_path / "report" / "RESULTS.md"
    report.parent.mkdir()
    template = (repo_root / "examples" / "RESULTS.md").read_text()
    report.write_text(template)
    _run([*cmd, "--report", str(report)], repo_root)
    text = report.read_text()
    assert text.split("<!-- BEGIN")[0] == template.split("<!-- BEGIN")[0]
    assert text.split("<!-- END generated -->")[1] == template.split("<!-- END generated -->")[1]
    assert "| sdpo_easy_to_hard_3 | 3 (" in text and "reproduce_gamma_ref.png" in text
    assert (report.parent / "reproduce_held_out_accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_notebook_executes_at_ci_size(repo_root, tmp_path, monkeypatch):
    """examples/inspect_partition.ipynb runs top to bottom (two arms, SmolLM2, quick sizes) with nbclient."""
    import nbformat
    from nbclient import NotebookClient

    for key, value in script_env(repo_root).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    monkeypatch.setenv("SDPO_NOTEBOOK_SIZE", "ci")
    monkeypatch.setenv("SDPO_NOTEBOOK_OUT", str(tmp_path / "nb"))
    nb = nbformat.read(repo_root / "examples" / "inspect_partition.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, kernel_name="python3", timeout=600,
                   resources={"metadata": {"path": str(repo_root / "examples")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "arms ['dpo', 'sdpo_easy_to_hard_3']" in text and "final M(T)" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # the partition plot and the two results plots
    assert len(list((tmp_path / "nb" / "results").glob("*/seed_0.json"))) == 2


def test_trl_with_callback_script(repo_root, tiny_model_dir, tmp_path):
    """The plain-TRL example: one DPOTrainer, reference refreshed at the end of every chunk but the last."""
    out = _run([sys.executable, str(repo_root / "examples" / "trl_with_callback.py"), "--model", str(tiny_model_dir),
                "--output-dir", str(tmp_path / "cb"), "--pairs-per-source", "8", "--max-length", "128"], repo_root)
    m = re.search(r"chunks of \[([\d, ]+)\] pairs; reference refreshed after optimizer steps \[([\d, ]*)\] of (\d+)",
                  out)
    assert m, out[-2000:]
    sizes = [int(x) for x in m.group(1).split(",")]
    ends = [sum(math.ceil(n / 2) for n in sizes[: i + 1]) for i in range(len(sizes))]  # batch 2
    assert len(sizes) == 3 and [int(x) for x in m.group(2).split(",")] == ends[:-1] and int(m.group(3)) == ends[-1]
    assert (tmp_path / "cb" / "model" / "model.safetensors").exists()
