"""PackedDPOTrainer against TRL's own DPOTrainer: same tiny Llama (real SmolLM2 tokenizer), same real rows (orca
and LLaMA-Factory, conversational and standard text, cut by keep_start and keep_end), same batch and seed.

Tolerances (the issue's): every logged loss and metric within 1e-4 relative or 1e-6 absolute; after one step every
parameter's gradient with cosine >= 0.9999 and |g - g_TRL| <= 1e-3 |g_TRL|; after an epoch (6 steps, every pair once,
the last batch a single pair) θ6 - θ0 of each tensor within 1e-2 relative. The rewards are the exception, moved by fp32 summation order alone: a reward is β·(log π -
log π_ref), the difference of two fp32 sums of ~10³ nats, each known to about one ulp (6e-5 at 600), so a reward
of 0.02 is only known to ~1e-5 absolute, whoever computes it. For rewards/* the tolerance is therefore
β·8·ulp(|logps|) absolute (:func:`reward_floor`), and the epoch tests measure it: TRL against itself at another
batch shape (``pad_to_multiple_of``: other padded lengths, so other kernels' summation order) moves the rewards by
a nonzero amount within that bound, and ours stays within it too (or within 3x TRL's own deviation).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from transformers import TrainerCallback

MAX_LENGTH = 128
EPOCH_STEPS = 6  # the 21 pairs at batch 4: 5 full batches and one of a single pair
BATCH = 4
SHORT_LLAMAFACTORY_ROWS = [21, 23, 102, 134, 269]
NOT_METRICS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch", "step", "total_flos"}


# ----------------------------------------------------------------------------------------------------- data, model


@pytest.fixture(scope="module")
def conversational(shared_data):
    """The first 8 orca and 8 LLaMA-Factory en pairs (most cut at 128 tokens), and the 5 LLaMA-Factory pairs that fit
    in 128 tokens whole; conversational (system/user turns; assistant replies)."""
    from datasets import concatenate_datasets

    from partitioner.data.loading import load_preferences

    lf = load_preferences([shared_data / "llamafactory_demo" / "dpo_en_demo.json"])
    parts = [load_preferences([shared_data / "orca_dpo_pairs" / "validation.jsonl"]).select(range(8)),
             lf.select(range(8)), lf.select(SHORT_LLAMAFACTORY_ROWS)]
    return concatenate_datasets(parts).select_columns(["prompt", "chosen", "rejected"]).to_list()


@pytest.fixture(scope="module")
def text_rows(conversational):
    """The same pairs as standard text rows (TRL appends EOS to them)."""
    def text(messages):
        return "\n\n".join(m["content"] for m in messages)

    return [{"prompt": text(r["prompt"]) + "\n\n", "chosen": text(r["chosen"]), "rejected": text(r["rejected"])}
            for r in conversational]


@pytest.fixture(scope="module")
def m0(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def dpo_args(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, learning_rate=1e-3,
                max_length=MAX_LENGTH, bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False,
                save_strategy="no", logging_steps=1, max_steps=EPOCH_STEPS, disable_tqdm=True, seed=7)
    return DPOConfig(**{**base, **kw})


class GradsAtFirstStep(TrainerCallback):
    """The gradients of the first optimizer step (after clipping, as the optimizer sees them)."""

    grads: dict | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train(cls, m0, rows, args, *, live=True, **trainer_kw):
    """A fresh copy of M0 trained by ``cls`` (reference: a frozen copy of M0, or given columns); returns the trainer,
    its log history and the first step's gradients."""
    from datasets import Dataset

    from scorers.models import load_tokenizer

    torch.manual_seed(0)
    model = copy.deepcopy(m0)
    ref = copy.deepcopy(m0) if live else None
    grads = GradsAtFirstStep()
    data = Dataset.from_list(rows)  # a fresh fingerprint: TRL's precompute cache cannot answer
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=load_tokenizer("bundled"),
                  callbacks=[grads], **trainer_kw)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h], grads.grads


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")


