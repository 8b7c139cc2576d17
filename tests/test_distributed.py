"""Stepwise DPO past one device: 2 CPU processes (``torchrun``, gloo) against 1 process at the same global batch.

The tiny model and the partitions are built here; ``tests/distributed_worker.py`` runs under ``torchrun`` and
reports what each process saw (losses, reference columns, rows scored, rows trained per optimizer step, writes).

fp32 tolerance: 2 processes average two half-batch gradients (DDP all-reduce) where 1 process takes the mean over
the whole batch, and each scores its own rows in other padded batches, so results agree to rounding, not bitwise:
losses within 1e-5; weights after 2 stepwise steps (4 AdamW steps at lr 5e-3, updates up to 1.5e-2) within 2e-4
per element (AdamW's m / sqrt(v) magnifies rounding where a gradient is near 0: with the packed forward, the default,
one of the 6.4M weights differs by 1.04e-4 in 'live' mode, the rest by < 5e-5; TRL's padded forward: 5e-5) and within 1e-4 of the update's norm overall (observed 6e-6 to 9e-6); reference
log-probs within 1e-4 (TRL's own precompute tolerance in test_trainer.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_trainer import MAX_LENGTH

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
LOSS_TOL = 1e-5
WEIGHT_TOL = 2e-4  # per element
UPDATE_TOL = 1e-4  # ||W_2proc - W_1proc|| / ||W - M0||
LOGP_TOL = 1e-4


def short_pairs(shared_data, tokenizer, n: int):
    """The n shortest of the first 40 real pairs of orca and of LLaMA-Factory en (half each), tokenized."""
    from datasets import concatenate_datasets

    from partitioner.data.loading import load_preferences
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences

    parts = []
    for path in (shared_data / "orca_dpo_pairs" / "validation.jsonl",
                 shared_data / "llamafactory_demo" / "dpo_en_demo.json"):
        kept, _ = tokenize_preferences(load_preferences([path]).select(range(40)), tokenizer,
                                       TokenizeConfig(MAX_LENGTH))
        size = [len(p) + len(c) + len(r) for p, c, r in zip(kept["prompt_ids"], kept["chosen_ids"],
                                                              kept["rejected_ids"], strict=True)]
        parts.append(kept.select(sorted(range(len(kept)), key=size.__getitem__)[: n // 2]))
    return concatenate_datasets(parts)


@pytest.fixture(scope="module")
def partitions(tmp_path_factory, shared_data, smollm2_tokenizer) -> dict[int, Path]:
    """Real partitions: 8 pairs in 2 chunks (4, 4) and 10 pairs in 3 chunks (4, 3, 3)."""
    from partitioner import PartitionConfig, partition_preferences

    out = {}
    for rows, chunks in ((8, 2), (10, 3)):
        folder = tmp_path_factory.mktemp(f"part{chunks}")
        out[chunks] = partition_preferences(short_pairs(shared_data, smollm2_tokenizer, rows), folder,
                                            PartitionConfig(order="random", chunks=chunks, seed=1), progress=False)
    return out


def launch(job: dict, folder: Path, processes: int, timeout: int = 300):
    """Run the worker on ``job`` with ``processes`` processes; (completed process, each process's report)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "job.json"
    job = {**job, "results": str(folder / "results")}
    spec.write_text(json.dumps(job))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*(launcher if processes > 1 else [sys.executable]), str(WORKER), str(spec)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    reports = [json.loads(p.read_text()) for p in sorted((folder / "results").glob("rank*.json"))]
    return done, reports


def train_argv(partition: Path, model: Path, out: Path, per_device: int, ref_mode: str, *extra: str) -> list[str]:
    """``sdpo train`` flags; no --use_cpu: on a machine without an accelerator the CLI turns it on."""
    return [str(partition), "--model_name_or_path", str(model), "--output_dir", str(out), "--ref_mode", ref_mode,
            "--per_device_train_batch_size", str(per_device), "--learning_rate", "5e-3", "--max_length",
            str(MAX_LENGTH), "--bf16", "false", "--report_to", "none", "--logging_steps", "1", "--num_train_epochs",
            "1", "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "7", "--gradient_checkpointing",
            "false", *extra]


def stepwise_job(partitions, model: Path, folder: Path, per_device: int, **extra) -> dict:
    part = partitions[2]
    return {"job": "cli", "watch": [str(folder / "runs"), str(part), str(model)], **extra, "runs": [
        ["live", train_argv(part, model, folder / "runs" / "live", per_device, "live")],
        ["precomputed", train_argv(part, model, folder / "runs" / "precomputed", per_device, "precomputed",
                                   "--held_out", str(part))],
        ["peft", train_argv(part, model, folder / "runs" / "peft", per_device, "peft", "--lora_r", "4",
                            "--learning_rate", "2e-2")],
    ]}


@pytest.fixture(scope="module")
def stepwise_runs(partitions, tiny_model_dir, tmp_path_factory):
    """The three reference modes, 2 steps: 1 process at batch 2, and 2 processes at batch 1 each (global batch 2)."""
    runs = {}
    for processes, per_device in ((1, 2), (2, 1)):
        folder = tmp_path_factory.mktemp(f"stepwise-{processes}")
        done, reports = launch(stepwise_job(partitions, tiny_model_dir, folder, per_device), folder, processes)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(reports) == processes
        runs[processes] = {"folder": folder, "done": done, "reports": reports}
    return runs


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """A step's saved model, or its LoRA adapter ('peft' mode)."""
    from safetensors.torch import load_file

    adapter = step_dir / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else step_dir / "model.safetensors"))


