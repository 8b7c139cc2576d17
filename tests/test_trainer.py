"""Stepwise DPO on TRL: real DPOTrainer training of a tiny Llama (real SmolLM2 tokenizer) on real partitions.

Each test checks the reference of step 2 against M1 rebuilt independently from what step 1 saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

MAX_LENGTH = 128


def _rows(shared_data, tokenizer, n: int):
    """n short real pairs (orca + LLaMA-Factory en), tokenized as DPOTrainer does, half of each source."""
    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences

    orca = load_preferences([shared_data / "orca_dpo_pairs" / "validation.jsonl"]).select(range(40))
    en = load_preferences([shared_data / "llamafactory_demo" / "dpo_en_demo.json"]).select(range(40))
    out = []
    for ds in (orca, en):
        kept, _ = tokenize_preferences(ds, tokenizer, TokenizeConfig(MAX_LENGTH))
        short = [i for i, p in enumerate(kept["prompt_ids"]) if len(p) < 80]
        out.append(kept.select(short[: n // 2]))
    from datasets import concatenate_datasets

    return concatenate_datasets(out)


def _partition(rows, out: Path, chunks: int) -> Path:
    from partitioner import PartitionConfig, partition_preferences

    return partition_preferences(rows, out, PartitionConfig(order="random", chunks=chunks, seed=1), progress=False)


@pytest.fixture(scope="module")
def partition2(tmp_path_factory, shared_data, smollm2_tokenizer) -> Path:
    """A real 2-chunk partition of 8 real pairs (4 per chunk)."""
    return _partition(_rows(shared_data, smollm2_tokenizer, 8), tmp_path_factory.mktemp("part2"), 2)


@pytest.fixture(scope="module")
def partition3(tmp_path_factory, shared_data, smollm2_tokenizer) -> Path:
    """A real 3-chunk partition of 10 real pairs (sizes 4, 3, 3)."""
    return _partition(_rows(shared_data, smollm2_tokenizer, 10), tmp_path_factory.mktemp("part3"), 3)


def dpo_args(output_dir, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=5e-3, max_length=MAX_LENGTH,
        bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, save_strategy="no",
        logging_steps=1, num_train_epochs=1, disable_tqdm=True, seed=7,
    )
    return DPOConfig(**{**base, **kw})


def when_training_starts(see):
    """A ``train_stepwise(callbacks=[...])`` entry that calls ``see(t, trainer)`` as step t's trainer starts
    training: a function of each step's trainer returning the ``TrainerCallback`` that watches it (the driver's
    public way to give a callback its trainer, as TRL's ``LogCompletionsCallback(trainer)`` needs)."""
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            see(self.trainer.stepwise_step, self.trainer)

    return lambda trainer: Watch(trainer)  # a class would be built by the trainer, without arguments


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(path):
    from scorers.models import load_causal_lm

    return load_causal_lm(str(path))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_live_reference_of_step2_is_m1(partition2, partition3, tiny_model_dir, tmp_path):
    from partitioner.partition.folder import load_partition
    from trainer_plugin.driver import train_stepwise
    from sdpo_core.stats import margin_stats
    from trainer_plugin.reference import score_pairs

    seen = {}

    def hook(t, trainer):
        seen[t] = _state(trainer.accelerator.unwrap_model(trainer.ref_model))

    out = tmp_path / "run"
    held_out = load_partition(partition3)[2]
    steps = train_stepwise(partition2, str(tiny_model_dir), args=dpo_args(out), ref_mode="live",
                           callbacks=[when_training_starts(hook)], eval_dataset=held_out)
    m0 = _state(_load(tiny_model_dir))
    m1 = _state(_load(out / "step_1"))
    _assert_same(seen[1], m0)
    _assert_same(seen[2], m1)  # the reference of step 2 is M1, not TRL's reload of M0
    assert _differs(m1, m0)
    assert [s["step"] for s in steps] == [1, 2] and all((out / f"step_{t}" / "_COMPLETE").exists() for t in (1, 2))
    summary = json.loads((out / "steps.json").read_text())
    assert summary["steps"][1]["reference"]["chunk"]["pairs"] == 4
    assert "rewards/margins" in summary["steps"][0]["trl"]
    # γ_ref on the held-out set: step 2's is M1's, the final one M2's.
    for where, path in ((summary["steps"][1]["reference"]["held_out"], out / "step_1"),
                        (summary["final"]["held_out"], out / "step_2")):
        expected = margin_stats(*score_pairs(_load(path), held_out, max_length=MAX_LENGTH))
        assert where["pairs"] == len(held_out) == 3
        assert where["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-5)
        assert where["reward_accuracy"] == expected["reward_accuracy"]
    # `sdpo stats RUN` shows the same per-step quantities.
    from trainer_plugin.training_record import steps_frame

    frame = steps_frame(json.loads((out / "steps.json").read_text()))
    assert frame["gamma_ref_held_out"].to_list() == [
        summary["steps"][0]["reference"]["held_out"]["mean_margin"],
        summary["steps"][1]["reference"]["held_out"]["mean_margin"],
        summary["final"]["held_out"]["mean_margin"],
    ]
    assert frame["rewards/margins"][0] == summary["steps"][0]["trl"]["rewards/margins"]


def test_precomputed_reference_equals_m1_scores(partition2, tiny_model_dir, smollm2_tokenizer, tmp_path):
    from partitioner.io import read_arrow_stream
    from partitioner.partition.folder import load_partition
    from trl import DPOTrainer

    from trainer_plugin.driver import train_stepwise

    seen = {}

    def hook(t, trainer):
        seen[t] = (trainer.ref_model, trainer.precompute_ref_logps)

    out = tmp_path / "run"
    train_stepwise(partition2, str(tiny_model_dir), args=dpo_args(out), ref_mode="precomputed",
                   callbacks=[when_training_starts(hook)])
    assert seen[2] == (None, True)  # no reference model in memory during training
    ours = read_arrow_stream(out / "step_2" / "reference_logps.arrow").to_pydict()

    # Anchor: TRL's own precompute with M1 (loaded from step_1) as the model, on chunk 2.
    chunk2 = load_partition(partition2)[1]
    m1 = _load(out / "step_1")
    trl = DPOTrainer(model=m1, args=dpo_args(tmp_path / "anchor", precompute_ref_log_probs=True),
                     train_dataset=chunk2, processing_class=smollm2_tokenizer)
    assert trl.train_dataset["row_id"] == ours["row_id"]
    # Summed log-probs of hundreds of nats: fp32 spacing there is 6e-5, so 1e-4 absolute or 1e-6 relative.
    torch.testing.assert_close(torch.tensor(ours["ref_chosen_logps"]), torch.tensor(trl.train_dataset["ref_chosen_logps"]),
                               rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(torch.tensor(ours["ref_rejected_logps"]),
                               torch.tensor(trl.train_dataset["ref_rejected_logps"]), rtol=1e-6, atol=1e-4)
    m0_scores = read_arrow_stream(out / "step_1" / "reference_logps.arrow").to_pydict()
    assert m0_scores["row_id"] != ours["row_id"]  # step 1 scored chunk 1


def test_ref_refresh_never_keeps_m0_as_every_steps_reference(partition2, tiny_model_dir, tmp_path):
    """ref_refresh='never' (the chunked-DPO control): live mode hands TRL M0 at step 2, precomputed mode gives it
    M0's log-probs of chunk 2, equal to TRL's own precompute with M0; the policy still moves on (M2 != M1)."""
    from partitioner.io import read_arrow_stream
    from partitioner.partition.folder import load_partition
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise
    from trainer_plugin.reference import score_pairs

    seen = {}

    def hook(t, trainer):
        seen[t] = _state(trainer.accelerator.unwrap_model(trainer.ref_model))

    live = tmp_path / "live"
    records = train_stepwise(partition2, str(tiny_model_dir), args=dpo_args(live),
                             callbacks=[when_training_starts(hook)],
                             config=StepwiseConfig(ref_mode="live", ref_refresh="never"))
    m0 = _state(_load(tiny_model_dir))
    _assert_same(seen[1], m0)
    _assert_same(seen[2], m0)  # not M1
    assert _differs(_state(_load(live / "step_2")), _state(_load(live / "step_1")))
    assert records[1]["reference_source"] == "frozen copy of M0 (never refreshed)"
    assert json.loads((live / "run.json").read_text())["ref_refresh"] == "never"

    pre = tmp_path / "pre"
    records = train_stepwise(partition2, str(tiny_model_dir), args=dpo_args(pre),
                             config=StepwiseConfig(ref_mode="precomputed", ref_refresh="never"))
    ours = read_arrow_stream(pre / "step_2" / "reference_logps.arrow").to_pydict()
    c0, r0 = score_pairs(_load(tiny_model_dir), load_partition(partition2)[1], max_length=MAX_LENGTH)
    torch.testing.assert_close(torch.tensor(ours["ref_chosen_logps"]), torch.tensor(c0), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(torch.tensor(ours["ref_rejected_logps"]), torch.tensor(r0), rtol=1e-6, atol=1e-4)
    assert records[1]["reference_source"] == "scored with M0 (never refreshed)"
    from sdpo_core.errors import ConfigError

    with pytest.raises(ConfigError, match="ref_refresh 'never' needs"):
        StepwiseConfig(ref_mode="peft", ref_refresh="never")


def test_peft_reference_of_step2_is_merged_m1(partition2, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise
    from trainer_plugin.run_folder import load_step_model

    from transformers import TrainerCallback

    seen = {}

    class AdapterDisabled(TrainerCallback):  # shared by the steps' trainers, which train one after the other
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            with model.disable_adapter():  # what TRL uses as the reference
                base = model.get_base_model()
                seen[len(seen) + 1] = {k: v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}

    out = tmp_path / "run"
    config = StepwiseConfig(ref_mode="peft", lora_r=4, lora_alpha=8)
    train_stepwise(partition2, str(tiny_model_dir), args=dpo_args(out, learning_rate=2e-2), config=config,
                   callbacks=[AdapterDisabled()])
    m0 = _state(_load(tiny_model_dir))
    m1 = _state(PeftModel.from_pretrained(_load(tiny_model_dir), str(out / "step_1")).merge_and_unload())

    def strip(d):  # PEFT names the adapted layers' weights base_layer.weight
        return {k.replace(".base_layer", ""): v for k, v in d.items()}

    _assert_same(strip(seen[1]), m0)
    ref2 = strip(seen[2])
    assert ref2.keys() == m1.keys()
    for k in m1:
        torch.testing.assert_close(ref2[k], m1[k], rtol=0, atol=1e-6, msg=k)
    assert _differs(m1, m0)  # not the bare base
    m2 = _state(load_step_model(out, 2, str(tiny_model_dir)))
    assert _differs(m2, m1)


def test_callback_refreshes_exactly_at_chunk_boundaries(partition3, tiny_model_dir, smollm2_tokenizer, tmp_path):
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from trainer_plugin.callback import CHUNK_COLUMN, StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.reference import frozen_copy

    train = concatenate_chunks(partition3)
    sizes = [json.loads((partition3 / "manifest.json").read_text())["chunks"][i]["rows"] for i in range(3)]
    assert sizes == [4, 3, 3]
    model = _load(tiny_model_dir)
    m0 = _state(model)
    trainer = DPOTrainer(model=model, ref_model=frozen_copy(model), args=dpo_args(tmp_path / "cb"),
                         train_dataset=train, processing_class=smollm2_tokenizer)
    cb = StepwiseReferenceCallback(partition3).install(trainer)

    # The sampler keeps the chunk order and never mixes chunks inside an optimizer step (2 rows).
    order = list(cb.sampler)
    chunk_of = train[CHUNK_COLUMN]
    seq = [chunk_of[i] for i in order]
    assert seq == sorted(seq)
    assert all(len({seq[i], seq[i + 1]}) == 1 for i in range(0, len(seq), 2))
    assert [sorted(set(i for i in order if chunk_of[i] == c)) for c in range(3)] == [
        [i for i in range(10) if chunk_of[i] == c] for c in range(3)]

    snaps = {}

    class Snap(TrainerCallback):  # runs after the refresh callback (added later)
        def on_step_end(self, args, state, control, model=None, **kw):
            snaps[state.global_step] = (_state(model), _state(trainer.ref_model))

    trainer.add_callback(Snap())
    trainer.train()
    assert cb.sampler.steps_per_chunk() == [2, 2, 2]
    assert cb.refresh_steps == [2, 4] and trainer.state.global_step == 6
    _assert_same(snaps[1][1], m0)  # chunk 1: reference M0
    _assert_same(snaps[2][1], snaps[2][0])  # refreshed to the policy after chunk 1's last step
    _assert_same(snaps[3][1], snaps[2][0])
    assert _differs(snaps[3][0], snaps[2][0])  # the policy moves on, the reference stays M1
    _assert_same(snaps[5][1], snaps[4][0])
    _assert_same(_state(trainer.ref_model), snaps[4][0])


@pytest.fixture(scope="module")
def scored_partition(tmp_path_factory, shared_data, smollm2_tokenizer, tiny_model_dir) -> Path:
    """Real pairs scored by the tiny model M0 (scorers) and partitioned easy→hard into 2 chunks."""
    from partitioner import PartitionConfig, partition_preferences
    from partitioner import ScoringConfig, score_preferences

    rows = _rows(shared_data, smollm2_tokenizer, 8).select_columns(["row_id", "source", "prompt", "chosen", "rejected"])
    tmp = tmp_path_factory.mktemp("scored")
    scored = score_preferences(rows, tmp / "scored", ScoringConfig(model=str(tiny_model_dir), max_length=MAX_LENGTH,
                                                                   progress=False))
    return partition_preferences(scored, tmp / "partition", PartitionConfig(chunks=2), progress=False)


def test_precomputed_step1_reuses_m0_partition_scores(scored_partition, tiny_model_dir, tmp_path):
    from partitioner.io import read_arrow_stream
    from partitioner.partition.folder import load_partition
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    out = tmp_path / "run"
    steps = train_stepwise(scored_partition, str(tiny_model_dir), args=dpo_args(out),
                           config=StepwiseConfig(ref_mode="precomputed", steps=1))
    assert steps[0]["reference_source"].startswith("partition scores")
    chunk1 = load_partition(scored_partition)[0]
    used = read_arrow_stream(out / "step_1" / "reference_logps.arrow").to_pydict()
    assert used["ref_chosen_logps"] == list(chunk1["chosen_logps"])
    # A different max_length makes the partition's scores unusable: step 1 is scored again.
    steps = train_stepwise(scored_partition, str(tiny_model_dir), args=dpo_args(tmp_path / "r2", max_length=96),
                           config=StepwiseConfig(ref_mode="precomputed", steps=1))
    assert steps[0]["reference_source"] == "scored with M(0)"


def test_bad_partition_inputs_fail_before_training(partition2, scored_partition, tiny_model_dir, tmp_path, capsys):
    import shutil

    from sdpo_cli.main import main
    from trainer_plugin.config import StepwiseInputError
    from trainer_plugin.driver import train_stepwise

    def copy_of(name):
        dst = tmp_path / name
        shutil.copytree(partition2, dst)
        return dst

    corrupt = copy_of("corrupt")
    shard = corrupt / "chunk-001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    missing = copy_of("missing")
    (missing / "chunk-001.arrow").unlink()

    # A model whose tokenizer differs: the same weights with another chat template.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}[assistant] {% endif %}"
    tok.save_pretrained(other)

    cases = [(corrupt, tiny_model_dir, "fails verification"), (missing, tiny_model_dir, "missing"),
             (partition2, other, "tokenizer mismatch.*tokenizes row"),
             (scored_partition, other, "tokenizer mismatch.*chat template"),
             (tmp_path / "nowhere", tiny_model_dir, "not a partition")]
    for part, model, words in cases:
        out = tmp_path / f"out-{part.name}-{Path(model).name}"
        with pytest.raises(StepwiseInputError, match=words) as e:
            train_stepwise(part, str(model), args=dpo_args(out))
        assert "\n" not in str(e.value)
        assert not list(out.glob("step_*"))  # nothing trained
        rc = main(["train", str(part), "--model_name_or_path", str(model),
                   "--output_dir", str(out), "--report_to", "none"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("sdpo: error:"), err


def test_cli_train_with_yaml_config(partition2, tiny_model_dir, tmp_path, capsys):
    from sdpo_cli.main import main

    out = tmp_path / "cli"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        partition_dir: {partition2}
        model_name_or_path: {tiny_model_dir}
        ref_mode: precomputed
        steps: 1
        output_dir: {out}
        per_device_train_batch_size: 2
        learning_rate: 0.005
        max_length: {MAX_LENGTH}
        gradient_checkpointing: false
        save_strategy: "no"
        report_to: []
        """))
    # no bf16 / use_cpu anywhere: on a machine without a bf16 accelerator the command trains in fp32 by itself
    assert main(["train", "--config", str(cfg), "--beta", "0.2"]) == 0
    assert (out / "step_1" / "_COMPLETE").exists() and not (out / "step_2").exists()
    args = torch.load(out / "step_1" / "training_args.bin", weights_only=False)
    assert args.beta == 0.2 and args.learning_rate == 0.005  # flag wins, YAML applied
    assert args.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert "step 1:" in capsys.readouterr().out


_RESUME_SCRIPT = """
import os, signal, sys
from transformers import TrainerCallback
sys.path.insert(0, {repo!r})
from tests.test_trainer import dpo_args
from trainer_plugin.driver import train_stepwise

class KillInStep2(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if os.environ.get("KILL_IN_STEP2") and args.output_dir.endswith("step_2") and state.global_step == 1:
            os.kill(os.getpid(), signal.SIGKILL)

train_stepwise({part!r}, {model!r}, args=dpo_args(sys.argv[1]), ref_mode="live", callbacks=[KillInStep2()])
"""


@pytest.mark.slow
def test_resume_after_sigkill_in_step2_equals_uninterrupted(partition2, tiny_model_dir, repo_root, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT.format(repo=str(repo_root), part=str(partition2), model=str(tiny_model_dir)))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "a")], env={**env, "KILL_IN_STEP2": "1"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "a" / "step_1" / "_COMPLETE").exists()
    assert not (tmp_path / "a" / "step_2" / "_COMPLETE").exists()
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path / "a")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    once = subprocess.run([sys.executable, str(script), str(tmp_path / "b")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert once.returncode == 0, once.stderr[-2000:]
    a, b = _state(_load(tmp_path / "a" / "step_2")), _state(_load(tmp_path / "b" / "step_2"))
    assert _differs(a, _state(_load(tmp_path / "a" / "step_1")))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    steps = json.loads((tmp_path / "a" / "steps.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2]


@pytest.mark.slow
def test_rescore_between_steps_reorders_remaining_by_m1(partition3, tiny_model_dir, tmp_path):
    from partitioner.io import read_arrow_stream
    from partitioner.partition.folder import load_partition
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise
    from trainer_plugin.reference import score_pairs

    out = tmp_path / "run"
    config = StepwiseConfig(ref_mode="precomputed", rescore_between_steps=True, steps=2)
    train_stepwise(partition3, str(tiny_model_dir), args=dpo_args(out), config=config)
    run = json.loads((out / "run.json").read_text())
    new2, new3 = run["rescored_orders"]["1"]
    old = load_partition(partition3)
    assert sorted(new2 + new3) == sorted(list(old[1]["row_id"]) + list(old[2]["row_id"]))  # same rows, sizes kept
    assert (len(new2), len(new3)) == (len(old[1]), len(old[2]))
    # Easiest first under M1: every pair of the new chunk 2 has a margin >= every pair of the new chunk 3.
    rest = {r["row_id"]: r for ch in old[1:] for r in ch.to_list()}
    m1 = _load(out / "step_1")
    c, r = score_pairs(m1, [rest[i] for i in new2 + new3], max_length=MAX_LENGTH)
    margins = [a - b for a, b in zip(c, r)]
    assert min(margins[: len(new2)]) >= max(margins[len(new2):]) - 1e-4
    assert read_arrow_stream(out / "step_2" / "reference_logps.arrow").column("row_id").to_pylist() == new2


def test_a_resumed_adaptive_run_trains_its_recorded_order(tmp_path):
    """The order recorded after a completed step is re-created on resume (same rows, same chunk sizes); one recorded
    after a step that did not complete (killed between its order and its marker) is not."""
    from datasets import Dataset

    from partitioner.io import write_json, write_marker
    from trainer_plugin.run_folder import RunFolder

    chunks = [Dataset.from_dict({"row_id": ids}) for ids in (["a", "b"], ["c", "d", "e"], ["f", "g"])]
    identity = {"ref_mode": "precomputed", "chunks": [2, 3, 2]}
    (tmp_path / "step_1").mkdir()
    write_marker(tmp_path / "step_1" / "_COMPLETE", {"step": 1})
    write_json(tmp_path / "run.json", {**identity, "rescored_orders": {"1": [["g", "e", "c"], ["d", "f"]],
                                                                        "2": [["c", "d"]]}})
    resumed = RunFolder(tmp_path, identity, {}).resumed_order(chunks)
    assert [list(c["row_id"]) for c in resumed] == [["a", "b"], ["g", "e", "c"], ["d", "f"]]
