"""``sdpo crossfit SCORED -o PART``: SelectiveDPO's cross-fitted difficulty, then the partition it orders.

Every pair of the scored folder gets its held-out DPO loss from K fold models, each trained (DPO, one step from
M0, the ``DPOConfig`` flags given) on the other folds' pairs (:mod:`trainer_plugin.selective`); the pairs are then
partitioned by that loss, easiest first, keeping the easiest ``--keep-fraction`` (default 0.5, as the paper) in
``--chunks`` steps (default 1): ``sdpo train PART`` trains on them. The fold runs live in ``--work-dir``
(default ``PART.crossfit``): a rerun resumes them. Every PartitionConfig option is taken (``--partition.seed``
for the partition's own seed). The scored log-probs are the fold runs' reference: ``--model``, ``--max-length`` and
``--truncation-mode`` default to the ones the folder was scored with, and other values are refused.

Example::

    sdpo score data.jsonl -o scored
    sdpo crossfit scored -o part --folds 2 --learning-rate 5e-6 --per-device-train-batch-size 4
    sdpo train part --output-dir run --ref-refresh never      # SelectiveDPO trains against M0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from partitioner.partition.config import PartitionConfig
from sdpo_core.config import section
from sdpo_core.errors import ConfigError
from trainer_plugin.selective import CROSSFIT_LOSS, CrossFitConfig

from .options import build


@dataclass
class CrossFitCommand:
    """``sdpo crossfit``: the partition folder, the fold runs' folder, and the partition of the result."""

    output_dir: str | None = field(default=None, metadata={"help": "The partition folder."})
    model: str | None = field(default=None, metadata={
        "help": "M0, the model the pairs were scored with (its log-probs are the reference); default: the scored "
                "folder's model. Another model is refused."})
    work_dir: str | None = field(default=None, metadata={"help": "The fold runs (default: PART.crossfit)."})
    crossfit: CrossFitConfig = section(CrossFitConfig)
    partition: PartitionConfig = section(PartitionConfig, order="column", column=CROSSFIT_LOSS, keep_fraction=0.5,
                                         chunks=1)


def add_arguments(options) -> None:
    from trl import DPOConfig

    options.add_positional("scored_dir", "a scored folder (sdpo score -o SCORED)", many=False, metavar="SCORED")
    options.add("output_dir", str | None, "the partition folder", short="-o")
    options.add_dataclass(CrossFitCommand, "cross-fitting")
    options.add_dataclass(DPOConfig, "DPOConfig (the fold models' training)", skip=("output_dir",))


def run(values: dict) -> int:
    from partitioner import partition_preferences, read_scored
    from partitioner.data.rejects import REJECTS_FILE, read_rejects
    from partitioner.partition.folder import read_manifest
    from trainer_plugin.selective import cross_fitted_difficulty

    from .train import dpo_config

    cmd = build(CrossFitCommand, values)
    scored = values.get("scored_dir")
    if not scored or not Path(scored).is_dir():
        raise ConfigError(f"give a scored folder: sdpo crossfit SCORED -o PART (got {scored!r})")
    if not cmd.output_dir:
        raise ConfigError("give the partition folder with --output-dir/-o")
    work = Path(cmd.work_dir or f"{cmd.output_dir}.crossfit")
    dataset, scoring = read_scored(scored)
    # the fold runs cut pairs as the folder was scored unless told otherwise (a difference is refused below)
    tok = scoring.get("tokenizer") or {}
    as_scored = {k: tok[k] for k in ("max_length", "truncation_mode") if k not in values and k in tok}
    _, args = dpo_config(values, output_dir=str(work), **as_scored)
    model = _scoring_model(scoring, cmd.model, scored)
    rejects = read_rejects(Path(scored) / REJECTS_FILE) if (Path(scored) / REJECTS_FILE).exists() else None
    _check_partition(dataset, cmd.partition)
    with_loss = cross_fitted_difficulty(dataset, model, args=args, work_dir=work, crossfit=cmd.crossfit,
                                        scoring=scoring)
    out = partition_preferences(with_loss, cmd.output_dir, cmd.partition, rejects=rejects)
    m = read_manifest(out)
    print(f"cross-fitted {len(with_loss)} pairs over {cmd.crossfit.folds} folds ({work}); kept {m['rows_kept']} of "
          f"{m['rows_in']} in {len(m['chunks'])} chunk(s) in {out}")
    return 0


def _scoring_model(scoring: dict, given: str | None, scored) -> str:
    """M0: ``given``, else the scored folder's model (its log-probs are the fold runs' reference; another model is
    refused by :func:`trainer_plugin.selective.cross_fitted_difficulty`).

    Raises:
        ConfigError: no ``given`` model and the folder does not name the one that scored it.
    """
    if given is not None:
        return given
    name = (scoring.get("model") or {}).get("name_or_path")
    if not name:
        raise ConfigError(f"{scored} does not name the model that scored it; give it with --model")
    return name


def _check_partition(dataset, config: PartitionConfig) -> None:
    """Partition the pairs' key columns, with a stand-in loss, into a scratch folder before any fold run trains:
    settings the cross-fitted pairs cannot meet (more chunks than the rows kept, ...) are refused now, by the
    partitioner's own checks, instead of after K trainings. The rows kept and the equal or fractions chunks depend
    on the number of pairs only; thresholds and quantiles cut the real losses, after the fold runs."""
    import dataclasses
    import tempfile

    import pyarrow as pa

    from partitioner import partition_preferences
    from partitioner.partition.config import PartitionConfigError
    from sdpo_core.columns import ROW_ID, SOURCE

    numeric = (pa.types.is_integer, pa.types.is_floating)
    keys = dataset.select_columns([f.name for f in dataset.data.schema if f.name != CROSSFIT_LOSS and (
        f.name in (ROW_ID, SOURCE) or any(is_(f.type) for is_ in numeric))]).with_format("arrow")[:]
    keys = keys.append_column(CROSSFIT_LOSS, pa.array([0.0] * keys.num_rows))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            partition_preferences(keys, Path(tmp) / "part", dataclasses.replace(config, fsync=False), progress=False)
        except PartitionConfigError as e:
            raise ConfigError(f"the {keys.num_rows} cross-fitted pairs cannot be partitioned so: {e}") from e
