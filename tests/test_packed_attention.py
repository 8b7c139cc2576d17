"""The packed layout's one-call attention (scorers.flex_attention) equals the per-pair SDPA loop
(scorers.attention), the scorer's log-probs and TRL's; and a 16-pair forward runs one attention call per layer with
no host sync (counted by torch.profiler and by counting the tensor read-backs), where the loop runs 32 and syncs.

The compiled FlexAttention kernel (the default off CPU) is checked here once, against the loop, on a small line;
eager flex (``flex_eager``) has the same mask and semantics and serves the model-level checks. With gradients on
CPU (FlexAttention has no CPU backward) the same mask goes dense into one SDPA call.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_packed_trainer import conversational, m0  # noqa: F401  (fixtures)
from test_trainer import partition2  # noqa: F401  (fixture)
from test_scoring_backend import pairs, tiny_model  # noqa: F401  (fixtures)

from scorers.attention import layout_tensor, prefix_attention, prefix_shared_attention
from scorers.flex_attention import bucket_length, chosen_kernel, flex_prefix_attention
from sdpo_core.errors import ConfigError


class _Layer:
    layer_idx = 0


def _random_layouts(rng: random.Random, lines: int, pairs: int):
    return [[(rng.choice([0, 1, 5, 9]), rng.randint(0, 7), rng.randint(0, 7)) for _ in range(rng.randint(1, pairs))]
            for _ in range(lines)]


def _qkv(layouts, heads=4, kv_heads=2, dim=8, extra=3, grad=False):
    n = max(sum(map(sum, line)) for line in layouts) + extra  # positions past the layout: padding
    g = torch.Generator().manual_seed(1)
    shapes = ((len(layouts), heads, n, dim), (len(layouts), kv_heads, n, dim), (len(layouts), kv_heads, n, dim))
    return [torch.randn(*s, generator=g).requires_grad_(grad) for s in shapes]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shared", [False, True])
def test_one_call_equals_the_loop_with_and_without_gradients(seed, shared):
    rng = random.Random(seed)
    layouts = _random_layouts(rng, lines=rng.randint(1, 3), pairs=5)
    lt = layout_tensor(layouts, "cpu")
    shared_kv = [(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))] if shared else None
    q, k, v = _qkv(layouts)
    with torch.no_grad():
        ref, _ = prefix_shared_attention(_Layer(), q, k, v, lt, scaling=0.3, shared_kv=shared_kv)
        out, _ = flex_prefix_attention(_Layer(), q, k, v, lt, scaling=0.3, shared_kv=shared_kv, compiled=False)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # with gradients: the dense-mask SDPA call; values and gradients of q, k, v equal the loop's
    q, k, v = _qkv(layouts, grad=True)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    ref, _ = prefix_shared_attention(_Layer(), q, k, v, lt, scaling=0.3, shared_kv=shared_kv)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    out, _ = flex_prefix_attention(_Layer(), q, k, v, lt, scaling=0.3, shared_kv=shared_kv)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-5)


def test_compiled_flex_on_a_padded_bucket_equals_the_loop():
    """The compiled kernel (inductor's CPU template here), its line zero-padded to the 256 bucket."""
    layouts = [[(5, 7, 3), (0, 4, 6), (10, 0, 2), (3, 3, 0)]]
    q, k, v = _qkv(layouts)
    lt = layout_tensor(layouts, "cpu")
    with torch.no_grad():
        ref, _ = prefix_shared_attention(_Layer(), q, k, v, lt)
        out, _ = flex_prefix_attention(_Layer(), q, k, v, lt, compiled=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_buckets_and_the_kernel_choice():
    assert [bucket_length(n) for n in (1, 256, 257, 1000, 1024, 1025, 16384)] == [256, 256, 512, 1024, 1024, 2048,
                                                                                   16384]
    assert len({bucket_length(n) for n in range(1, 16385)}) == 7  # compiled shapes up to 16k tokens a line
    assert chosen_kernel("cpu") == "loop" and chosen_kernel("cuda") == "flex"
    assert chosen_kernel("cpu", "flex_eager") == "flex_eager" and chosen_kernel("cuda", "loop") == "loop"
    with pytest.raises(ConfigError, match="fast"):
        chosen_kernel("cpu", "fast")


def test_the_kernel_option_is_declared_once_and_checked_where_it_is_declared():
    """``packed_attention`` is one declaration (its help and choices) in every config that runs the packed layout;
    a value outside its choices is refused by each config, from Python and from the command line."""
    import dataclasses

    from partitioner.scoring.config import ScoringConfig
    from sdpo_cli.main import main
    from sdpo_cli.truthfulqa import TruthfulQACommand
    from trainer_plugin.config import StepwiseConfig

    declared = [next(f for f in dataclasses.fields(cls) if f.name == "packed_attention")
                for cls in (ScoringConfig, StepwiseConfig, TruthfulQACommand)]
    assert all(f.metadata == declared[0].metadata and f.default == "auto" for f in declared)
    for cls in (ScoringConfig, StepwiseConfig, TruthfulQACommand):
        assert cls(packed_attention="flex_eager").packed_attention == "flex_eager"
        with pytest.raises(ConfigError, match="packed_attention must be one of auto, loop, flex, flex_eager"):
            cls(packed_attention="fast")
    assert main(["train", "PART", "--packed-attention", "fast"]) == 2


# --------------------------------------------------------------------------------------------- at the model level


@pytest.mark.usefixtures("each_auto_linear_kernel")  # oneDNN and MKL: what auto picks on any host
def test_scorer_log_probs_equal_the_loop_and_trl(tiny_model_dir, tiny_model, smollm2_tokenizer, pairs):
    """16 real pairs (several truncated, keep_end: some laid as two segments), 3 lines: per-token log-probs of the
    one-call path equal the loop's and TRL's collator + fused head's (the scorer tests' tolerance, 1e-3)."""
    from test_scoring_backend import MAX_LENGTH, _tokenized, _trl_per_token

    from scorers.transformers_backend import TransformersBackend

    rows = _tokenized(pairs, smollm2_tokenizer, "keep_end")[0].to_list()
    scores = {}
    for kernel in ("loop", "flex_eager"):
        scores[kernel] = TransformersBackend(tiny_model, max_length=MAX_LENGTH, truncation_mode="keep_end",
                                             batch_tokens=1500, progress=False, packed_attention=kernel
                                             ).score(rows, return_per_token=True)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(scores["flex_eager"][f"{side}_logps"], scores["loop"][f"{side}_logps"], atol=1e-4)
    for i, (c, r) in enumerate(_trl_per_token(str(tiny_model_dir), rows, "keep_end")):
        for side, trl in (("chosen", c), ("rejected", r)):
            ours = scores["flex_eager"][f"{side}_token_logps"][i]
            assert len(ours) == len(trl) and np.abs(np.array(ours) - np.array(trl)).max(initial=0) < 1e-3


def _forward_16_pairs(model, tokenizer, pairs, grad: bool, kernel: str):
    """One packed forward of 16 real pairs in one line (the scorer's packing), profiled; returns the attention calls
    per layer and the host syncs counted inside it. An unprofiled forward first: torch runs eager flex through
    dynamo, whose one-time tracing of a new shape reads scalars back (not per forward); the profiled forward gets a
    new layout tensor, so its block mask is built inside it and counted."""
    from torch.profiler import ProfilerActivity, profile

    from scorers.packing import pack_line, packed_row
    from test_scoring_backend import MAX_LENGTH, _tokenized

    rows = (_tokenized(pairs, tokenizer)[0].to_list() * 2)[:16]  # 12 of the 16 real pairs fit: some repeat
    assert len(rows) == 16
    line, layout = pack_line([packed_row(i, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], MAX_LENGTH,
                                         "keep_start") for i, r in enumerate(rows)])
    ids, pos = torch.tensor([line.ids]), torch.tensor([line.pos])
    with torch.set_grad_enabled(grad), prefix_attention(model, kernel=kernel), \
            profile(activities=[ProfilerActivity.CPU]):
        model.base_model(input_ids=ids, position_ids=pos, attention_mask=layout_tensor([layout], "cpu"),
                         use_cache=False)
    mask = layout_tensor([layout], "cpu")
    syncs = []
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "cpu")}

    def counting(name):
        def read_back(self, *a, **kw):
            syncs.append(name)
            return originals[name](self, *a, **kw)
        return read_back

    import torch.nn.attention.flex_attention as flex_module

    flex_calls, flex = [], flex_module.flex_attention
    flex_module.flex_attention = lambda *a, **kw: flex_calls.append(1) or flex(*a, **kw)
    with torch.set_grad_enabled(grad), prefix_attention(model, kernel=kernel), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        try:
            out = model.base_model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
        finally:
            for name, f in originals.items():
                setattr(torch.Tensor, name, f)
            flex_module.flex_attention = flex
    assert out.last_hidden_state.shape[1] == len(line.ids)
    counts = {e.key: e.count for e in prof.key_averages()}
    attention = counts.get("aten::scaled_dot_product_attention", 0) + len(flex_calls)
    syncs += ["aten::_local_scalar_dense"] * counts.get("aten::_local_scalar_dense", 0)
    return attention / model.config.num_hidden_layers, syncs


