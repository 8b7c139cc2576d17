"""Reference-model scoring and difficulty signals for stepwise DPO.

* ``scorers.backend``: the ``LogProbBackend`` contract (tokenized pairs -> DPOTrainer's ref log-prob sums) and the
  collator's truncation (``kept_view``).
* ``scorers.transformers_backend.TransformersBackend``: exact, prefix-shared, padding-free scoring on transformers.
* ``scorers.signals``: difficulty signals with formula and direction; ``scorers.stats.per_source_stats``.
* ``scorers.job``: ``score_preferences(data, out, ScoringConfig(...))`` (resumable; CLI ``sdpo score``) and
  ``read_scored(out)``.
"""
