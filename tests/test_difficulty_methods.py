"""The curriculum-DPO methods beyond sDPO's order (issue 22): 2D-Curri-DPO's prompt-complexity signal and
KL-adaptive reference refresh, MixDPO's hardest-as-SFT steps, SelectiveDPO's cross-fitted difficulty and keep
fraction. Real TRL training of a tiny Llama with the real SmolLM2 tokenizer on real pairs."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_trainer import MAX_LENGTH, _differs, _load, _partition, _rows, _state, dpo_args, when_training_starts


@pytest.fixture(scope="module")
def partition3(tmp_path_factory, shared_data, smollm2_tokenizer):
    return _partition(_rows(shared_data, smollm2_tokenizer, 10), tmp_path_factory.mktemp("part3"), 3)


def test_mean_token_kl_is_zero_for_the_same_model_and_matches_a_direct_sum(tiny_model_dir, shared_data,
                                                                            smollm2_tokenizer):
    from scorers.divergence import mean_token_kl

    rows = _rows(shared_data, smollm2_tokenizer, 4)
    m0 = _load(tiny_model_dir)
    assert mean_token_kl(m0, m0, rows, max_length=MAX_LENGTH) == pytest.approx(0.0, abs=1e-7)
    m1 = _load(tiny_model_dir)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = mean_token_kl(m1, m0, rows, max_length=MAX_LENGTH, batch_rows=3)
    # Direct: one sequence at a time, KL summed over the vocabulary at every completion-predicting position.
    total, count = 0.0, 0
    for r in rows if torch.no_grad() else ():
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([r["prompt_ids"] + r[side]])[:, :MAX_LENGTH]
            p = torch.log_softmax(m1(input_ids=ids).logits[0].float(), -1)
            q = torch.log_softmax(m0(input_ids=ids).logits[0].float(), -1)
            pos = range(len(r["prompt_ids"]) - 1, ids.shape[1] - 1)
            total += float(sum((p[i].exp() * (p[i] - q[i])).sum() for i in pos))
            count += len(pos)
    assert kl == pytest.approx(total / count, rel=1e-4) and kl > 0


@pytest.mark.parametrize("ref_mode", ["live", "precomputed"])
def test_kl_refresh_keeps_or_moves_the_reference_by_the_threshold(partition3, tiny_model_dir, tmp_path, ref_mode):
    """ref_refresh='kl': threshold 0 refreshes at every boundary (sDPO's references); a threshold above every
    measured KL keeps M0 (the never-refresh control's references). The KL is recorded per step."""
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    seen: dict = {}

    def hook(tag):
        def record(t, trainer):
            if trainer.ref_model is not None:
                seen[tag, t] = _state(trainer.accelerator.unwrap_model(trainer.ref_model))
            else:
                seen[tag, t] = list(trainer.train_dataset["ref_chosen_logps"])
        return record

    runs = {}
    for tag, threshold in (("always", 0.0), ("never", 1e9)):
        out = tmp_path / tag
        runs[tag] = train_stepwise(partition3, str(tiny_model_dir), args=dpo_args(out),
                                   callbacks=[when_training_starts(hook(tag))],
                                   config=StepwiseConfig(ref_mode=ref_mode, ref_refresh="kl", kl_threshold=threshold,
                                                         kl_probe_rows=4))
    assert [r["reference_step"] for r in runs["always"]] == [0, 1, 2]
    assert [r["reference_step"] for r in runs["never"]] == [0, 0, 0]
    assert all(r["kl_to_reference"] > 0 for r in runs["always"][1:])
    assert "kl_to_reference" not in runs["always"][0]
    # The KL of step 2 is measured between M1 and M0 in both runs (same seeds, same M1).
    assert runs["always"][1]["kl_to_reference"] == pytest.approx(runs["never"][1]["kl_to_reference"], rel=1e-5)
    if ref_mode == "live":
        m0 = _state(_load(tiny_model_dir))
        for k, v in m0.items():
            torch.testing.assert_close(seen["never", 3][k], v, rtol=0, atol=0)
        m2 = _state(_load(tmp_path / "always" / "step_2"))
        for k, v in m2.items():
            torch.testing.assert_close(seen["always", 3][k], v, rtol=0, atol=0)
    else:
        from partitioner.partition.folder import load_partition
        from trainer_plugin.reference import score_pairs

        chunk3 = load_partition(partition3)[2]
        c0, _ = score_pairs(_load(tiny_model_dir), chunk3, max_length=MAX_LENGTH)
        c2, _ = score_pairs(_load(tmp_path / "always" / "step_2"), chunk3, max_length=MAX_LENGTH)
        torch.testing.assert_close(torch.tensor(seen["never", 3]), torch.tensor(c0), rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(torch.tensor(seen["always", 3]), torch.tensor(c2), rtol=1e-6, atol=1e-4)
    assert json.loads((tmp_path / "never" / "run.json").read_text())["kl_threshold"] == 1e9


def test_kl_refresh_resumes_with_the_recorded_reference(partition3, tiny_model_dir, tmp_path):
    """A run stopped after step 2 resumes with the reference its records name: equal to an uninterrupted run."""
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    cfg = StepwiseConfig(ref_mode="precomputed", ref_refresh="kl", kl_threshold=1e9, kl_probe_rows=4)
    whole = train_stepwise(partition3, str(tiny_model_dir), args=dpo_args(tmp_path / "whole"), config=cfg)
    part = tmp_path / "part"
    import dataclasses

    train_stepwise(partition3, str(tiny_model_dir), args=dpo_args(part), config=dataclasses.replace(cfg, steps=2))
    resumed = train_stepwise(partition3, str(tiny_model_dir), args=dpo_args(part), config=cfg)
    assert [r["reference_step"] for r in resumed] == [r["reference_step"] for r in whole] == [0, 0, 0]
    a, b = _state(_load(tmp_path / "whole" / "step_3")), _state(_load(part / "step_3"))
    assert not _differs(a, b)


def test_sft_steps_train_the_last_chunks_with_trls_sft_loss(partition3, tiny_model_dir, tmp_path):
    """MixDPO: sft_steps=1 trains step 3 with TRL's loss_type 'sft' (its logged loss is the chosen side's NLL per
    token, not a DPO loss near log 2); steps 1-2 stay DPO."""
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    from transformers import TrainerCallback

    losses = []

    class LossType(TrainerCallback):  # shared by the steps' trainers, which train one after the other
        def on_train_begin(self, args, state, control, **kwargs):
            losses.append(list(args.loss_type))  # the step's own DPOConfig

    records = train_stepwise(partition3, str(tiny_model_dir), args=dpo_args(tmp_path / "run"), callbacks=[LossType()],
                             config=StepwiseConfig(ref_mode="precomputed", sft_steps=1))
    assert [r["loss"] for r in records] == ["dpo", "dpo", "sft"]
    assert losses == [["sigmoid"], ["sigmoid"], ["sft"]]
    # A random tiny model's NLL per token is near log(vocab) ~ 10.8; a DPO loss starts near log 2.
    assert records[2]["train_loss"] > 5 > 1 > records[0]["train_loss"]


def test_prompt_perplexity_signal_is_the_prompts_own_per_token_perplexity(tiny_model_dir, shared_data,
                                                                           smollm2_tokenizer, tmp_path):
    import math

    from partitioner import ScoringConfig, read_scored, score_preferences

    rows = _rows(shared_data, smollm2_tokenizer, 4)
    out = score_preferences(rows, tmp_path / "scored", ScoringConfig(
        model=str(tiny_model_dir), max_length=MAX_LENGTH, signals=["prompt_perplexity", "ref_margin"],
        progress=False))
    scored = read_scored(out)[0]
    model = _load(tiny_model_dir)
    for r in scored.select(range(2)):
        ids = torch.tensor([r["prompt_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        nll = -sum(float(logp[i, ids[0, i + 1]]) for i in range(ids.shape[1] - 1))
        assert r["prompt_tokens"] == ids.shape[1] - 1
        assert r["prompt_perplexity"] == pytest.approx(math.exp(nll / (ids.shape[1] - 1)), rel=1e-4)
        assert r["difficulty"] == r["prompt_perplexity"]  # higher perplexity = harder


def _scored_table(n=24):
    """A scored-looking table: row ids, two signals with their directions (as scoring.json names them)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(0)
    return pa.table({"row_id": [f"{i:016x}" for i in range(n)], "source": ["a"] * n,
                     "difficulty": rng.normal(size=n), "pc": rng.normal(size=n)})


def test_keep_fraction_keeps_the_easiest_and_counts_the_rest_as_rejects(tmp_path):
    import pyarrow as pa

    from partitioner import PartitionConfig, partition_preferences
    from partitioner.io import read_arrow_stream
    from partitioner.partition.folder import load_partition, verify_partition

    table = _scored_table(25)
    out = partition_preferences(table, tmp_path / "p", PartitionConfig(order="easy_to_hard", chunks=2,
                                                                       keep_fraction=0.5), progress=False)
    m = verify_partition(out)
    assert (m["rows_in"], m["rows_kept"], m["rows_rejected"]) == (25, 12, 13)
    assert m["reject_reasons"] == {"beyond_keep_fraction": 13}
    kept = [r for c in load_partition(out) for r in c["row_id"]]
    d = dict(zip(table["row_id"].to_pylist(), table["difficulty"].to_pylist()))
    easiest = sorted(d, key=lambda r: (d[r], r))[:12]
    assert kept == easiest  # easy→hard, the 12 easiest
    rejected = read_arrow_stream(out / "rejects.arrow")
    assert sorted(pa.table(rejected)["original"].to_pylist()) == sorted(f'{{"row_id": "{r}"}}' for r in d if r not in easiest)


def test_grid_2d_visits_cells_by_strategy(tmp_path):
    """grid_2d with 2 levels: sum_pd visits diagonal 0, then 1 (PD level 0 before 1), then 2; pc_first visits
    the four cells PC-major. Chunking 'grid' gives one chunk per visited group."""
    import numpy as np

    from partitioner import PartitionConfig, partition_preferences
    from partitioner.partition.folder import load_partition
    from partitioner.partition.inputs import open_input

    table = _scored_table(40)
    ids = table["row_id"].to_pylist()
    pd, pc = dict(zip(ids, table["difficulty"].to_pylist())), dict(zip(ids, table["pc"].to_pylist()))
    level = lambda v: {r: int(i * 2 // len(ids)) for i, r in enumerate(sorted(ids, key=lambda r: (v[r], r)))}  # noqa: E731
    lpd, lpc = level(pd), level(pc)
    inp_signals = {"signals": [{"name": "pc", "column": "pc", "direction": "higher_is_harder"}]}

    def run(strategy):
        inp = open_input(table)
        inp.scoring = inp_signals
        from partitioner.partition import ordering

        perm, key, info = ordering.compute_order(inp, PartitionConfig(order="grid_2d", complexity_signal="pc",
                                                                      grid_levels=2, grid_strategy=strategy))
        return [ids[i] for i in perm], key, info

    order, diagonal, info = run("sum_pd")
    groups = [(lpc[r] + lpd[r], lpd[r], pd[r]) for r in order]
    assert groups == sorted(groups)
    assert sorted(set(diagonal.tolist())) == [0.0, 1.0, 2.0] and info["grid_strategy"] == "sum_pd"
    order, key, info = run("pc_first")
    cells = [(lpc[r], lpd[r], pd[r]) for r in order]
    assert cells == sorted(cells) and sum(info["cells"].values()) == 40
    from partitioner.partition.chunking import chunk_sizes

    grid = PartitionConfig(order="grid_2d", complexity_signal="pc", grid_levels=2)
    assert len(chunk_sizes(40, grid, key, source_rank=key)) == 4
    assert len(chunk_sizes(40, grid, diagonal, source_rank=diagonal)) == 3
    with pytest.raises(Exception, match="chunking 'grid'"):
        PartitionConfig(order="easy_to_hard", chunking="grid")


def test_cross_fitted_difficulty_is_each_pairs_loss_under_the_model_that_never_saw_it(
        tiny_model_dir, shared_data, smollm2_tokenizer, tmp_path):
    """SelectiveDPO: fold j's model trains on the other fold only; a pair's value is its DPO loss under that model
    against M0 (recomputed here from the saved fold model); a rerun resumes both folds without training."""
    import math

    from trainer_plugin.reference import score_pairs
    from trainer_plugin.selective import CROSSFIT_LOSS, crossfit_folds, cross_fitted_difficulty

    rows = _rows(shared_data, smollm2_tokenizer, 8)
    args = dpo_args(tmp_path / "unused")
    out = cross_fitted_difficulty(rows, str(tiny_model_dir), args=args, work_dir=tmp_path / "cf")
    folds = crossfit_folds(list(rows["row_id"]), list(rows["source"]), 2, 0)
    assert sorted(folds) == [0] * 4 + [1] * 4
    record = json.loads((tmp_path / "cf" / "crossfit.json").read_text())
    assert record["folds"] == 2 and record["train_seconds"] > 0
    for j in (0, 1):
        steps = json.loads((tmp_path / "cf" / f"fold_{j}" / "steps.json").read_text())["steps"]
        assert steps[0]["rows"] == 4  # trained on the other fold only
    held = [i for i, f in enumerate(folds) if f == 0][:2]
    m0 = _load(tiny_model_dir)
    m_fold = _load(tmp_path / "cf" / "fold_0" / "step_1")
    c, r = score_pairs(m_fold, rows.select(held), max_length=MAX_LENGTH)
    c0, r0 = score_pairs(m0, rows.select(held), max_length=MAX_LENGTH)
    for k, i in enumerate(held):
        margin = 0.1 * ((c[k] - c0[k]) - (r[k] - r0[k]))
        assert out[i][CROSSFIT_LOSS] == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-4)
    again = cross_fitted_difficulty(rows, str(tiny_model_dir), args=args, work_dir=tmp_path / "cf")
    assert again[CROSSFIT_LOSS] == out[CROSSFIT_LOSS]


def test_cli_crossfit_partitions_the_easiest_half_by_held_out_loss(tiny_model_dir, shared_data, smollm2_tokenizer,
                                                                   tmp_path, capsys):
    """`sdpo crossfit SCORED -o PART`: cross-fits the scored pairs, keeps the easiest half by the column, in one
    chunk; the dropped half is counted as rejects; the fold runs stay in PART.crossfit (a rerun resumes them:
    test_cross_fitted_difficulty_is_each_pairs_loss_under_the_model_that_never_saw_it)."""
    from partitioner import ScoringConfig, score_preferences
    from partitioner.partition.folder import load_partition, verify_partition
    from sdpo_cli.main import main

    rows = _rows(shared_data, smollm2_tokenizer, 8)
    scored = score_preferences(rows, tmp_path / "scored", ScoringConfig(model=str(tiny_model_dir),
                                                                        max_length=MAX_LENGTH, progress=False))
    part = tmp_path / "part"
    argv = ["crossfit", str(scored), "-o", str(part), "--model", str(tiny_model_dir), "--max-length", str(MAX_LENGTH),
            "--per-device-train-batch-size", "2", "--learning-rate", "0.005", "--save-strategy", "no",
            "--report-to", "none", "--disable-tqdm", "true"]
    assert main(argv) == 0
    m = verify_partition(part)
    assert (m["rows_kept"], m["rows_rejected"], len(m["chunks"])) == (4, 4, 1)
    assert m["ordering"]["column"] == "crossfit_dpo_loss" and m["ordering"]["keep_fraction"] == 0.5
    loss = load_partition(part)[0]["crossfit_dpo_loss"]
    assert loss == sorted(loss)
    assert (tmp_path / "part.crossfit" / "fold_1" / "step_1" / "_COMPLETE").exists()
    assert "kept 4 of 8" in capsys.readouterr().out


def test_callback_kl_refresh_moves_the_live_reference_by_the_threshold(partition3, tiny_model_dir, tmp_path):
    """The drop-in callback with ref_refresh='kl': threshold 0 refreshes at both chunk boundaries (as 'step'),
    a threshold above every KL never does; the KL is measured at each boundary, and equals a direct measurement of
    the policy against M0 at the first one. No reference model: 'kl' is refused (nothing to measure against)."""
    from trl import DPOTrainer
    from transformers import TrainerCallback

    from scorers.divergence import mean_token_kl
    from scorers.models import load_tokenizer
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.reference import frozen_copy

    results = {}
    for tag, threshold in (("always", 0.0), ("never", 1e9)):
        model = _load(tiny_model_dir)
        policy_at = {}

        class Snap(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                policy_at[state.global_step] = _state(model)

        trainer = DPOTrainer(model=model, ref_model=frozen_copy(model), args=dpo_args(tmp_path / tag),
                             train_dataset=concatenate_chunks(partition3),
                             processing_class=load_tokenizer(str(tiny_model_dir)))
        cb = StepwiseReferenceCallback(config=StepwiseConfig(ref_refresh="kl", kl_threshold=threshold,
                                                             kl_probe_rows=4)).install(trainer)
        trainer.add_callback(Snap())
        trainer.train()
        results[tag] = (cb, policy_at, trainer)
    always, never = results["always"][0], results["never"][0]
    assert always.refresh_steps == [2, 4] and never.refresh_steps == []
    assert [s for s, _ in always.kl_measurements] == [2, 4] == [s for s, _ in never.kl_measurements]
    assert all(kl > 0 for _, kl in always.kl_measurements)
    cb, policy_at, trainer = results["never"]
    m1 = _load(tiny_model_dir)
    m1.load_state_dict(policy_at[2])
    direct = mean_token_kl(m1, _load(tiny_model_dir), cb._probe, max_length=MAX_LENGTH)
    assert never.kl_measurements[0][1] == pytest.approx(direct, rel=1e-4)
    with pytest.raises(ValueError, match="needs a live reference"):
        StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="precomputed", ref_refresh="kl"))


def test_cli_crossfit_refuses_another_model_than_the_scored_folders(tiny_model_dir, shared_data, smollm2_tokenizer,
                                                                   tmp_path, capsys):
    """The scored log-probs are the cross-fit's reference: another --model or --max-length than the folder was
    scored with is one error line (exit 2), and a fold too small to train is one line too, never a traceback."""
    from partitioner import ScoringConfig, score_preferences
    from sdpo_cli.main import main

    rows = _rows(shared_data, smollm2_tokenizer, 4)
    scored = score_preferences(rows, tmp_path / "scored", ScoringConfig(model=str(tiny_model_dir),
                                                                        max_length=MAX_LENGTH, progress=False))
    capsys.readouterr()  # the set-up's progress bars
    assert main(["crossfit", str(scored), "-o", str(tmp_path / "p"), "--model", "bundled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdpo: error:") and "scored with" in err[0]
    assert main(["crossfit", str(scored), "-o", str(tmp_path / "p"), "--max-length", str(MAX_LENGTH // 2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"scored with max_length {MAX_LENGTH}, not {MAX_LENGTH // 2}" in err[0]
    code = main(["crossfit", str(scored), "-o", str(tmp_path / "p"), "--folds", "5", "--max-length", str(MAX_LENGTH)])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("sdpo:")]
    assert code == 2 and len(err) == 1 and "fold" in err[0]
