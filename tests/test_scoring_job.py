"""The scoring job: layout and accounting, signals, settings guard, SIGKILL resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest
from conftest import real_pairs, subprocess_env

from partitioner.data.tokenization import TokenizationError
from partitioner.io import read_arrow_stream
from partitioner.scoring.config import ScoringConfig
from partitioner.scoring.folder import ScoringError, read_scored
from partitioner.scoring.job import score_preferences
from scorers.models import ModelLoadError
from scorers.onednn import onednn_linear_available
from scorers.signals import get_signal, random_value
from scorers.transformers_backend import TransformersBackend

MAX_LENGTH = 320


@pytest.fixture(scope="module")
def pairs(shared_data):
    return real_pairs(shared_data, n_orca=8, n_llamafactory=8)


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), max_length=MAX_LENGTH, rows_per_part=4, batch_tokens=2048, progress=False)
    base.update(kw)
    return ScoringConfig(**base)


def test_layout_accounting_and_signals(tiny_model_dir, pairs, tmp_path):
    out = score_preferences(pairs, tmp_path / "scored",
                            _cfg(tiny_model_dir, signals="ref_margin,ref_margin_per_token,length_gap,random"))
    meta = json.loads((out / "scoring.json").read_text())
    assert (out / "_SUCCESS").exists()
    ds, meta2 = read_scored(out)
    assert meta2 == meta
    rejects = read_arrow_stream(out / "rejects.arrow")
    assert meta["rows_in"] == len(pairs) == meta["rows_scored"] + meta["rows_rejected"]
    assert meta["rows_scored"] == len(ds) and meta["rows_rejected"] == rejects.num_rows > 0
    assert meta["reject_reasons"] == {"prompt_too_long": rejects.num_rows}
    assert [p["rows"] for p in meta["parts"]] == [4] * (len(ds) // 4) + ([len(ds) % 4] if len(ds) % 4 else [])
    # input order kept; loaded columns carried
    kept_ids = [r for r in pairs["row_id"] if r in set(ds["row_id"])]
    assert ds["row_id"] == kept_ids
    for col in ("prompt", "chosen", "rejected", "source", "prompt_ids", "chosen_truncated", "chosen_logps",
                "chosen_tokens", "ref_margin", "ref_margin_per_token", "length_gap", "random", "difficulty"):
        assert col in ds.column_names, col
    assert ds.features["chosen_logps"].dtype == "float64" and ds.features["chosen_tokens"].dtype == "int64"
    margin = np.array(ds["chosen_logps"]) - np.array(ds["rejected_logps"])
    np.testing.assert_allclose(ds["ref_margin"], margin)
    np.testing.assert_allclose(ds["difficulty"], -margin)
    per_tok = np.array(ds["chosen_logps"]) / np.array(ds["chosen_tokens"]) - np.array(ds["rejected_logps"]) / np.array(
        ds["rejected_tokens"])
    np.testing.assert_allclose(ds["ref_margin_per_token"], per_tok)
    assert ds["random"] == [random_value(0, r) for r in ds["row_id"]]
    # truncated pairs: only the tokens the collator keeps are summed, and the row is flagged
    flagged = [i for i, t in enumerate(ds["chosen_truncated"]) if t]
    assert flagged
    for i in flagged:
        assert ds[i]["chosen_tokens"] == MAX_LENGTH - len(ds[i]["prompt_ids"])
    # metadata: signals with directions, provenance, per-source stats
    assert [s["name"] for s in meta["signals"]] == ["ref_margin", "ref_margin_per_token", "length_gap", "random"]
    assert meta["signals"][3]["direction"] == "higher_is_harder"
    assert meta["difficulty"] == {"signal": "ref_margin", "column": "difficulty", "direction": "higher_is_harder"}
    assert meta["model"]["content_hash"] and meta["tokenizer"]["max_length"] == MAX_LENGTH
    for source, row in meta["per_source"].items():
        m = margin[np.array(ds["source"]) == source]
        assert row["pairs"] == len(m)
        assert row["reward_accuracy"] == pytest.approx(float((m > 0).mean()))
        assert row["median_margin"] == pytest.approx(float(np.median(m)))
    assert set(meta["per_source"]) == set(ds["source"])


def test_settings_guard_and_overwrite(tiny_model_dir, pairs, tmp_path):
    out = tmp_path / "scored"
    sub = pairs.select(range(6))
    score_preferences(sub, out, _cfg(tiny_model_dir))
    before = (out / "parts" / "part-00000.arrow").read_bytes()
    score_preferences(sub, out, _cfg(tiny_model_dir))  # same settings: a no-op rerun
    assert (out / "parts" / "part-00000.arrow").read_bytes() == before
    with pytest.raises(ScoringError, match="other settings.*max_length|tokenizer"):
        score_preferences(sub, out, _cfg(tiny_model_dir, max_length=200))
    score_preferences(sub, out, _cfg(tiny_model_dir, max_length=200, overwrite=True))
    assert json.loads((out / "scoring.json").read_text())["tokenizer"]["max_length"] == 200


def test_model_signals(tiny_model_dir, pairs, tmp_path):
    """implicit_reward (two models), reward_model (a sequence classifier) and rating_gap (dataset columns)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    policy_dir, rm_dir = tmp_path / "policy", tmp_path / "rm"
    LlamaForCausalLM(cfg).save_pretrained(policy_dir)
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(policy_dir)
    tok.save_pretrained(rm_dir)
    sub = pairs.select(range(4))
    sub = sub.add_column("score_chosen", [5.0, 4.0, 3.5, 2.0]).add_column("score_rejected", [1.0, 4.5, 3.0, 2.0])
    out = score_preferences(sub, tmp_path / "scored", _cfg(
        tiny_model_dir, signals="implicit_reward,reward_model,rating_gap", policy_model=str(policy_dir),
        reward_model=str(rm_dir), beta=0.5))
    ds, meta = read_scored(out)
    assert ds["rating_gap"] == [a - b for a, b in zip(ds["score_chosen"], ds["score_rejected"])]
    assert len(ds) >= 3 and ds["score_chosen"] == [sub[sub["row_id"].index(r)]["score_chosen"] for r in ds["row_id"]]
    pol = TransformersBackend(str(policy_dir), max_length=MAX_LENGTH, batch_tokens=2048,  # the job's lines
                              linear_kernel=json.loads((out / "settings.json").read_text())["linear_kernel_resolved"],
                              progress=False).score(ds.to_list())
    expect = 0.5 * ((np.array(pol["chosen_logps"]) - ds["chosen_logps"]) - (np.array(pol["rejected_logps"]) - ds["rejected_logps"]))
    np.testing.assert_allclose(ds["implicit_reward"], expect, atol=1e-6)
    np.testing.assert_allclose(ds["difficulty"], -expect, atol=1e-6)
    np.testing.assert_allclose(ds["reward_margin"], np.array(ds["reward_chosen"]) - ds["reward_rejected"])
    assert len(set(ds["reward_chosen"])) == len(ds)
    assert [s["column"] for s in meta["signals"]] == ["implicit_reward", "reward_margin", "rating_gap"]


