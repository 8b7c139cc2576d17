"""Scoring one part of tokenized pairs: reference log-probs, optional policy / reward-model scores, signals.

:class:`PartScorer` is what both executors run (locally, or once per Ray actor), so the two share every line that
decides a number.
"""

from __future__ import annotations

import dataclasses

from scorers.signals import compute_signal, parse_signals, passes_to_run, to_difficulty
from sdpo_core.columns import CHOSEN_LOGPS, CHOSEN_TOKENS, DIFFICULTY, REJECTED_LOGPS, REJECTED_TOKENS

from .backends import make_backend
from .config import ScoringConfig


def _policy_model(config: ScoringConfig):
    """The policy model, scored as the reference is on the transformers backend, with the same settings."""
    return make_backend(dataclasses.replace(config, model=config.policy_model, backend="transformers"))


class _RewardScores:
    """A reward model's scores keyed by side, as the reward pass reads them."""

    def __init__(self, config: ScoringConfig):
        from scorers.reward_model import RewardModelScorer

        self.model = RewardModelScorer(config.reward_model, dtype=config.dtype, device=config.device,
                                       batch_tokens=config.batch_tokens, progress=config.progress)

    def score(self, rows) -> dict:
        chosen, rejected = self.model.score(rows)
        return {"chosen": chosen, "rejected": rejected}

    def close(self):
        self.model.close()


# How the model a pass's option names is loaded (scorers.signals.ModelPass.model_option); None: the reference backend.
MODEL_LOADERS = {"policy_model": _policy_model, "reward_model": _RewardScores}


class PartScorer:
    """Scores parts: reference log-probs, optional policy / reward-model scores, every signal, ``difficulty``."""

    def __init__(self, config: ScoringConfig):
        self.config, self.signals = config, parse_signals(config.signals)
        self.backend = make_backend(config)
        # each model pass to run, with what runs it: the reference backend, or the model its option names
        self.passes = [(p, MODEL_LOADERS[p.model_option](config) if p.model_option else self.backend)
                       for p in passes_to_run(self.signals, config)]

    def close(self):
        self.backend.close()
        for model_pass, model in self.passes:
            if model_pass.model_option:
                model.close()

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
        for model_pass, model in self.passes:
            result = model.score(model_pass.rows(rows))
            for column, key, type_name in model_pass.writes:
                new[column] = (result[key], pa.type_for_alias(type_name))
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
