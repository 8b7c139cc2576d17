"""Reference log-probs with vLLM's offline engine (``vllm.LLM``), exactly as DPOTrainer sums them.

Each pair becomes two requests, ``prompt + chosen`` and ``prompt + rejected``, cut exactly as TRL's
``DataCollatorForPreference`` cuts them (:func:`scorers.backend.kept_view`, the same view the transformers backend
scores). We send our own token ids (``TokensPrompt``), so vLLM never re-tokenizes, and ask for
``SamplingParams(max_tokens=1, prompt_logprobs=0)``: vLLM then returns, at every prompt position, the log-prob of the
token actually there (plus its top-0, i.e. nothing else). We read the *actual* token's entry at each completion
position (never a top-1) and sum them in float64. Requests go in chunks of at most ``chunk_tokens`` tokens, so the
per-position results held in Python stay bounded; one outer progress bar counts pairs.

vLLM is optional and imported lazily; without it the backend raises a one-line ``MissingDependencyError`` with the
install command (:data:`scorers.vllm_common.INSTALL_HINT`).

Assumptions:
    ``prompt_logprobs`` bypass vLLM's prefix cache, so each side's prompt is computed again (no sharing as in the
    transformers backend's packed rows). A sequence needs ``max_model_len >= len + 1`` (one token is generated);
    the default ``max_model_len`` is ``max_length + 1``.
"""

from __future__ import annotations

import gc
import logging
import os

from .backend import LogProbBackend
from sdpo_core.columns import DTYPES, TRUNCATION_MODES
from sdpo_core.config import check_choice
from sdpo_core.errors import ConfigError, UserError
from .vllm_common import actual_logprob, collect, import_vllm, scored_positions, side_sequences, token_chunks

logger = logging.getLogger(__name__)

_MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class VLLMBackend(LogProbBackend):
    """DPOTrainer reference log-probs computed by an offline vLLM engine.

    Args:
        model: local path, hub id or ``"bundled"``.
        tokenizer: tokenizer path for the engine (default: the model's). Only used for vLLM's own set-up: the
            token ids come from our tokenization.
        dtype: ``float32`` (closest to TRL), ``bfloat16``, ``float16``.
        max_length, truncation_mode: ``DPOConfig``'s; the collator's truncation is applied.
        max_model_len: engine context length; default ``max_length + 1`` (one generated token).
        tensor_parallel_size, data_parallel_size, gpu_memory_utilization, kv_cache_memory_bytes, enforce_eager,
            seed: passed to ``vllm.LLM``.
        engine_kwargs: any other ``vllm.LLM`` keyword arguments.
        chunk_tokens: tokens submitted per ``generate`` call (bounds the per-position results held at once).
        progress: one progress bar over pairs.

    Raises:
        MissingDependencyError: vLLM is not installed (one line, with the install command).
        ModelLoadError: the model path does not exist.
        ConfigError: a bad option.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        max_length: int | None = 1024,
        truncation_mode: str = "keep_start",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        engine_kwargs: dict | None = None,
        chunk_tokens: int = 1 << 18,
        progress: bool = True,
    ):
        from .models import check_model_path, resolve_model_path

        check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
        check_choice("dtype", dtype, DTYPES)
        if chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if max_model_len is None and max_length is not None:
            max_model_len = max_length + 1
        if max_model_len is not None and max_length is not None and max_model_len < max_length + 1:
            raise ConfigError(f"max_model_len must be >= max_length + 1 = {max_length + 1}, got {max_model_len}")
        self.model_name, self.dtype = model, dtype
        self.max_length, self.truncation_mode = max_length, truncation_mode
        self.chunk_tokens, self.progress = chunk_tokens, progress
        path = resolve_model_path(model)
        check_model_path(path)
        self._environ = dict(os.environ)  # vLLM sets variables (LD_PRELOAD, ...) on import / start: undone on close
        vllm = import_vllm()
        kwargs = dict(
            model=path,
            tokenizer=resolve_model_path(tokenizer) if tokenizer else None,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=enforce_eager,
            seed=seed,
            enable_prefix_caching=False,  # prompt_logprobs bypass the prefix cache anyway
        )
        kwargs.update(engine_kwargs or {})
        self.max_model_len = max_model_len
        saved = os.environ.get(_MP_ENV)
        if tensor_parallel_size * data_parallel_size == 1 and saved is None:
            # One worker: run the engine in this process (starts in seconds, nothing left behind on close). Set only
            # while the engine is built, so processes started later (e.g. a vLLM server) do not inherit it.
            os.environ[_MP_ENV] = "0"
        try:
            self.llm = vllm.LLM(**{k: v for k, v in kwargs.items() if v is not None})
        finally:
            if saved is None:
                os.environ.pop(_MP_ENV, None)
        if self.max_model_len is None:
            self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
        self.tokens_computed = 0

    def close(self) -> None:
        """Stop the engine and free its memory (weights, KV cache, distributed state) for whatever runs next."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # noqa: BLE001 - shutting down; report and go on freeing
            logger.warning("vLLM engine shutdown: %s", e)
        del llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception as e:  # noqa: BLE001
            logger.warning("vLLM cleanup: %s", e)
        gc.collect()
        _restore_environ(self._environ)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def score(self, rows, return_per_token: bool = False) -> dict[str, list]:
        from tqdm.auto import tqdm
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise RuntimeError("this VLLMBackend is closed")
        seqs = side_sequences(rows, self.max_length, self.truncation_mode)
        todo = [k for k, (ids, n_prompt) in enumerate(seqs) if len(scored_positions(ids, n_prompt))]
        for k in todo:
            if len(seqs[k][0]) + 1 > self.max_model_len:
                raise UserError(
                    f"row {k // 2} has {len(seqs[k][0])} tokens but the engine's max_model_len is {self.max_model_len}"
                    "; set max_length or a larger max_model_len"
                )
        per_seq: list[list[float] | None] = [None] * len(seqs)
        bar = tqdm(total=len(rows), unit="pair", desc="Scoring pairs (vLLM)", disable=not self.progress or not rows)
        done_rows = 0
        for chunk in token_chunks([len(seqs[k][0]) for k in todo], self.chunk_tokens):
            ks = [todo[i] for i in chunk]
            prompts = [TokensPrompt(prompt_token_ids=seqs[k][0]) for k in ks]
            outputs = self.llm.generate(prompts, self._params, use_tqdm=False)
            for k, out in zip(ks, outputs):
                ids, n_prompt = seqs[k]
                per_seq[k] = _read_flat(out.prompt_logprobs, ids, n_prompt)
                self.tokens_computed += len(ids)
            # rows are complete once both of their sides are; advance the bar by whole rows
            finished = (ks[-1] + 1) // 2
            bar.update(finished - done_rows)
            done_rows = finished
        bar.update(len(rows) - done_rows)
        bar.close()
        return collect(len(rows), seqs, per_seq, return_per_token)


def _restore_environ(saved: dict) -> None:
    """Put back the process environment as it was (so later subprocesses do not inherit vLLM's settings)."""
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _read_flat(prompt_logprobs, ids: list[int], n_prompt: int) -> list[float]:
    """Per-token log-probs of ``ids`` at the completion positions from vLLM's prompt log-probs.

    Takes either ``FlatLogprobs`` (``flat_logprobs=True``) or a list of ``{token_id: Logprob}`` dicts.
    """
    if prompt_logprobs is None or len(prompt_logprobs) != len(ids):
        raise UserError(f"vLLM returned {0 if prompt_logprobs is None else len(prompt_logprobs)} prompt log-probs "
                         f"for {len(ids)} tokens")
    out = []
    flat = hasattr(prompt_logprobs, "start_indices")
    for t in scored_positions(ids, n_prompt):
        if flat:
            a, b = prompt_logprobs.start_indices[t], prompt_logprobs.end_indices[t]
            entries = dict(zip(prompt_logprobs.token_ids[a:b], prompt_logprobs.logprobs[a:b]))
        else:
            entries = {tok: lp.logprob for tok, lp in (prompt_logprobs[t] or {}).items()}
        out.append(actual_logprob(entries, ids[t], t))
    return out