def test_signal_errors():
    with pytest.raises(ValueError, match="unknown signal 'nope'"):
        get_signal("nope")
    with pytest.raises(ValueError, match="unknown signal"):
        ScoringConfig(signals="ref_margin,nope")
    with pytest.raises(ValueError, match="policy_model"):
        ScoringConfig(signals="implicit_reward")


def test_bad_input(tiny_model_dir, pairs, tmp_path, capsys):
    empty = pairs.select([])
    with pytest.raises(ScoringError, match="empty"):
        score_preferences(empty, tmp_path / "a", _cfg(tiny_model_dir))
    with pytest.raises(ModelLoadError, match="does not exist"):
        score_preferences(pairs, tmp_path / "b", _cfg(tmp_path / "no-such-model"))
    no_template = tmp_path / "tok-no-template"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(TokenizationError, match="chat template"):
        score_preferences(pairs, tmp_path / "c", _cfg(tiny_model_dir, tokenizer=str(no_template)))
    from sdpo_cli.main import main

    rc = main(["score", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "d"), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("sdpo: error:") and "\n" not in err and "missing.jsonl" in err
    rc = main(["score", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "e"), "--model", "./nowhere/model"])
    assert rc == 2


def _score_args(data, out, model_dir):
    return ["score", str(data), "-o", str(out), "--model", str(model_dir), "--limit", "96", "--rows-per-part", "6",
            "--max-length", "512", "--batch-tokens", "2048", "--no-progress"]


def _score_cmd(data, out, model_dir):
    return [sys.executable, "-m", "sdpo_cli", *_score_args(data, out, model_dir)]


# What linear_kernel="auto" measures, forced from outside the product: on an AVX2-only host oneDNN's and MKL's fp32
# GEMMs are close, so two processes of one job can measure different winners.
_FORCE_AUTO = """
import os, signal, sys
import scorers.onednn as onednn
onednn.onednn_is_faster = lambda *a, **kw: {faster}
"""
_MAIN = """
from sdpo_cli.main import main
sys.exit(main(sys.argv[1:]))
"""
# The job, killed by SIGKILL right after it has written part 1 and its marker: the fault comes from outside the
# product (a wrapper that patches the part writer), at an event, not after a time.
_KILL_AFTER_PART_1 = """
import partitioner.scoring.job as job
write_part = job.write_part
def write_then_die(out, k, table):
    write_part(out, k, table)
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)
job.write_part = write_then_die
"""


