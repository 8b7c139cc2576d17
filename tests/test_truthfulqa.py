"""TruthfulQA MC1/MC2 on the project's scorer: equal to lm-eval-harness itself (run offline as a local task over the
same CSV-derived choices) on the bundled SmolLM2, and the shared-prefix continuation scorer equal to plain forwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdpo_core.errors import UserError
from sdpo_eval.truthfulqa import QA_PREAMBLE, load_truthfulqa, mc_metrics, truthfulqa_context


@pytest.fixture(scope="module")
def truthfulqa_csv(shared_data):
    path = shared_data / "truthfulqa" / "TruthfulQA.csv"
    assert path.exists(), path
    return path


def test_csv_choices_and_metrics(truthfulqa_csv, tmp_path):
    questions = load_truthfulqa(truthfulqa_csv)
    assert len(questions) == 817
    q = questions[0]
    assert q["mc1_targets"]["choices"][0] == "The watermelon seeds pass through your digestive system"
    assert q["mc1_targets"]["labels"] == [1] + [0] * 7 and q["mc2_targets"]["labels"] == [1] * 5 + [0] * 7
    assert truthfulqa_context("Why?").startswith(QA_PREAMBLE) and truthfulqa_context("Why?").endswith("\n\nQ: Why?\nA:")
    assert [x["index"] for x in load_truthfulqa(truthfulqa_csv, indices=[5, 2])] == [5, 2]
    # MC1: the best answer must beat every incorrect one; MC2: normalised mass on the correct answers
    ll = {c: -10.0 for c in q["mc2_targets"]["choices"]}
    ll[q["mc1_targets"]["choices"][0]] = -1.0
    m = mc_metrics(q, ll)
    assert m["mc1"] == 1.0 and 0.5 < m["mc2"] < 1.0
    ll[q["mc1_targets"]["choices"][-1]] = 0.0
    assert mc_metrics(q, ll)["mc1"] == 0.0
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(UserError, match="missing column"):
        load_truthfulqa(bad)
    with pytest.raises(UserError, match="not found"):
        load_truthfulqa(tmp_path / "nope.csv")


@pytest.mark.usefixtures("each_auto_linear_kernel")  # oneDNN and MKL: what auto picks on any host
def test_continuation_scorer_equals_plain_forwards(tiny_model_dir):
    """Shared prefix kept as keys/values + packed answer pairs == one plain forward per (context, continuation)."""
    import torch

    from scorers.choices import ContinuationScorer
    from scorers.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(5, 500, (23,), generator=g).tolist()
    contexts = [shared + torch.randint(5, 500, (n,), generator=g).tolist() for n in (1, 4, 9)]
    continuations = [[torch.randint(5, 500, (n,), generator=g).tolist() for n in lens]
                     for lens in ((3,), (1, 5, 2), (4, 4, 1, 6))]  # odd and even counts, one-token answers
    got = ContinuationScorer(model, batch_tokens=40).score_continuations(contexts, continuations)
    with torch.no_grad():
        for ctx, conts, row in zip(contexts, continuations, got):
            for cont, value in zip(conts, row):
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
                want = sum(float(logp[len(ctx) - 1 + k, tok]) for k, tok in enumerate(cont))
                assert value == pytest.approx(want, abs=2e-4)
    # no shared prefix at all (different first tokens): still exact
    other = ContinuationScorer(model).score_continuations([[7, 8], [9]], [[[10]], [[11, 12]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[9, 11, 12]])).logits[0].double(), -1)
    assert other[1][0] == pytest.approx(float(logp[0, 11] + logp[1, 12]), abs=2e-4)


@pytest.mark.slow
def test_equal_to_lm_eval_harness(repo_root, truthfulqa_csv, tmp_path, monkeypatch):
    """On M0 (the bundled SmolLM2, fp32): every answer's log-likelihood within 1e-3 of lm-eval's, MC1 equal and
    MC2 within 5e-5 (equal to 4 decimals), per question and on average."""
    monkeypatch.syspath_prepend(str(repo_root / "examples"))
    from truthfulqa_lm_eval import lm_eval_truthfulqa

    from sdpo_eval.truthfulqa import score_truthfulqa
    from scorers.models import resolve_model_path

    questions = load_truthfulqa(truthfulqa_csv, indices=[0, 1, 2, 37, 120, 400, 650, 816])
    path = str(resolve_model_path("bundled"))
    ours = score_truthfulqa(path, questions)
    theirs = lm_eval_truthfulqa(path, questions, tmp_path)
    assert [o["index"] for o in ours] == [t["index"] for t in theirs]
    for o, t in zip(ours, theirs):
        assert set(t["loglik"]) == set(o["loglik"])
        for choice, value in t["loglik"].items():
            assert o["loglik"][choice] == pytest.approx(value, abs=1e-3), (o["index"], choice)
        # equal to 4 decimals: within half a unit of the 4th (rounding both could still split 0.16165 / 0.16164)
        assert o["mc2"] == pytest.approx(t["mc2"], abs=5e-5)
        # MC1 is an argmax: equal wherever no two answers are within the log-likelihoods' tolerance of each other
        # (two kernels' rounding could order closer ones either way, on another host)
        lls = sorted(t["loglik"].values())
        assert o["mc1"] == t["mc1"] or min(b - a for a, b in zip(lls, lls[1:])) <= 2e-3, o["index"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(ours, "mc2") == pytest.approx(mean(theirs, "mc2"), abs=5e-5)


@pytest.mark.slow
def test_command(repo_root, truthfulqa_csv, tmp_path):
    out = tmp_path / "tqa.jsonl"
    proc = subprocess.run([sys.executable, "-m", "sdpo_cli.main", "truthfulqa", "--csv", str(truthfulqa_csv),
                           "--limit", "3", "--output", str(out)], cwd=repo_root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TruthfulQA on 3 question(s)" in proc.stdout and "MC1" in proc.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all(0 <= r["mc2"] <= 1 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "sdpo_cli.main", "truthfulqa", "--limit", "0", "--csv", "x"],
                         cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("sdpo: error:") and len(bad.stderr.splitlines()) == 1