def _assert_close_weights(a: Path, b: Path, m0: Path | None, tol: float, update_tol: float) -> None:
    """Weights of steps ``a`` and ``b`` within ``tol`` per element and ``update_tol`` relative to the update a - M0
    (to the adapter a itself when ``m0`` is None: LoRA's B starts at 0)."""
    wa, wb = _weights(a), _weights(b)
    w0 = _weights(m0) if m0 is not None else {k: torch.zeros_like(v) for k, v in wa.items()}
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, f"largest weight difference {worst:.3g} > {tol}"
    diff = sum(((wa[k] - wb[k]) ** 2).sum() for k in wa) ** 0.5
    update = sum(((wa[k] - w0[k]) ** 2).sum() for k in wa) ** 0.5
    assert update > 0 and diff / update <= update_tol, f"relative difference {diff / update:.3g} > {update_tol}"


@pytest.mark.parametrize("mode", ["live", "precomputed", "peft"])
def test_two_processes_match_one_process_at_the_same_global_batch(stepwise_runs, tiny_model_dir, mode):
    one, two = stepwise_runs[1], stepwise_runs[2]
    base = one["reports"][0]["losses"][mode]
    assert [s[:2] for s in base] == [[1, 1], [1, 2], [2, 1], [2, 2]]  # 4 pairs a chunk, 2 a step: each process
    for report in two["reports"]:  # trains on its half of every global batch, not on every row
        losses = report["losses"][mode]
        assert [s[:2] for s in losses] == [s[:2] for s in base]
        for (_, _, a), (_, _, b) in zip(losses, base, strict=True):
            assert a == pytest.approx(b, abs=LOSS_TOL)
    assert two["reports"][0]["losses"][mode] == two["reports"][1]["losses"][mode]  # the all-reduced loss
    _assert_close_weights(one["folder"] / "runs" / mode / "step_2", two["folder"] / "runs" / mode / "step_2",
                          None if mode == "peft" else tiny_model_dir, WEIGHT_TOL, UPDATE_TOL)
    steps = json.loads((two["folder"] / "runs" / mode / "steps.json").read_text())["steps"]
    assert [(s["step"], s["optimizer_steps"], s["rows_trained"]) for s in steps] == [(1, 2, 4), (2, 2, 4)]


