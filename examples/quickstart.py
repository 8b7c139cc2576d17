# %% [markdown]
# # sdpo-curriculum quickstart (runs as a script or cell by cell in Jupyter / VS Code)
#
# Load real preference data, score it with a reference model, cut it into an easy -> hard curriculum,
# inspect the chunks, and train stepwise DPO on them. Defaults: the bundled data (`partitioner/bundled`) and the
# bundled SmolLM2-135M-Instruct, on CPU. The whole script takes a few minutes on 2 cores.

# %%
from pathlib import Path

from partitioner import (
    PartitionConfig,
    ScoringConfig,
    load_partition_dict,
    load_preferences_with_rejects,
    partition_preferences,
    partition_stats,
    plot_partition,
    read_scored,
    score_preferences,
)
from partitioner.run import BUNDLED_DATA as DATA

OUT = Path("out/quickstart")

# %% Load: one source per input; every unusable row is a counted reject with a reason.
dataset, report = load_preferences_with_rejects(
    {"orca": DATA / "orca_dpo_pairs.jsonl", "llamafactory_en": DATA / "llamafactory_dpo_en_demo.json"}
)
print(report.as_dict())
# A small, two-source subset keeps this walkthrough quick.
subset = dataset.filter(lambda r, i: i < 24 or 284 <= i < 308, with_indices=True)

# %% Score: reference log-probs of chosen and rejected (TRL-exact), difficulty signals, per-source stats.
scored_dir = score_preferences(
    subset, OUT / "scored", ScoringConfig(model="bundled", max_length=1024, signals=["ref_margin", "length_gap"])
)
scored, meta = read_scored(scored_dir)
print(meta["per_source"])  # reward accuracy = share of pairs where the reference prefers chosen

# %% Partition: the paper's order (each source one chunk, easiest source first) ...
part = partition_preferences(scored_dir, OUT / "by_source", PartitionConfig(order="by_source"))
# ... or by difficulty, easy -> hard, in 3 equal chunks.
part3 = partition_preferences(scored_dir, OUT / "easy_to_hard", PartitionConfig(order="easy_to_hard", chunks=3))

# %% Inspect: a polars DataFrame (one row per chunk) and a figure.
stats = partition_stats(part3)
print(stats)
fig = plot_partition(part3, OUT / "easy_to_hard.png")

# %% The chunks as datasets, ready for TRL (step_0, step_1, ...).
steps = load_partition_dict(part3)
print(steps)

# %% Stepwise DPO: one DPOTrainer per chunk, reference = M(t-1). (Set RUN_TRAINING=1 to run it here.)
import os

if os.environ.get("RUN_TRAINING"):
    from trl import DPOConfig

    from trainer_plugin.driver import train_stepwise

    args = DPOConfig(output_dir=str(OUT / "sdpo"), per_device_train_batch_size=2, learning_rate=1e-6, max_length=512,
                     bf16=False, use_cpu=True, gradient_checkpointing=False, report_to=[], save_strategy="no")
    summaries = train_stepwise(part3, "bundled", args=args, ref_mode="precomputed")
    for s in summaries:
        print(s["step"], s.get("reference"))