def reward_floor(log: dict, beta: float) -> float:
    """What fp32 summation order alone can move a logged reward by: β·8 ulps of the largest summed log-prob."""
    largest = max(abs(log["logps/chosen"]), abs(log["logps/rejected"]), 1.0)
    return beta * 8 * 2.0 ** (math.frexp(largest)[1] - 24)  # fp32 ulp: 24-bit significand


def rewards_are_rounding_noise(log: dict, beta: float = 0.1) -> bool:
    """Whether a step's logged rewards are all at fp32 rounding level: the policy equals its reference (step 1 with a
    live reference, or the step after a refresh), so every pair's margin is the difference of two equal sums and
    ``rewards/accuracies`` counts the signs of rounding noise. Which of those signs come out positive depends on the
    kernels' summation order (oneDNN or MKL, AVX2 or AVX-512, flex or the loop), so the accuracy of such a step is
    not compared between implementations; the rewards themselves are, within :func:`reward_floor`."""
    floor = reward_floor(log, beta)
    return all(abs(log[k]) <= floor for k in REWARDS)


def assert_logs_match(trl_logs, ours_logs, floor_logs=None, beta=0.1):
    assert len(trl_logs) == len(ours_logs) > 0
    floor = {}
    for a, f in zip(trl_logs, floor_logs or []):
        for k in a.keys() - NOT_METRICS:
            floor[k] = max(floor.get(k, 0.0), abs(a[k] - f[k]))
    for step, (a, b) in enumerate(zip(trl_logs, ours_logs), start=1):
        assert a.keys() == b.keys()
        for k in a.keys() - NOT_METRICS:
            if k == "rewards/accuracies" and rewards_are_rounding_noise(a, beta):
                continue  # the fraction of positive rounding noise: host-dependent (see rewards_are_rounding_noise)
            tol = max(1e-4 * abs(a[k]), 1e-6, 3 * floor.get(k, 0.0))
            if k in REWARDS:
                tol = max(tol, reward_floor(a, beta))
            assert abs(a[k] - b[k]) <= tol, f"step {step} {k}: TRL {a[k]} packed {b[k]} (TRL vs TRL {floor.get(k)})"
    return floor


def assert_grads_match(trl, ours):
    assert trl.keys() == ours.keys() and trl
    for name, g in trl.items():
        o = ours[name]
        cos = torch.nn.functional.cosine_similarity(g.flatten(), o.flatten(), dim=0)
        assert cos >= 0.9999, f"{name}: cosine {cos}"
        assert (o - g).norm() <= 1e-3 * g.norm(), f"{name}: |diff| {(o - g).norm()} vs |g| {g.norm()}"


def assert_updates_match(m0, trl_model, ours_model, rtol=1e-2):
    for (name, p0), p1, p2 in zip(m0.named_parameters(), trl_model.parameters(), ours_model.parameters()):
        d1, d2 = (p1 - p0).detach(), (p2 - p0).detach()
        assert (d2 - d1).norm() <= rtol * d1.norm(), f"{name}: |Δθ diff| {(d2 - d1).norm()} vs |Δθ| {d1.norm()}"


def trl_loss_types() -> list[str]:
    from trl import DPOConfig

    return re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])