@pytest.mark.parametrize("grad", [False, True])
def test_one_attention_call_per_layer_and_no_host_sync(tiny_model, smollm2_tokenizer, pairs, grad):
    # Earlier tests call flex with other scales; dynamo (which runs even eager flex) then traces the scale as a
    # symbol read back by .item() in every call. One model has one scale: start from a clean compiler state.
    torch.compiler.reset()
    model = tiny_model.train(grad)
    try:
        loop_calls, loop_syncs = _forward_16_pairs(model, smollm2_tokenizer, pairs, grad, "loop")
        calls, syncs = _forward_16_pairs(model, smollm2_tokenizer, pairs, grad, "flex_eager")
    finally:
        model.eval()
    assert loop_calls == 32 and len(loop_syncs) >= model.config.num_hidden_layers  # what the counts detect
    assert calls == 1, calls
    assert syncs == [], syncs


# ------------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_with_one_call_attention_gives_trls_losses_and_gradients(m0, conversational, tmp_path,
                                                                               checkpointing):
    """One step of PackedDPOTrainer on 21 real pairs with the one-call attention (the policy with gradients: the
    dense-mask SDPA call, CPU's; the reference: flex; the mask built once per line and found again by every layer
    and by the checkpointed re-run): TRL's logged losses and metrics and TRL's gradients within
    tests/test_packed_trainer.py's tolerances."""
    from test_packed_trainer import assert_grads_match, assert_logs_match, dpo_args, train
    from trl import DPOTrainer

    from trainer_plugin.packed import PackedDPOTrainer

    args = dict(max_steps=1, gradient_checkpointing=checkpointing)
    _, trl_logs, trl_grads = train(DPOTrainer, m0, conversational, dpo_args(tmp_path, **args))
    # policy with gradients: dense-mask SDPA; reference: eager flex
    _, logs, grads = train(PackedDPOTrainer, m0, conversational, dpo_args(tmp_path, **args),
                           packed_attention="flex_eager")
    assert_logs_match(trl_logs, logs)
    assert_grads_match(trl_grads, grads)


