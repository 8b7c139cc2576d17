"""What every layer of sdpo-curriculum uses; imports nothing else of the project (every other package imports it).

* ``sdpo_core.columns``: every column name and shared constant, with the ``Direction`` of a signal;
* ``sdpo_core.errors``: ``UserError`` and kin (what the ``sdpo`` command line prints as one line, exit 2);
* ``sdpo_core.config``: the config dataclasses' checks (``check_ranges``) and nested sections (``section``);
* ``sdpo_core.option_fields``: options several configs take (``dtype``, ``max_length``, ``truncation_mode``),
  declared once;
* ``sdpo_core.stats``: γ, reward accuracy and the DPO margin of scored pairs.

TRL's and transformers' private names stay in ``scorers.compat`` (model-side code), the one module that uses them.
"""