def test_only_the_main_process_writes_and_logs(stepwise_runs):
    two = stepwise_runs[2]
    main, other = two["reports"]
    assert other["writes"] == []  # rank 1 wrote nothing under the run folders, the partition or the model
    runs = two["folder"] / "runs"
    written = {Path(p) for _, p in main["writes"]}
    assert all(str(p).startswith(str(runs)) for p in written)  # nothing beside the partition's shards or the model
    for mode in ("live", "precomputed", "peft"):
        for name in ("run.json", "steps.json", "step_1/_COMPLETE", "step_2/_COMPLETE",
                     "step_2/tokenizer_config.json"):
            assert any(p.name == Path(name).name and str(p).startswith(str(runs / mode / Path(name).parent))
                       for p in written), (mode, name)
    assert any(p.name == "reference_logps.arrow" for p in written)
    out, err = two["done"].stdout, two["done"].stderr
    assert out.count("wrote ") == 3 and out.count("step 2: 4 pairs, 2 optimizer steps") == 3  # one per run
    for line in ("stepwise step 1/2", "stepwise step 2/2", "step 1 {", "step 2 {"):
        assert err.count(line) == 3, line  # once per run (3 runs), not once per process
    assert err.count("stepwise/gamma_ref_held_out") == 2  # the precomputed run's 2 steps, logged once each


def test_precomputed_reference_scored_once_and_gathered_in_order(stepwise_runs):
    from partitioner.io import read_arrow_stream

    one, two = stepwise_runs[1], stepwise_runs[2]
    single = one["reports"][0]["scored_rows"]["precomputed"]
    assert single == [4, 8, 4, 8, 8]  # chunk 1, held-out, chunk 2, held-out, final held-out
    shares = [r["scored_rows"]["precomputed"] for r in two["reports"]]
    assert shares == [[2, 4, 2, 4, 4], [2, 4, 2, 4, 4]]  # each row scored once in total, half on each process
    columns = [r["ref_columns"]["precomputed"] for r in two["reports"]]
    assert columns[0] == columns[1]  # every process hands TRL the same reference columns
    base = one["reports"][0]["ref_columns"]["precomputed"]
    torch.testing.assert_close(torch.tensor(columns[0]), torch.tensor(base), rtol=0, atol=LOGP_TOL)
    run = two["folder"] / "runs" / "precomputed"
    for t in (1, 2):
        saved = read_arrow_stream(run / f"step_{t}" / "reference_logps.arrow").to_pydict()
        assert [saved["ref_chosen_logps"], saved["ref_rejected_logps"]] == columns[0][t - 1]
    ours = json.loads((run / "steps.json").read_text())
    theirs = json.loads((one["folder"] / "runs" / "precomputed" / "steps.json").read_text())
    for a, b in [(s["reference"]["held_out"], z["reference"]["held_out"])
                 for s, z in zip(ours["steps"], theirs["steps"], strict=True)] + [
                (ours["final"]["held_out"], theirs["final"]["held_out"])]:
        # M1, M2 differ by DDP's rounding between 1 and 2 processes: one of 8 margins could sit at rounding level
        assert a["pairs"] == b["pairs"] == 8 and abs(a["reward_accuracy"] - b["reward_accuracy"]) <= 1 / 8
        assert a["mean_margin"] == pytest.approx(b["mean_margin"], abs=LOGP_TOL)


def dropped_rows_job(part: Path, model: Path, folder: Path, per_device: int, **extra) -> dict:
    """``sdpo train`` on ``part`` in the live and the precomputed reference mode."""
    return {"job": "cli", "watch": [str(folder / "runs"), str(part)], **extra, "runs": [
        [mode, train_argv(part, model, folder / "runs" / mode, per_device, mode)] for mode in ("live", "precomputed")]}


def step_records(folder: Path) -> dict[str, list[tuple]]:
    """Each mode's (rows, rows_trained, optimizer_steps) per step, from its steps.json."""
    return {mode: [(s["rows"], s["rows_trained"], s["optimizer_steps"])
                   for s in json.loads((folder / "runs" / mode / "steps.json").read_text())["steps"]]
            for mode in ("live", "precomputed")}


