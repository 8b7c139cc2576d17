"""Evaluation: benchmarks on the project's scorer and paired statistics of models scored on the same rows.

* ``sdpo_eval.truthfulqa``: TruthfulQA MC1/MC2 as lm-eval-harness scores it (``sdpo truthfulqa``);
* ``sdpo_eval.paired_stats``: bootstrap intervals (rows, or runs then rows), McNemar's test, Holm's correction.

Imports ``sdpo_core`` and ``scorers``; nothing of the data side or the trainer.
"""
