"""Scoring one part of tokenized pairs: reference log-probs, optional policy / reward-model scores, signals.

:class:`PartScorer` is what both executors run (locally, or once per Ray actor), so the two share every line that
decides a number.
"""

from __future__ import annotations

import inspect

from scorers.backend import LogProbBackend
from scorers.columns import (
    CHOSEN_LOGPS,
    CHOSEN_TOKENS,
    DIFFICULTY,
    POLICY_CHOSEN_LOGPS,
    POLICY_REJECTED_LOGPS,
    PROMPT_LOGPS,
    PROMPT_TOKENS,
    REJECTED_LOGPS,
    REJECTED_TOKENS,
    REWARD_CHOSEN,
    REWARD_REJECTED,
)
from scorers.errors import ConfigError
from scorers.signals import compute_signal, needs_prompt_logps, parse_signals, prompt_rows, to_difficulty

from .config import ScoringConfig


def make_backend(config: ScoringConfig) -> LogProbBackend:
    """The reference backend ``config.backend`` names, with ``config.vllm_options`` passed on to a vLLM backend.

    Raises:
        ConfigError: a vLLM option the backend does not take.
    """
    from scorers.transformers_backend import TransformersBackend

    common = dict(max_length=config.max_length, truncation_mode=config.truncation_mode, progress=config.progress)
    if config.backend == "transformers":
        return TransformersBackend(config.model, dtype=config.dtype, batch_tokens=config.batch_tokens,
                                   packed=config.packed, device=config.device, linear_kernel=config.linear_kernel,
                                   packed_attention=config.packed_attention, **common)
    if config.backend == "vllm":
        from scorers.vllm_backend import VLLMBackend

        cls, args = VLLMBackend, dict(model=config.model, tokenizer=config.tokenizer, dtype=config.dtype)
    else:
        from scorers.vllm_server_backend import VLLMServerBackend

        cls, args = VLLMServerBackend, dict(url=config.server_url, model=config.model,
                                            served_model_name=config.server_model,
                                            tokenizer=config.tokenizer or config.model)
    options = dict(config.vllm_options or {})
    allowed = set(inspect.signature(cls).parameters) - set(args) - set(common)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown {config.backend} option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(allowed))}")
    return cls(**args, **common, **options)


class PartScorer:
    """Scores parts: reference log-probs, optional policy / reward-model scores, every signal, ``difficulty``."""

    def __init__(self, config: ScoringConfig):
        from scorers.transformers_backend import TransformersBackend

        self.config, self.signals = config, parse_signals(config.signals)
        self.backend = make_backend(config)
        self.policy = None
        if config.policy_model:
            self.policy = TransformersBackend(
                config.policy_model, dtype=config.dtype, max_length=config.max_length,
                truncation_mode=config.truncation_mode, batch_tokens=config.batch_tokens, packed=config.packed,
                device=config.device, progress=config.progress, linear_kernel=config.linear_kernel,
                packed_attention=config.packed_attention)
        self.reward = None
        if config.reward_model:
            from scorers.reward_model import RewardModelScorer

            self.reward = RewardModelScorer(config.reward_model, dtype=config.dtype, device=config.device,
                                            batch_tokens=config.batch_tokens, progress=config.progress)

    def close(self):
        for b in (self.backend, self.policy, self.reward):
            if b is not None:
                b.close()

    def score_part(self, part):
        """The part (a ``datasets.Dataset`` of tokenized rows) as a ``pyarrow.Table`` with the score columns."""
        import pyarrow as pa

        table = part.with_format("arrow")[:]
        rows = part.to_list()
        scores = self.backend.score(rows)
        cols = {c: table.column(c).to_pylist() for c in table.column_names}
        new: dict[str, tuple[list, pa.DataType]] = {
            CHOSEN_LOGPS: (scores["chosen_logps"], pa.float64()),
            REJECTED_LOGPS: (scores["rejected_logps"], pa.float64()),
            CHOSEN_TOKENS: (scores["chosen_tokens"], pa.int64()),
            REJECTED_TOKENS: (scores["rejected_tokens"], pa.int64()),
        }
        if needs_prompt_logps(self.signals):
            prompts = self.backend.score(prompt_rows(rows))
            new[PROMPT_LOGPS] = (prompts["chosen_logps"], pa.float64())
            new[PROMPT_TOKENS] = (prompts["chosen_tokens"], pa.int64())
        if self.policy is not None:
            p = self.policy.score(rows)
            new[POLICY_CHOSEN_LOGPS] = (p["chosen_logps"], pa.float64())
            new[POLICY_REJECTED_LOGPS] = (p["rejected_logps"], pa.float64())
        if self.reward is not None:
            rc, rr = self.reward.score(rows)
            new[REWARD_CHOSEN] = (rc, pa.float64())
            new[REWARD_REJECTED] = (rr, pa.float64())
        cols.update({k: v for k, (v, _) in new.items()})
        c = self.config
        difficulty = None
        for s in self.signals:
            values = compute_signal(s, cols, beta=c.beta, seed=c.seed, rating_columns=tuple(c.rating_columns))
            new[s.column] = (values, pa.float64())
            if s.name == c.difficulty_signal:
                difficulty = to_difficulty(s, values)
        new[DIFFICULTY] = (difficulty, pa.float64())
        for name, (values, typ) in new.items():
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(pa.field(name, typ), pa.array(values, type=typ))
        return table.combine_chunks()