@pytest.fixture(scope="module")
def dropped_rows(shared_data, tiny_model_dir, tmp_path_factory):
    """Real HH-RLHF pairs, not tokenized in the partition, 5 of 12 with a prompt that fills max_length 128, and the
    one-process run's step records on them (batch 2), which every multi-process variant is held to."""
    from partitioner import PartitionConfig, load_preferences, partition_preferences

    rows = load_preferences([shared_data / "hh_rlhf_harmless" / "test.jsonl.gz"], limit_per_source=12)
    part = partition_preferences(rows, tmp_path_factory.mktemp("hh-part"),
                                 PartitionConfig(order="random", chunks=2, seed=1), progress=False)
    folder = tmp_path_factory.mktemp("hh-p1")
    done, _ = launch(dropped_rows_job(part, tiny_model_dir, folder, 2), folder, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    records = step_records(folder)
    for mode in ("live", "precomputed"):
        assert sum(r[1] for r in records[mode]) == 7  # the 5 long prompts dropped, as DPOTrainer drops them
    return part, records


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_rows_dropped_by_tokenization_keep_processes_aligned(dropped_rows, tiny_model_dir, tmp_path, sharding):
    """Under 2 processes (batch 1 each), DDP and FSDP2, `sdpo train` tokenizes before splitting the scoring passes,
    so both reference modes train both steps with the one-process run's rows and optimizer steps (the split used to
    see each process drop its own rows). FSDP2 is accelerate's, driven by the Trainer (the worker's ``fsdp2``)."""
    part, one = dropped_rows
    job = dropped_rows_job(part, tiny_model_dir, tmp_path, 1, fsdp2=sharding == "fsdp2")
    done, reports = launch(job, tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert step_records(tmp_path) == one
    for report in reports:  # what each process's trainers trained: sharded under FSDP2, whole replicas under DDP
        for mode in ("live", "precomputed"):
            seen = report["sharding"][mode]
            assert [s["step"] for s in seen] == [1, 2]
            # the driver hands TRL its models (and, precomputed, the reference log-probs): TRL loads none from a
            # path, not even the whole reference it would load under FSDP to precompute what is given
            assert report["trl_loads"][mode] == []
            for s in seen:
                policy, ref = s["policy"], s["reference"]
                assert (ref is None) == (mode == "precomputed")  # no reference model while training
                if sharding == "fsdp2":  # every parameter a DTensor holding half of it here (dim 0 split in 2)
                    assert s["distributed_type"] == "FSDP" and s["fsdp"]
                    assert policy["dtensors"] == policy["sharded"] == policy["params"] > 0
                    assert ref is None or ref["dtensors"] == ref["sharded"] == ref["params"] > 0
                else:  # the same job without the worker's switch: DDP replicas, so the switch is what shards

                    assert s["distributed_type"] == "MULTI_CPU" and not s["fsdp"]
                    assert policy["dtensors"] == 0 and (ref is None or ref["dtensors"] == 0)


@pytest.mark.slow
def test_resume_after_sigkill_of_one_process_group(stepwise_runs, partitions, tiny_model_dir, tmp_path):
    part = partitions[2]
    out = tmp_path / "runs" / "live"
    job = {"job": "cli", "watch": [], "runs": [["live", train_argv(part, tiny_model_dir, out, 1, "live")]]}
    killed, _ = launch({**job, "kill_rank": 1}, tmp_path / "killed", 2)
    assert killed.returncode != 0
    assert (out / "step_1" / "_COMPLETE").exists() and not (out / "step_2" / "_COMPLETE").exists()
    resumed, reports = launch(job, tmp_path / "resumed", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for report in reports:  # every process resumed at step 2
        assert [s[:2] for s in report["losses"]["live"]] == [[2, 1], [2, 2]]
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    uninterrupted = stepwise_runs[2]["folder"] / "runs" / "live" / "step_2"
    _assert_close_weights(out / "step_2", uninterrupted, tiny_model_dir, 1e-6, 1e-6)  # same processes: rounding


def test_callback_under_two_processes_keeps_chunks_and_refresh_steps(partitions, tiny_model_dir, tmp_path):
    """Chunks of 4, 3, 3 rows: at 2 rows per optimizer step (padded chunks: 2, 2, 2 steps) and at 4 (accumulation
    2: 1, 1, 1 steps), 1 process at batch 2 against 2 processes at batch 1."""
    part = partitions[3]
    configs = {1: [["ga1", {"per_device_train_batch_size": 2}],
                   ["ga2", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}]],
               2: [["ga1", {"per_device_train_batch_size": 1}],
                   ["ga2", {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}]]}
    runs = {}
    for processes in (1, 2):
        job = {"job": "callback", "model": str(tiny_model_dir), "partition": str(part),
               "output_dir": str(tmp_path / f"cb{processes}"), "configs": configs[processes]}
        done, reports = launch(job, tmp_path / f"job{processes}", processes)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = reports
    expected = {"ga1": ([2, 2, 2], [2, 4]), "ga2": ([1, 1, 1], [1, 2])}
    one = runs[1][0]
    for name, (per_chunk, refresh) in expected.items():
        base = one[name]
        assert (base["steps_per_chunk"], base["refresh_steps"]) == (per_chunk, refresh)
        chunk_of = base["chunk_of_row"]
        reports = [r[name] for r in runs[2]]
        for r in reports:
            assert r["rows_per_step"] == base["rows_per_step"] and r["global_steps"] == base["global_steps"]
            assert r["refresh_steps"] == refresh  # the same global steps as 1 process
            for rows in r["step_rows"]:  # chunk-pure on each process
                assert len({chunk_of[i] for i in rows}) == 1
            # after every refresh this process's reference equals its policy
            assert [c[:2] for c in r["checks"]] == [[s, True] for s in refresh]
        assert [c[2] for c in reports[0]["checks"]] == [c[2] for c in reports[1]["checks"]]  # same on both
        for step, rows in enumerate(base["step_rows"]):  # the two processes' rows of a step = 1 process's step
            together = sorted(reports[0]["step_rows"][step] + reports[1]["step_rows"][step])
            assert together == sorted(rows) and len({chunk_of[i] for i in together}) == 1
        for (s, a), (z, b) in zip(reports[0]["losses"], base["losses"], strict=True):
            assert s == z and a == pytest.approx(b, abs=LOSS_TOL)


def test_hard_refresh_reaches_fsdp2_shards(tiny_model_dir, tmp_path):
    """accelerate 1.15 turns FSDP on only for GPU-like devices (on CPU the Trainer silently trains as DDP), so the
    refresh is checked on torch's ``fully_shard`` directly on 2 CPU processes (gloo); the Trainer-driven FSDP2 run
    is ``test_rows_dropped_by_tokenization_keep_processes_aligned[fsdp2]`` (the worker switches accelerate over)."""
    done, reports = launch({"job": "fsdp_refresh", "model": str(tiny_model_dir)}, tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in reports:
        assert r["sharded"] and not r["equal_before"] and r["equal_after"]
    assert reports[0]["ref_digest"] == reports[1]["ref_digest"]


def test_optimizer_step_rows_follow_accelerate_sharding():
    """What accelerate's ``BatchSamplerShard`` deals to each process, and the rows one optimizer step takes."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from trainer_plugin.callback import ChunkOrderedSampler, StepwiseReferenceCallback, optimizer_step_rows

    def loader(batch_sampler):
        return SimpleNamespace(batch_sampler=batch_sampler)

    order = SequentialSampler(range(16))
    assert optimizer_step_rows(loader(BatchSampler(order, 2, False)), 3) == 6
    dealt = BatchSamplerShard(BatchSampler(order, 2, False), num_processes=2, process_index=1)
    assert list(dealt)[:2] == [[2, 3], [6, 7]]  # process 1 takes batches 1, 3, ... of the order
    assert optimizer_step_rows(loader(dealt), 2) == 8  # accumulation 2: rows 0..7 of the order on the 2 processes
    split = BatchSamplerShard(BatchSampler(order, 4, False), num_processes=2, process_index=1, split_batches=True)
    assert list(split)[:2] == [[2, 3], [6, 7]]  # split_batches: half of every batch of 4
    assert optimizer_step_rows(loader(split), 2) == 8
    cb = StepwiseReferenceCallback(chunk_sizes=[4, 4])
    cb.sampler = ChunkOrderedSampler([4, 4], rows_per_step=4)  # as install() would build it for 1 process
    with pytest.raises(ValueError, match="takes 8 rows per optimizer step"):
        cb.on_train_begin(SimpleNamespace(gradient_accumulation_steps=2, num_train_epochs=1),
                          SimpleNamespace(is_world_process_zero=True, global_step=0), None, train_dataloader=loader(dealt))
