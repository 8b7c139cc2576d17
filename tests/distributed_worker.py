"""One process of a test in ``tests/test_distributed.py``: run under ``torchrun`` (several processes) or plain
``python`` (one), given a JSON job file; writes what it saw to ``RESULTS/rank{i}.json``.

Jobs:
    ``cli``: ``sdpo train`` runs (``sdpo_cli.main.main``), recording each optimizer step's loss, the reference
        columns handed to TRL, the rows each process scored, and every write under the ``watch`` folders.
    ``callback``: a DPOTrainer with ``StepwiseReferenceCallback``, recording the sampler rows each process trains on
        per optimizer step and, after every refresh, whether this process's reference equals its policy.
    ``fsdp_refresh``: policy and reference sharded with FSDP2 (``fully_shard``, gloo), refreshed, read back whole.

``"fsdp2": true`` in a job: the Trainer shards with accelerate's FSDP2 on CPU (:func:`fsdp2_on_cpu`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RANK = int(os.environ.get("RANK", "0"))
FSDP_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "configs" / "accelerate_fsdp.yaml"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def watch_writes(roots: list[str]) -> list[list[str]]:
    """Every file opened for writing, renamed, removed or created under ``roots`` by this process (audit hook)."""
    roots = [os.path.realpath(r) for r in roots]
    seen: list[list[str]] = []

    def under(path) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        p = os.path.realpath(os.fsdecode(path))
        return p if any(p == r or p.startswith(r + os.sep) for r in roots) else None

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and (p := under(path)):
                seen.append([event, p])
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"):
            for a in args[:2]:
                if p := under(a):
                    seen.append([event, p])

    sys.addaudithook(hook)
    return seen


def fsdp2_on_cpu() -> None:
    """Make every Accelerator of this process shard with FSDP2 on CPU processes (gloo).

    The environment is what ``accelerate launch --config_file examples/configs/accelerate_fsdp.yaml`` sets (its
    ``fsdp_config`` keys, upper-cased). accelerate itself turns FSDP on only for GPU-like devices: on CPU
    ``AcceleratorState`` keeps MULTI_CPU and drops the plugin, and the Trainer would silently train as DDP. So a
    MULTI_CPU state given an FSDP plugin is switched to FSDP here, as accelerate's GPU branch does it; FSDP2's
    ``fully_shard`` runs on gloo (``test_hard_refresh_reaches_fsdp2_shards``)."""
    import yaml
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    for key, value in config["fsdp_config"].items():
        os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    init = AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP  # what the MULTI_GPU branch of __init__ sets
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_fsdp_on_cpu


def sharding(model) -> dict:
    """How ``model``'s parameters lie on this process: how many are DTensors, and how many hold only a shard."""
    params = list(model.parameters())
    dtensors = [p for p in params if hasattr(p, "to_local")]
    return {"params": len(params), "dtensors": len(dtensors),
            "sharded": sum(tuple(p.to_local().shape) != tuple(p.shape) for p in dtensors)}


def tensor_digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_cli(job: dict) -> dict:
    """``sdpo train`` once per entry of ``job['runs']``; the trainers' losses and reference columns recorded."""
    import trl.trainer.dpo_trainer as dpo_module

    import trainer_plugin.driver as driver
    from sdpo_cli.main import main
    from trainer_plugin.trainer import StepwiseDPOTrainer

    out: dict = {"losses": {}, "ref_columns": {}, "scored_rows": {}, "rc": {}, "sharding": {}, "trl_loads": {}}
    current = {"name": None}
    log, train, score_pairs = StepwiseDPOTrainer.log, StepwiseDPOTrainer.train, driver.score_pairs
    load = dpo_module.create_model_from_path

    def recording_log(self, logs, start_time=None):
        if "loss" in logs:
            out["losses"][current["name"]].append([self.stepwise_step, self.state.global_step, logs["loss"]])
            if self.state.global_step == 1:  # while training: the models as the trainer prepared them
                out["sharding"][current["name"]].append({
                    "step": self.stepwise_step, "distributed_type": self.accelerator.distributed_type.value,
                    "fsdp": self.is_fsdp_enabled, "policy": sharding(self.model),
                    "reference": None if self.ref_model is None else sharding(self.ref_model)})
            if job.get("kill_rank") == RANK and self.stepwise_step == 2 and self.state.global_step == 1:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # this process's whole group, mid-step
        return log(self, logs, start_time)

    def recording_train(self, *args, **kwargs):
        ds = self.train_dataset
        if "ref_chosen_logps" in ds.column_names:
            out["ref_columns"][current["name"]].append([list(ds["ref_chosen_logps"]), list(ds["ref_rejected_logps"])])
        return train(self, *args, **kwargs)

    def counting_load(*args, **kwargs):  # a model DPOTrainer loads from a path itself
        out["trl_loads"][current["name"]].append(str(args[0]) if args else "")
        return load(*args, **kwargs)

    def counting_score_pairs(model, dataset, **kw):
        out["scored_rows"][current["name"]].append(len(dataset))
        return score_pairs(model, dataset, **kw)

    StepwiseDPOTrainer.log, StepwiseDPOTrainer.train = recording_log, recording_train
    driver.score_pairs = counting_score_pairs
    dpo_module.create_model_from_path = counting_load
    for name, argv in job["runs"]:
        current["name"] = name
        for key in ("losses", "ref_columns", "scored_rows", "sharding", "trl_loads"):
            out[key][name] = []
        out["rc"][name] = main(["train", *argv])
    return out