def test_the_drivers_kernel_option_reaches_training_and_reference_scoring(partition2, tiny_model_dir, tmp_path):
    """``StepwiseConfig.packed_attention`` is what the step's trainer and the precomputed reference's scorer run:
    'flex_eager' calls FlexAttention (the scoring of M1's reference log-probs, without gradients), 'loop' never
    does, and both give step 2 the same reference log-probs (within the scorer tests' tolerance)."""
    import torch.nn.attention.flex_attention as flex_module

    from partitioner.io import read_arrow_stream
    from test_trainer import dpo_args, when_training_starts
    from trainer_plugin.config import StepwiseConfig
    from trainer_plugin.driver import train_stepwise

    logps, flex = {}, flex_module.flex_attention
    for kernel in ("loop", "flex_eager"):
        calls, kernels = [], []
        flex_module.flex_attention = lambda *a, **kw: calls.append(1) or flex(*a, **kw)
        try:
            train_stepwise(partition2, str(tiny_model_dir), args=dpo_args(tmp_path / kernel),
                           config=StepwiseConfig(ref_mode="precomputed", packed_attention=kernel),
                           callbacks=[when_training_starts(lambda t, tr: kernels.append(tr.packed_attention))])
        finally:
            flex_module.flex_attention = flex
        assert kernels == [kernel, kernel] and bool(calls) == (kernel == "flex_eager")
        logps[kernel] = read_arrow_stream(tmp_path / kernel / "step_2" / "reference_logps.arrow").to_pydict()
    for side in ("ref_chosen_logps", "ref_rejected_logps"):
        np.testing.assert_allclose(logps["flex_eager"][side], logps["loop"][side], atol=1e-4)
