"""The drop-in callback with no reference model (``StepwiseConfig(ref_mode="precomputed")``) against the callback
with a live reference copy: a stock DPOTrainer, a tiny Llama with the real SmolLM2 tokenizer, real pairs in 3 chunks
(4, 3, 3 rows; batch 2: 2, 2, 2 optimizer steps, boundaries after steps 2 and 4), fp32 on CPU.

Tolerances: the reference log-probs come from the scorer (prefix-shared, other batches) instead of TRL's padded
forward, so they agree with TRL's to fp32 rounding of sums of hundreds of nats (1e-4 absolute, as in
test_trainer.py); losses within 1e-5; weights after 6 AdamW steps at lr 5e-3 within 2e-4 per element (AdamW's
m / sqrt(v) magnifies rounding where a gradient is near 0, as in test_distributed.py).

Run as a script under ``torchrun`` it is the worker of the 2-process test (``JOB`` file in ``argv[1]``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.test_trainer import _load, _partition, _rows, _state, dpo_args  # noqa: E402

LOSS_TOL, WEIGHT_TOL, LOGP_TOL = 1e-5, 2e-5, 1e-4


@pytest.fixture(scope="module")
def partition3(tmp_path_factory, shared_data, smollm2_tokenizer) -> Path:
    """A real 3-chunk partition of 10 real pairs (sizes 4, 3, 3)."""
    return _partition(_rows(shared_data, smollm2_tokenizer, 10), tmp_path_factory.mktemp("part3"), 3)


def _causal_lms(exclude: set[int] = frozenset()) -> set[int]:
    """Ids of the causal LMs alive now (whole models, not their inner ``*Model`` bodies) not in ``exclude``."""
    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o).__name__.endswith("ForCausalLM")} - exclude


def run(model_dir, partition, output_dir, mode: str, train=None, **args_kw) -> dict:
    """A stock DPOTrainer over the concatenated chunks with the callback in ``mode`` ('live': a frozen copy of the
    model as ``ref_model``; 'precomputed': no reference model). Records each step's loss and the reference
    log-probs TRL's loss was handed, the policy after every step, and the models alive during training."""
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from scorers.models import load_tokenizer
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.reference import frozen_copy

    seen: dict = {"handed": {}, "policy": {}, "models_alive": set()}
    baseline = _causal_lms()

    class Recording(DPOTrainer):  # below the callback's resolution: sees what TRL's loss reads
        def compute_loss(self, model, inputs, *args, **kwargs):
            if "ref_chosen_logps" in inputs:
                handed = torch.stack([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], 1)
                seen["handed"].setdefault(self.state.global_step + 1, []).extend(handed.tolist())
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Snap(TrainerCallback):  # added after the stepwise callback: sees the policy at each boundary
        def on_step_end(self, args, state, control, model=None, **kw):
            seen["policy"][state.global_step] = _state(model)
            seen["models_alive"].add(len(_causal_lms(baseline)))

    model = _load(model_dir)
    live = mode == "live"
    trainer = Recording(model=model, ref_model=frozen_copy(model) if live else None,
                        args=dpo_args(output_dir, precompute_ref_log_probs=not live, **args_kw),
                        train_dataset=concatenate_chunks(partition) if train is None else train,
                        processing_class=load_tokenizer(str(model_dir)))
    cb = StepwiseReferenceCallback(partition, config=StepwiseConfig(ref_mode=mode)).install(trainer)
    order = list(cb.sampler)  # epoch 0's order, as the trainer draws it
    trainer.add_callback(Snap())
    trainer.train()
    seen.update(trainer=trainer, callback=cb, order=order,
                losses=[h["loss"] for h in trainer.state.log_history if "loss" in h], final=_state(model))
    return seen


def _trl_reference(state: dict, model_dir, rows, out) -> torch.Tensor:
    """TRL's own precomputed reference log-probs of ``rows`` with a model holding ``state`` (the anchor)."""
    from trl import DPOTrainer

    from scorers.models import load_tokenizer

    model = _load(model_dir)
    model.load_state_dict(state)
    trl = DPOTrainer(model=model, args=dpo_args(out, precompute_ref_log_probs=True), train_dataset=rows,
                     processing_class=load_tokenizer(str(model_dir)))
    return torch.tensor([trl.train_dataset["ref_chosen_logps"], trl.train_dataset["ref_rejected_logps"]]).T


def test_no_reference_callback_equals_live_reference_callback(partition3, tiny_model_dir, tmp_path):
    live = run(tiny_model_dir, partition3, tmp_path / "live", "live")
    assert live["callback"].refresh_steps == [2, 4] and live["models_alive"] == {2}  # policy + reference copy
    del live["trainer"], live["callback"]
    ours = run(tiny_model_dir, partition3, tmp_path / "ours", "precomputed")
    trainer, cb = ours["trainer"], ours["callback"]

    # No reference model: none in the trainer or the callback, and no second model alive while training.
    assert trainer.ref_model is None and cb.ref_model is None and ours["models_alive"] == {1}
    assert cb.refresh_steps == [2, 4] and trainer.state.global_step == 6

    # The same training: per-step losses and final weights.
    assert len(ours["losses"]) == len(live["losses"]) == 6
    for a, b in zip(ours["losses"], live["losses"], strict=True):
        assert a == pytest.approx(b, abs=LOSS_TOL)
    worst = max((ours["final"][k] - live["final"][k]).abs().max().item() for k in live["final"])
    assert worst <= WEIGHT_TOL, worst
    assert any(not torch.equal(ours["final"][k], ours["policy"][2][k]) for k in ours["final"])

    # What TRL's loss was handed: chunk 1 M0's (TRL's own pass), chunk 2 M1's, chunk 3 M2's, row by row (padding
    # rows repeat their row's values), each against TRL's own precompute with that model.
    rows = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])  # they hold row ids
    m0 = _state(_load(tiny_model_dir))
    for steps, reference in (((1, 2), m0), ((3, 4), ours["policy"][2]), ((5, 6), ours["policy"][4])):
        drawn = [i for s in steps for i in ours["order"][2 * (s - 1): 2 * s]]
        expected = _trl_reference(reference, tiny_model_dir, rows.select(drawn), tmp_path / f"anchor{steps[0]}")
        handed = torch.tensor([v for s in steps for v in ours["handed"][s]])
        torch.testing.assert_close(handed, expected, rtol=1e-6, atol=LOGP_TOL)
    m1 = _trl_reference(ours["policy"][2], tiny_model_dir, rows.select(range(4, 7)), tmp_path / "m1")
    assert (m1 - _trl_reference(m0, tiny_model_dir, rows.select(range(4, 7)), tmp_path / "m0")).abs().max() > 1e-2