@contextlib.contextmanager
def whole_parameters(*models):
    """Each model's parameters read back whole: FSDP2 shards gathered (``full_tensor``), ZeRO-3 partitions gathered
    (``GatheredParameters``), DDP replicas as they are. Collective under FSDP / ZeRO-3: every process calls it."""
    params = [list(m.parameters()) for m in models]
    if any(hasattr(p, "ds_id") for ps in params for p in ps):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for ps in params for p in ps]):
            yield [[p.data for p in ps] for ps in params]
    else:
        yield [[p.full_tensor() if hasattr(p, "full_tensor") else p for p in ps] for ps in params]


def record_batches(batch_sampler, drawn: list) -> None:
    """Make ``batch_sampler`` append every batch it yields to ``drawn``."""
    base = type(batch_sampler)

    class Recording(base):
        def __iter__(self):
            for batch in base.__iter__(self):
                drawn.append(list(batch))
                yield batch

    batch_sampler.__class__ = Recording


def run_callback(job: dict) -> dict:
    """A DPOTrainer over the concatenated chunks with the stepwise callback, once per ``job['configs']`` entry."""
    import torch
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer
    from tests.test_trainer import dpo_args
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.reference import frozen_copy

    out: dict = {}
    for name, kw in job["configs"]:
        drawn: list[list[int]] = []  # each batch of row indices this process trained on, in order

        class Check(TrainerCallback):  # added after the refresh callback, so it sees the refreshed reference
            def __init__(self):
                self.checks, self.losses = [], []

            def on_train_begin(self, args, state, control, train_dataloader=None, **k):
                record_batches(train_dataloader.batch_sampler, drawn)  # accelerate's BatchSamplerShard (or plain)

            def on_step_end(self, args, state, control, model=None, **k):
                if state.global_step in cb.refresh_steps and state.global_step not in [c[0] for c in self.checks]:
                    policy = trainer.accelerator.unwrap_model(model)
                    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
                    with whole_parameters(ref, policy) as (r_params, p_params):
                        same = all(torch.equal(r, p) for r, p in zip(r_params, p_params, strict=True))
                        self.checks.append([state.global_step, same, tensor_digest(r_params)])

            def on_log(self, args, state, control, logs=None, **k):
                if logs and "loss" in logs:
                    self.losses.append([state.global_step, logs["loss"]])

        model = load_causal_lm(job["model"])
        train = concatenate_chunks(job["partition"])
        trainer = DPOTrainer(model=model, ref_model=frozen_copy(model), args=dpo_args(job["output_dir"], **kw),
                             train_dataset=train, processing_class=load_tokenizer(job["model"]))
        cb = StepwiseReferenceCallback(job["partition"]).install(trainer)
        check = Check()
        trainer.add_callback(check)
        trainer.train()
        per_step = len(drawn) // trainer.state.global_step
        out[name] = {"rows_per_step": cb.sampler.rows_per_step, "steps_per_chunk": cb.sampler.steps_per_chunk(),
                     "boundaries": cb.boundaries, "refresh_steps": cb.refresh_steps,
                     "global_steps": trainer.state.global_step, "checks": check.checks, "losses": check.losses,
                     "step_rows": [sum(drawn[s * per_step:(s + 1) * per_step], []) for s in
                                   range(trainer.state.global_step)],
                     "chunk_of_row": list(train["stepwise_chunk"])}
    return out


def run_fsdp_refresh(job: dict) -> dict:
    """Policy and reference sharded by FSDP2 differently (policy per decoder layer, reference at the root only, as
    TRL prepares it); after training steps the reference is refreshed and both are read back whole."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from scorers.models import load_causal_lm
    from trainer_plugin.reference import frozen_copy, hard_refresh

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    policy = load_causal_lm(job["model"])
    ref = frozen_copy(policy)
    for layer in policy.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    fully_shard(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(RANK))
    for _ in range(2):
        policy(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    before = all(torch.equal(r.full_tensor(), p.full_tensor()) for r, p in zip(ref.parameters(), policy.parameters()))
    local = [(tuple(p.to_local().shape), tuple(p.shape)) for p in policy.parameters()]
    hard_refresh(policy, ref)
    full_ref = [r.full_tensor() for r in ref.parameters()]
    after = all(torch.equal(r, p.full_tensor()) for r, p in zip(full_ref, policy.parameters()))
    dist.destroy_process_group()
    return {"equal_before": before, "equal_after": after, "ref_digest": tensor_digest(full_ref),
            "sharded": any(a != b for a, b in local)}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    if job.get("fsdp2"):
        fsdp2_on_cpu()
    writes = watch_writes(job.get("watch", []))
    result = {"callback": run_callback, "cli": run_cli, "fsdp_refresh": run_fsdp_refresh}[job["job"]](job)
    result.update(rank=RANK, writes=list(writes))
    results = Path(job["results"])
    results.mkdir(parents=True, exist_ok=True)
    (results / f"rank{RANK}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
