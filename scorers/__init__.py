"""Model-side code on tokenized preference pairs: reference log-probs and difficulty signals.

Imports nothing from ``partitioner`` or ``trainer_plugin`` (they import it).

* ``scorers.columns``: every column name and shared constant; ``scorers.errors``: ``UserError`` and kin.
* ``scorers.backend``: the ``LogProbBackend`` contract (tokenized pairs -> DPOTrainer's reference log-prob sums)
  and the collator's truncation (``kept_view``).
* ``scorers.packing`` / ``scorers.attention``: prefix-shared packed rows and their attention (scoring and training).
* ``scorers.transformers_backend.TransformersBackend`` (with ``scorers.onednn``'s inference-only CPU kernels),
  ``scorers.vllm_backend.VLLMBackend``, ``scorers.vllm_server_backend.VLLMServerBackend``.
* ``scorers.signals``: difficulty signals with formula and direction; ``scorers.stats``: γ and reward accuracy.
* ``scorers.models``: model and tokenizer loading (the bundled SmolLM2), fingerprints.
* ``scorers.compat``: every use of TRL's / transformers' private code, beside the supported version ranges.
"""
