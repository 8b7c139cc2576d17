"""Model-side code on tokenized preference pairs: reference log-probs and difficulty signals.

Imports only ``sdpo_core`` (columns, errors, config checks, stats); nothing from ``partitioner`` or
``trainer_plugin`` (they import it).

* ``scorers.backend``: the ``LogProbBackend`` contract (tokenized pairs -> DPOTrainer's reference log-prob sums)
  and the collator's truncation (``kept_view``).
* ``scorers.packing`` / ``scorers.attention``: prefix-shared packed rows and their attention (scoring and training).
* ``scorers.transformers_backend.TransformersBackend`` (with ``scorers.onednn``'s inference-only CPU kernels),
  ``scorers.vllm_backend.VLLMBackend``, ``scorers.vllm_server_backend.VLLMServerBackend``.
* ``scorers.signals``: the registry of difficulty signals, with formula, direction and model pass.
* ``scorers.models``: model and tokenizer loading (the bundled SmolLM2), fingerprints.
* ``scorers.compat``: every use of TRL's / transformers' private code, beside the supported version ranges.
"""