# ----------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_packed_lines_hold_the_collators_tokens(conversational, text_rows, smollm2_tokenizer, mode):
    """Packing TRL's collated batch gives the scorer's packed rows (``kept_view`` truncation of the untruncated ids),
    every target sits where TRL's shifted labels put it, and a token budget bounds every line but single pairs."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.packing import pack_line, packed_row
    from trainer_plugin.packed_batch import pack_collated

    tok = smollm2_tokenizer
    shared = two_segments = truncated = computed = real = 0
    for rows in (conversational, text_rows):
        data = Dataset.from_list([dict(r, row_id=str(i), source="s") for i, r in enumerate(rows)])
        data = tokenize_preferences(data, tok, TokenizeConfig(MAX_LENGTH, mode))[0]  # TRL's tokens (tested there)
        data = data.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
        collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_LENGTH, truncation_mode=mode)
        for start in range(0, len(data), BATCH):
            examples = data[start : start + BATCH]
            batch = collate(examples)
            packed = pack_collated(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], None, "cpu")
            line = packed.lines[0]
            expected, _ = pack_line([packed_row(i, e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], MAX_LENGTH,
                                                mode) for i, e in enumerate(examples)])
            assert line.input_ids[0].tolist() == expected.ids and line.position_ids[0].tolist() == expected.pos
            labels = batch["input_ids"][:, 1:][packed.label_mask]
            assert torch.equal(labels[line.flat_index], line.labels)
            assert line.tokens <= batch["attention_mask"].sum() <= batch["input_ids"].numel()
            computed += line.tokens
            real += int(batch["attention_mask"].sum())
            for n0, n1, n2 in line.layout[0, 0].tolist():
                shared += n0 > 0
                two_segments += n0 == 0
            truncated += sum(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) > MAX_LENGTH
                             for e in examples)
            split = pack_collated(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], 150, "cpu")
            assert all(s.tokens <= 150 or s.layout.shape[2] == 1 for s in split.lines)
            assert torch.equal(torch.cat([s.flat_index for s in split.lines]).sort().values,
                               torch.arange(packed.n_targets))
    assert shared and truncated and computed < real
    assert two_segments if mode == "keep_end" else not two_segments


@pytest.mark.parametrize("rows_name,mode", [("conversational", "keep_start"), ("text_rows", "keep_end")])
def test_an_epoch_matches_trl(request, m0, tmp_path, rows_name, mode):
    from trl import DPOTrainer

    from trainer_plugin.packed import PackedDPOTrainer

    rows = request.getfixturevalue(rows_name)
    assert math.ceil(len(rows) / BATCH) == EPOCH_STEPS and len(rows) % BATCH == 1
    trl, trl_logs, trl_grads = train(DPOTrainer, m0, rows, dpo_args(tmp_path, truncation_mode=mode))
    _, floor_logs, _ = train(DPOTrainer, m0, rows, dpo_args(tmp_path, truncation_mode=mode, pad_to_multiple_of=96))
    ours, ours_logs, ours_grads = train(PackedDPOTrainer, m0, rows, dpo_args(tmp_path, truncation_mode=mode))
    assert trl.state.global_step == ours.state.global_step == EPOCH_STEPS
    floor = assert_logs_match(trl_logs, ours_logs, floor_logs)
    # fp32 summation order alone moves TRL's own rewards (by a nonzero amount on the hosts seen so far; a host whose
    # kernels happen to sum both shapes alike would move them by 0), by no more than the bound used for them
    assert all(abs(a[k] - f[k]) <= reward_floor(a, 0.1) for a, f in zip(trl_logs, floor_logs) for k in REWARDS)
    assert_grads_match(trl_grads, ours_grads)
    assert_updates_match(m0, trl.model, ours.model)


def test_gradient_checkpointing_and_token_budget_give_trls_gradient(m0, conversational, tmp_path):
    """One step on 4 real pairs: with gradient checkpointing, and with a token budget that splits the micro-batch
    into several forwards (each no longer than the budget, unless one pair alone is), the gradient is TRL's."""
    from trl import DPOTrainer

    from trainer_plugin.packed import PackedDPOTrainer

    args = dict(max_steps=1)
    _, trl_logs, trl_grads = train(DPOTrainer, m0, conversational, dpo_args(tmp_path, **args))
    for variant in ({"gradient_checkpointing": True}, {"packed_batch_tokens": 200},
                    {"packed_batch_tokens": 200, "gradient_checkpointing": True}):
        budget = variant.pop("packed_batch_tokens", None)
        lengths = []
        hook = m0.model.register_forward_pre_hook(lambda mod, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
        try:
            _, logs, grads = train(PackedDPOTrainer, m0, conversational, dpo_args(tmp_path, **args, **variant),
                                   packed_batch_tokens=budget)
        finally:
            hook.remove()
        assert_logs_match(trl_logs, logs)
        assert_grads_match(trl_grads, grads)
        if budget:  # policy lines without gradients, the same again with them on the backward pass, reference
            assert len(lengths) >= 6 and len(lengths) % 3 == 0 and max(lengths) <= 2 * MAX_LENGTH


LOSS_OPTIONS = [{"loss_type": [t]} for t in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot",
                                              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")]
LOSS_OPTIONS += [{"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
                 {"loss_type": ["robust"], "label_smoothing": 0.1},
                 {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, {"use_weighting": True},
                 {"f_divergence_type": "js_divergence"}]


@pytest.fixture(scope="module")
def given_reference(m0, text_rows):
    """8 LLaMA-Factory text rows with reference columns scored by another random Llama (cut at 96 tokens,
    keep_end): the rewards are far from zero from the first step on."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.models import load_tokenizer
    from trainer_plugin.reference import score_pairs

    rows = text_rows[8:16]
    data = Dataset.from_list([dict(r, row_id=str(i), source="s") for i, r in enumerate(rows)])
    kept = tokenize_preferences(data, load_tokenizer("bundled"), TokenizeConfig(96, "keep_end"))[0]
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(m0.config)
    chosen, rejected = score_pairs(other, kept, max_length=96, truncation_mode="keep_end")
    return [dict(r, ref_chosen_logps=c, ref_rejected_logps=j) for r, c, j in zip(rows, chosen, rejected)]


@pytest.mark.parametrize("options", LOSS_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_trl_loss_option_matches_trl(m0, given_reference, tmp_path, options):
    """One optimizer step on 4 LLaMA-Factory text rows cut at 96 tokens (keep_end), against given reference
    columns: logged loss and metrics, and the gradient."""
    from trainer_plugin.trainer import PackedStepwiseDPOTrainer, StepwiseDPOTrainer

    args = dpo_args(tmp_path, max_steps=1, max_length=96, truncation_mode="keep_end", precompute_ref_log_probs=True,
                    **options)
    _, trl_logs, trl_grads = train(StepwiseDPOTrainer, m0, given_reference, args, live=False)
    _, ours_logs, ours_grads = train(PackedStepwiseDPOTrainer, m0, given_reference, args, live=False)
    assert trl_logs[0]["rewards/accuracies"] not in (0.0, 1.0)
    assert_logs_match(trl_logs, ours_logs)
    assert_grads_match(trl_grads, ours_grads)


def test_ld_alpha_with_live_reference_matches_trl(m0, text_rows, tmp_path):
    """``ld_alpha`` weights the tokens past the shorter side in the live reference's sums as in the policy's."""
    from trl import DPOTrainer

    from trainer_plugin.packed import PackedDPOTrainer

    args = dpo_args(tmp_path, max_steps=2, max_length=96, truncation_mode="keep_end", ld_alpha=0.5)
    _, trl_logs, trl_grads = train(DPOTrainer, m0, text_rows[8:16], args)
    _, ours_logs, ours_grads = train(PackedDPOTrainer, m0, text_rows[8:16], args)
    assert trl_logs[1]["rewards/margins"] != 0
    assert_logs_match(trl_logs, ours_logs)
    assert_grads_match(trl_grads, ours_grads)


def test_the_loss_options_cover_every_trl_loss_type():
    covered = {t for options in LOSS_OPTIONS for t in options.get("loss_type", ())}
    assert set(trl_loss_types()) == covered  # a new TRL loss type must be added to LOSS_OPTIONS


def test_gradient_accumulation_matches_trl(m0, conversational, tmp_path):
    from trl import DPOTrainer

    from trainer_plugin.packed import PackedDPOTrainer

    """Gradient accumulation (2 micro-batches of 2 pairs per optimizer step), then ``evaluate`` on held-out rows."""
    from datasets import Dataset

    args = dpo_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    trl, trl_logs, trl_grads = train(DPOTrainer, m0, conversational, args)
    ours, ours_logs, ours_grads = train(PackedDPOTrainer, m0, conversational, args)
    assert_logs_match(trl_logs, ours_logs)
    assert_grads_match(trl_grads, ours_grads)
    assert_updates_match(m0, trl.model, ours.model)
    def metrics(evaluated: dict) -> dict:
        return {k.removeprefix("eval_"): v for k, v in evaluated.items() if not k.endswith(("runtime", "per_second"))}

    trl_eval, ours_eval = (metrics(t.evaluate(Dataset.from_list(conversational[8:16]))) for t in (trl, ours))
    assert "rewards/margins" in trl_eval and "loss" in trl_eval
    assert_logs_match([trl_eval], [ours_eval])


def test_given_reference_columns_and_packed_precompute(m0, conversational, tmp_path):
    """``ref_chosen_logps``/``ref_rejected_logps`` columns (the driver's precomputed mode) are kept and trained
    against as TRL does; without them, the packed precompute equals TRL's."""
    from trl import DPOTrainer
    from transformers import AutoModelForCausalLM

    from trainer_plugin.packed import PackedDPOTrainer
    from trainer_plugin.trainer import PackedStepwiseDPOTrainer, StepwiseDPOTrainer

    args = dpo_args(tmp_path, precompute_ref_log_probs=True, max_steps=2)
    trl, _, _ = train(DPOTrainer, m0, conversational, args)
    ours, _, _ = train(PackedDPOTrainer, m0, conversational, args)
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours.train_dataset[col]), torch.tensor(trl.train_dataset[col]),
                                   rtol=1e-5, atol=1e-5)

    other = AutoModelForCausalLM.from_config(m0.config)  # another random model: rewards far from zero at step 0
    kept = trl.train_dataset  # the rows TRL keeps, tokenized
    given = [dict(r, ref_chosen_logps=c, ref_rejected_logps=j) for r, c, j in
             zip(kept.select_columns(["prompt", "chosen", "rejected"]).to_list(), *_score(other, kept))]
    trl_s, trl_logs, trl_grads = train(StepwiseDPOTrainer, m0, given, args, live=False)
    ours_s, ours_logs, ours_grads = train(PackedStepwiseDPOTrainer, m0, given, args, live=False)
    assert ours_s.train_dataset["ref_chosen_logps"] == [g["ref_chosen_logps"] for g in given]
    assert_logs_match(trl_logs, ours_logs)
    assert_grads_match(trl_grads, ours_grads)
    assert_updates_match(m0, trl_s.model, ours_s.model)


def _score(model, tokenized):
    from trainer_plugin.reference import score_pairs

    return score_pairs(model, tokenized, max_length=MAX_LENGTH)


def test_refuses_what_it_cannot_honour(m0, conversational, tmp_path):
    from peft import PromptTuningConfig
    from transformers import MixtralConfig, MixtralForCausalLM

    from sdpo_core.errors import ConfigError
    from trainer_plugin.packed import PackedDPOTrainer

    cases = [
        (dict(args=dpo_args(tmp_path, use_liger_kernel=True)), "Liger"),
        (dict(peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)), "prompt-learning"),
        (dict(packed_batch_tokens=0), "packed_batch_tokens"),
        (dict(rows=[dict(r, image=None) for r in conversational]), "vision"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigError, match=words) as err:
            train(PackedDPOTrainer, m0, kwargs.pop("rows", conversational), kwargs.pop("args", dpo_args(tmp_path)),
                  **kwargs)
        assert "\n" not in str(err.value)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=m0.config.vocab_size, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                           num_local_experts=2, router_aux_loss_coef=0.01))
    with pytest.raises(ConfigError, match="MoE"):
        train(PackedDPOTrainer, moe, conversational, dpo_args(tmp_path))


def test_driver_packs_by_default_and_the_drop_in_works_with_the_callback(tiny_model_dir, m0, conversational,
                                                                          tmp_path):
    """``train_stepwise`` trains with the packed trainer unless ``packing=False`` (``sdpo train --packing false``),
    with the same results; ``PackedDPOTrainer`` drops in for ``DPOTrainer`` under ``StepwiseReferenceCallback``
    (same results, reference refreshed); the trained model keeps its own modules (no scorer kernel swaps)."""
    import argparse

    from datasets import Dataset
    from trl import DPOTrainer

    from sdpo_cli.options import Options, build
    from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
    from scorers.compat import drop_trl_forward_patch
    from scorers.models import load_tokenizer
    from sdpo_cli import train as cli
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise
    from trainer_plugin.packed import PackedDPOTrainer
    from trainer_plugin.trainer import PackedStepwiseDPOTrainer, StepwiseDPOTrainer
    from test_trainer import when_training_starts

    options = Options(argparse.ArgumentParser())
    cli.add_arguments(options)
    values = options.values(options.parser.parse_args(options.normalise_argv(["PART", "--packing", "false"])), None)
    assert build(StepwiseConfig, values).packing is False and StepwiseConfig().packing is True

    rows = Dataset.from_list([dict(r, row_id=str(i), source="s") for i, r in enumerate(conversational[8:16])])
    rows = tokenize_preferences(rows, load_tokenizer("bundled"), TokenizeConfig(MAX_LENGTH))[0]
    chunks = [rows.select(range(4)), rows.select(range(4, len(rows)))]
    kinds, steps = {}, {}
    for packing in (True, False):
        args = dpo_args(tmp_path / str(packing), per_device_train_batch_size=2, max_steps=-1, num_train_epochs=1)
        steps[packing] = train_stepwise(chunks, str(tiny_model_dir), args=args, config=StepwiseConfig(packing=packing),
                                        callbacks=[when_training_starts(lambda t, trainer, p=packing:
                                                                        kinds.setdefault(p, type(trainer)))])
    assert kinds == {True: PackedStepwiseDPOTrainer, False: StepwiseDPOTrainer}
    for ours, trl in zip(steps[True], steps[False]):
        assert ours["trl"].keys() == trl["trl"].keys() and "rewards/margins" in trl["trl"]
        for k, v in trl["trl"].items():
            if k == "rewards/accuracies":  # a mean over the step's logs, whose first has reference = policy (signs
                continue  # of rounding noise); compared per log, where defined, by assert_logs_match below
            assert ours["trl"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k  # means over the step's logs

    data = concatenate_chunks(chunks).select_columns(["prompt", "chosen", "rejected", "stepwise_chunk"]).to_list()
    models = {}
    for cls in (DPOTrainer, PackedDPOTrainer):
        torch.manual_seed(0)
        model, ref = copy.deepcopy(m0), copy.deepcopy(m0)
        trainer = cls(model=model, ref_model=ref, train_dataset=Dataset.from_list(data),
                      processing_class=load_tokenizer("bundled"),
                      args=dpo_args(tmp_path / cls.__name__, per_device_train_batch_size=2, max_steps=-1,
                                    num_train_epochs=1))
        callback = StepwiseReferenceCallback().install(trainer)
        trainer.train()
        models[cls] = (model, [h for h in trainer.state.log_history if "loss" in h])
        after_refresh = models[cls][1][2]
        assert callback.refresh_steps == [2] and rewards_are_rounding_noise(after_refresh)  # reference = policy again
    assert_logs_match(models[DPOTrainer][1], models[PackedDPOTrainer][1])
    assert_updates_match(m0, models[DPOTrainer][0], models[PackedDPOTrainer][0])

    trained = models[PackedDPOTrainer][0]
    drop_trl_forward_patch(trained)
    fresh = type(m0)(m0.config)
    assert [type(m) for m in trained.modules()] == [type(m) for m in fresh.modules()]
    assert not any("forward" in vars(m) for m in trained.modules())  # no instance-level forward left (onednn swaps
    assert trained.config._attn_implementation == m0.config._attn_implementation  # would be), attention restored