def _score(data, out, model_dir, env, repo_root, *, faster: bool, killed: bool = False):
    code = _FORCE_AUTO.format(faster=faster) + (_KILL_AFTER_PART_1 if killed else "") + _MAIN
    return subprocess.run([sys.executable, "-c", code, *_score_args(data, out, model_dir)], env=env, cwd=repo_root,
                          capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_is_byte_identical(tiny_model_dir, shared_data, tmp_path, repo_root):
    """Killed after part 1 and resumed in a process whose auto kernel measurement picks the other GEMM (oneDNN in
    the first process, MKL in the second, as on a host where the two are close): the folder's resolved kernel is
    recorded when it is made and the resumed parts use it, so the result is byte-identical to an uninterrupted
    run."""
    data = shared_data / "llamafactory_demo" / "dpo_en_demo.json"
    env = subprocess_env(TOKENIZERS_PARALLELISM="false")
    ref = tmp_path / "uninterrupted"
    proc = _score(data, ref, tiny_model_dir, env, repo_root, faster=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = json.loads((ref / "settings.json").read_text())["linear_kernel_resolved"]
    assert resolved == ("onednn" if onednn_linear_available() else "torch")
    out = tmp_path / "killed"
    killed = _score(data, out, tiny_model_dir, env, repo_root, faster=True, killed=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = sorted(p.name for p in (out / "parts").glob("*.done"))
    assert done == ["part-00000.done", "part-00001.done"] and not (out / "_SUCCESS").exists()
    n_parts = len(json.loads((ref / "scoring.json").read_text())["parts"])
    assert len(done) < n_parts
    proc = _score(data, out, tiny_model_dir, env, repo_root, faster=False)  # this process would measure MKL
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in names:
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
    ds, meta = read_scored(out)
    assert meta["rows_scored"] == len(ds) and meta["rows_in"] == meta["rows_scored"] + meta["rows_rejected"]


@pytest.mark.slow
def test_real_smollm2_matches_trl(shared_data, smollm2_tokenizer, tmp_path):
    """The real SmolLM2-135M-Instruct (fp32) on a few orca rows: our job's sums equal TRL's precompute."""
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm

    rows = real_pairs(shared_data, n_orca=3, n_llamafactory=0)
    out = score_preferences(rows, tmp_path / "scored", ScoringConfig(max_length=512, progress=False))
    ds, _ = read_scored(out)
    model = load_causal_lm("bundled")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=512,
                     precompute_ref_log_probs=True, per_device_train_batch_size=3, gradient_checkpointing=False)
    trl_ds = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows.to_list()),
                        processing_class=smollm2_tokenizer).train_dataset
    assert len(trl_ds) == len(ds)
    for side in ("chosen", "rejected"):
        assert np.abs(np.array(ds[f"{side}_logps"]) - np.array(trl_ds[f"ref_{side}_logps"])).max() < 1e-2


def test_saved_dataset_folder_goes_through_the_loader(tiny_model_dir, pairs, tmp_path):
    """A save_to_disk folder is validated and gets content-hash row ids like any other input (one loader path)."""
    from datasets import Dataset

    bad = Dataset.from_list([{**pairs[0], "row_id": "bogus-id", "source": "orca"},
                             {**pairs[1], "chosen": pairs[1]["rejected"], "row_id": "x", "source": "orca"}])
    from datasets import concatenate_datasets

    data = tmp_path / "saved"
    concatenate_datasets([pairs.cast(bad.features), bad]).save_to_disk(str(data))
    out = score_preferences(str(data), tmp_path / "scored", _cfg(tiny_model_dir, progress=False))
    ds, meta = read_scored(out)
    assert meta["rows_in"] == len(pairs) + 2 and meta["reject_reasons"].get("identical_pair") == 1
    assert "bogus-id" not in ds["row_id"] and set(ds["source"]) == set(pairs["source"]) | {"orca"}
    direct, _ = read_scored(score_preferences(pairs, tmp_path / "direct", _cfg(tiny_model_dir, progress=False)))
    extra = set(ds["row_id"]) - set(direct["row_id"])  # the same content hashes either way ...
    assert extra == {f"{direct['row_id'][0]}-1"}  # ... and the re-tagged copy of row 0 is a counted duplicate
