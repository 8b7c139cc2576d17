"""The transformers backend equals TRL's own reference precompute, and the packed path equals the plain one."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_pairs

from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences
from scorers.backend import kept_view, n_scored_tokens
from scorers.packing import length_batches, token_batches
from scorers.transformers_backend import TransformersBackend

MAX_LENGTH = 320  # small enough that several real rows get truncated


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from scorers.models import load_causal_lm

    return load_causal_lm(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def pairs(shared_data):
    return real_pairs(shared_data, n_orca=8, n_llamafactory=8)


def _tokenized(pairs, tok, mode="keep_start"):
    kept, rejects = tokenize_preferences(pairs, tok, TokenizeConfig(max_length=MAX_LENGTH, truncation_mode=mode))
    return kept, rejects


def _trl_precompute(model_dir, tok, dataset, tmp_path, mode):
    """TRL's own DPOTrainer precompute of ref_chosen_logps/ref_rejected_logps (fp32, CPU)."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], max_length=MAX_LENGTH,
        truncation_mode=mode, precompute_ref_log_probs=True, per_device_train_batch_size=4,
        gradient_checkpointing=False, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    return trainer.train_dataset


def _trl_per_token(model_dir, rows, mode):
    """TRL's per-token log-probs: its collator and fused LM head, one pair at a time."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    add_fused_lm_head(model)
    collate = DataCollatorForPreference(pad_token_id=0, max_length=MAX_LENGTH, truncation_mode=mode)
    out = []
    with torch.no_grad():
        for r in rows:
            batch = collate([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            lp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True).log_probs
            mask = batch["completion_mask"][:, 1:].bool()
            out.append((lp[0][mask[0]].tolist(), lp[1][mask[1]].tolist()))
    return out


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
@pytest.mark.usefixtures("each_auto_linear_kernel")  # oneDNN and MKL: what auto picks on any host
def test_matches_trl_precompute(tiny_model_dir, tiny_model, smollm2_tokenizer, pairs, tmp_path, mode):
    kept, rejects = _tokenized(pairs, smollm2_tokenizer, mode)
    n_trunc = sum(a or b for a, b in zip(kept["chosen_truncated"], kept["rejected_truncated"]))
    assert n_trunc >= 2, "the subset must exercise truncation"
    trl_ds = _trl_precompute(str(tiny_model_dir), smollm2_tokenizer, pairs, tmp_path, mode)
    assert len(trl_ds) == len(kept) and len(rejects) == len(pairs) - len(kept)
    assert trl_ds["prompt_ids"] == kept["prompt_ids"] and trl_ds["chosen_ids"] == kept["chosen_ids"]
    rows = kept.to_list()
    ours = TransformersBackend(tiny_model, max_length=MAX_LENGTH, truncation_mode=mode, batch_tokens=2048,
                               progress=False).score(rows, return_per_token=True)
    for side in ("chosen", "rejected"):
        diff = np.abs(np.array(ours[f"{side}_logps"]) - np.array(trl_ds[f"ref_{side}_logps"]))
        assert diff.max() < 1e-2, (side, diff.max())
    per_token = _trl_per_token(str(tiny_model_dir), rows, mode)
    for i, (c, r) in enumerate(per_token):
        assert len(c) == ours["chosen_tokens"][i] and len(r) == ours["rejected_tokens"][i]
        assert np.abs(np.array(c) - np.array(ours["chosen_token_logps"][i])).max(initial=0) < 1e-3
        assert np.abs(np.array(r) - np.array(ours["rejected_token_logps"][i])).max(initial=0) < 1e-3


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_packed_equals_plain(tiny_model, smollm2_tokenizer, pairs, mode):
    kept, _ = _tokenized(pairs, smollm2_tokenizer, mode)
    rows = kept.to_list()
    kw = dict(max_length=MAX_LENGTH, truncation_mode=mode, progress=False)
    packed = TransformersBackend(tiny_model, batch_tokens=1500, **kw).score(rows)
    plain = TransformersBackend(tiny_model, packed=False, batch_tokens=700, **kw).score(rows)
    assert packed["chosen_tokens"] == plain["chosen_tokens"] and packed["rejected_tokens"] == plain["rejected_tokens"]
    for k in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(packed[k], plain[k], atol=1e-3, rtol=0)
    expected = [n_scored_tokens(len(r["prompt_ids"]), len(r["chosen_ids"]), MAX_LENGTH, mode) for r in rows]
    assert packed["chosen_tokens"] == expected


def test_kept_view_matches_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    for mode in ("keep_start", "keep_end"):
        collate = DataCollatorForPreference(pad_token_id=0, max_length=6, truncation_mode=mode)
        for n_p, n_c in [(2, 3), (4, 4), (1, 9), (6, 2), (0, 8), (7, 1)]:
            ex = {"prompt_ids": list(range(1, n_p + 1)), "chosen_ids": list(range(100, 100 + n_c)),
                  "rejected_ids": [100]}
            batch = collate([ex])
            assert int(batch["completion_mask"][0, 1:].sum()) == n_scored_tokens(n_p, n_c, 6, mode), (mode, n_p, n_c)
            if mode == "keep_start" and n_p >= 6:
                continue  # prompt_too_long: rejected before scoring (kept_view does not cut the prompt)
            view = kept_view(n_p, n_c, 6, mode)
            kept = ex["prompt_ids"][view.prompt_start:] + ex["chosen_ids"][view.completion_start:view.completion_end]
            assert kept == batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()


def test_length_batches_budget_and_order():
    lengths = [5, 100, 30, 30, 7, 64]
    batches = length_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128
    assert batches == length_batches(lengths, 128)


def test_token_batches_budget():
    lengths = [5, 100, 30, 30, 7, 64, 300]
    batches = token_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6]  # longer than the budget: alone
    for b in batches[1:]:
        assert sum(lengths[i] for i in b) <= 128


def test_linear_kernels_agree_and_leave_the_model_as_it_was(tiny_model, smollm2_tokenizer, pairs):
    import torch

    from scorers.onednn import onednn_faster_for, onednn_linear_available

    kept, _ = _tokenized(pairs, smollm2_tokenizer)
    rows = kept.to_list()
    kw = dict(max_length=MAX_LENGTH, batch_tokens=2048, progress=False)
    default = TransformersBackend(tiny_model, linear_kernel="torch", **kw)
    assert default.linear_kernel == "torch"
    plain = default.score(rows)
    auto = TransformersBackend(tiny_model, **kw)
    assert auto.linear_kernel == ("onednn" if onednn_linear_available() and onednn_faster_for(tiny_model) else "torch")
    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    fast = TransformersBackend(tiny_model, linear_kernel="onednn", **kw).score(rows)
    for k in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(fast[k], plain[k], atol=1e-3, rtol=0)
    linears = [m for m in tiny_model.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "gate_proj")]
    assert linears and not any("forward" in vars(m) for m in linears), "the swap must not outlive the forward"
    with pytest.raises(ValueError, match="linear_kernel"):
        TransformersBackend(tiny_model, linear_kernel="fast", **kw)
    bf16 = TransformersBackend(tiny_model_bf16 := _bf16_copy(tiny_model), **kw)
    assert bf16.linear_kernel == "torch"
    with pytest.raises(ValueError, match="float32 model on CPU"):
        TransformersBackend(tiny_model_bf16, linear_kernel="onednn", **kw)


@pytest.mark.parametrize("onednn_faster", [True, False])
def test_auto_linear_kernel_follows_the_measurement(tiny_model, monkeypatch, onednn_faster):
    """'auto' takes oneDNN where the host's measurement finds it faster (AMD Zen 4/5, MKL without AVX-512), torch's
    own F.linear where MKL wins (AVX2-only hosts): both outcomes forced; 'onednn'/'torch' ignore the measurement."""
    import scorers.transformers_backend as tb
    from scorers.onednn import onednn_is_faster, onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    assert isinstance(onednn_is_faster(64, 128, tokens=64, seconds=0.01), bool)  # the real measurement runs
    measured = []
    monkeypatch.setattr(tb, "onednn_faster_for", lambda model: measured.append(model) or onednn_faster)
    kw = dict(max_length=MAX_LENGTH, progress=False)
    assert TransformersBackend(tiny_model, **kw).linear_kernel == ("onednn" if onednn_faster else "torch")
    assert measured == [tiny_model]
    assert TransformersBackend(tiny_model, linear_kernel="onednn", **kw).linear_kernel == "onednn"
    assert TransformersBackend(tiny_model, linear_kernel="torch", **kw).linear_kernel == "torch"
    assert len(measured) == 1


def _bf16_copy(model):
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)


def test_gated_mlp_fusion_only_where_it_computes_the_same(tiny_model, smollm2_tokenizer, pairs):
    """The SiLU MLPs of Llama and of a Qwen2 with biased projections are fused and score as torch does; a
    GELU-gated MLP with the same attribute names is left to its own forward."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scorers.onednn import (
        is_gated_silu_mlp,
        decoder_layer_forward,
        gated_mlp_forward,
        checked_onednn_swaps,
        onednn_linear_available,
    )

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear")
    swaps = checked_onednn_swaps(tiny_model)
    n_layers = tiny_model.config.num_hidden_layers
    assert sum(f is gated_mlp_forward for _, f in swaps) == n_layers
    assert sum(f is decoder_layer_forward for _, f in swaps) == n_layers

    # a decoder layer that computes something else with the same parts: the end-to-end check drops layer fusion
    import copy

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class ScaledLayer(LlamaDecoderLayer):
        def forward(self, hidden_states, **kwargs):
            return 0.5 * super().forward(hidden_states, **kwargs)

    odd = copy.deepcopy(tiny_model)
    odd.model.layers[0].__class__ = ScaledLayer
    swaps = checked_onednn_swaps(odd)
    assert swaps and not any(f is decoder_layer_forward for _, f in swaps)

    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
            self.down_proj = torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))

    assert not is_gated_silu_mlp(GeluMLP())
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, use_sliding_window=False,
        tie_word_embeddings=True)).eval()
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    kept, _ = _tokenized(pairs, smollm2_tokenizer)
    rows = kept.to_list()[:6]
    kw = dict(max_length=MAX_LENGTH, batch_tokens=2048, progress=False)
    fast_backend = TransformersBackend(qwen, linear_kernel="onednn", **kw)
    assert sum(f is decoder_layer_forward for _, f in fast_backend._fast_linears) == 2
    fast = fast_backend.score(rows, return_per_token=True)
    plain = TransformersBackend(qwen, linear_kernel="torch", **kw).score(rows, return_per_token=True)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(fast[f"{side}_logps"], plain[f"{side}_logps"], atol=1e-3, rtol=0)
        got = np.concatenate([np.array(x) for x in fast[f"{side}_token_logps"]])
        want = np.concatenate([np.array(x) for x in plain[f"{side}_token_logps"]])
        assert np.abs(got - want).max() < 1e-4