def test_ref_refresh_never_keeps_m0_columns(partition3, tiny_model_dir, tmp_path):
    """'never' with no reference model: TRL's own M0 columns for every chunk, nothing scored."""
    from trl import DPOTrainer

    from scorers.models import load_tokenizer
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig

    model = _load(tiny_model_dir)
    trainer = DPOTrainer(model=model, args=dpo_args(tmp_path, precompute_ref_log_probs=True),
                         train_dataset=concatenate_chunks(partition3),
                         processing_class=load_tokenizer(str(tiny_model_dir)))
    m0 = torch.tensor([trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]]).T
    cb = StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="precomputed", ref_refresh="never")).install(trainer)
    trainer.train()
    assert cb.refresh_steps == [] and torch.equal(cb.scores.table, m0)


def test_install_refuses_mismatched_reference_setups(partition3, tiny_model_dir, tmp_path):
    from trl import DPOTrainer

    from scorers.models import load_tokenizer
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.reference import frozen_copy

    with pytest.raises(ValueError, match="ref_mode 'live' and 'precomputed', not 'peft'"):
        StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="peft"))
    model, tok, train = _load(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), concatenate_chunks(partition3)
    with_copy = DPOTrainer(model=model, ref_model=frozen_copy(model), args=dpo_args(tmp_path / "a"),
                           train_dataset=train, processing_class=tok)
    with pytest.raises(ValueError, match="keeps no reference model in memory"):
        StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="precomputed")).install(with_copy)
    no_copy = DPOTrainer(model=_load(tiny_model_dir), args=dpo_args(tmp_path / "b", precompute_ref_log_probs=True,
                                                                   ld_alpha=0.5),
                         train_dataset=train, processing_class=tok)
    with pytest.raises(ValueError, match="ref_mode='precomputed'"):
        StepwiseReferenceCallback().install(no_copy)  # live by default: names the other mode
    with pytest.raises(ValueError, match="ld_alpha"):
        StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="precomputed")).install(no_copy)


def test_two_processes_score_a_share_each_and_hold_the_same_reference(partition3, tiny_model_dir, tmp_path):
    """1 process at batch 2 against 2 gloo processes at batch 1 (the same global batch): each process scores half
    of every chunk, the gathered tables are identical, and the losses equal 1 process's.

    The training dataset is read from disk: TRL's one-time reference pass writes its columns to a cache file
    beside the dataset's files, which for an in-memory dataset is a temporary folder of the main process that the
    other processes do not see (TRL 1.16 then fails in ``DPOTrainer.__init__``)."""
    from trainer_plugin.callback import concatenate_chunks

    concatenate_chunks(partition3).save_to_disk(str(tmp_path / "train"))
    reports = {}
    for processes, per_device in ((1, 2), (2, 1)):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        job = folder / "job.json"
        job.write_text(json.dumps({"model": str(tiny_model_dir), "partition": str(partition3),
                                   "output_dir": str(folder / "out"), "per_device": per_device,
                                   "train": str(tmp_path / "train"),
                                   "results": str(folder)}))
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        done = subprocess.run([sys.executable, *(launcher if processes > 1 else []), __file__, str(job)],
                              env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        reports[processes] = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    one, (r0, r1) = reports[1][0], reports[2]
    assert one["scored"] == [3, 3] and r0["scored"] == [2, 2] and r1["scored"] == [1, 1]  # chunks 2 and 3: 3 rows
    assert r0["table"] == r1["table"] and r0["refresh_steps"] == r1["refresh_steps"] == one["refresh_steps"] == [2, 4]
    torch.testing.assert_close(torch.tensor(r0["table"]), torch.tensor(one["table"]), rtol=1e-6, atol=LOGP_TOL)
    for a, b in zip(r0["losses"], one["losses"], strict=True):
        assert a == pytest.approx(b, abs=LOSS_TOL)


def worker(job: dict) -> None:
    """One process of the 2-process test: the no-reference run, with the rows this process scored per boundary."""
    import trainer_plugin.callback_scores as callback_scores

    scored, score_pairs = [], callback_scores.score_pairs

    def counting(model, rows, **kw):
        scored.append(len(rows))
        return score_pairs(model, rows, **kw)

    callback_scores.score_pairs = counting
    from datasets import load_from_disk

    seen = run(job["model"], job["partition"], job["output_dir"], "precomputed", train=load_from_disk(job["train"]),
               per_device_train_batch_size=job["per_device"])
    report = {"scored": scored, "table": seen["callback"].scores.table.tolist(), "losses": seen["losses"],
              "refresh_steps": seen["callback"].refresh_steps}
    Path(job["results"], f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
