"""A plain TRL DPO run made stepwise by the drop-in callback: one DPOTrainer, reference refreshed at chunk ends.

What it does: the bundled data (orca_dpo_pairs + LLaMA-Factory dpo_en_demo) is scored by M0 and cut easy -> hard
into ``--chunks`` chunks; an ordinary ``trl.DPOTrainer`` trains on the chunks in that order
(``concatenate_chunks``), and ``StepwiseReferenceCallback`` swaps in a chunk-ordered sampler and overwrites the
reference with the policy's weights at every chunk boundary, so chunk t trains against M(t-1). Unlike the driver
(``trainer_plugin.driver.train_stepwise``) this is one optimizer and one learning-rate schedule for the whole run.
With ``--no-reference`` no reference model is kept: TRL scores M0's reference log-probs once
(``precompute_ref_log_probs``) and the callback scores each next chunk with the policy at its boundary.

Usage (from the repository root; under the heavy-job lock on a shared machine)::

    python examples/trl_with_callback.py                          # SmolLM2-135M, 16 pairs per source, ~2 min on CPU
    python examples/trl_with_callback.py --model PATH --pairs-per-source 64 --max-length 512
    python examples/trl_with_callback.py --no-reference               # no reference model in memory
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

from partitioner import LoadConfig, PartitionConfig, ScoringConfig, partition_preferences, score_preferences
from partitioner.run import BUNDLED_INPUTS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bundled", help="M0: a path, hub id or 'bundled' (SmolLM2-135M-Instruct).")
    p.add_argument("--output-dir", default="out/trl_callback")
    p.add_argument("--pairs-per-source", type=int, default=16, help="First N pairs of each bundled source.")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-reference", action="store_true",
                   help="No reference model in memory: each chunk's reference log-probs scored at its boundary.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(a.output_dir)

    # 1. Score with M0 and cut the pairs easy -> hard (the partition keeps TRL's token columns).
    scored = score_preferences(BUNDLED_INPUTS, out / "scored",
                               ScoringConfig(model=a.model, max_length=a.max_length, progress=False),
                               load=LoadConfig(limit_per_source=a.pairs_per_source, drop_duplicates=True))
    partition = partition_preferences(scored, out / "partition",
                                      PartitionConfig(order="easy_to_hard", chunks=a.chunks), progress=False)

    # 2. An ordinary TRL DPO run ...
    from trl import DPOConfig, DPOTrainer

    from scorers.models import load_causal_lm, load_tokenizer
    from trainer_plugin.callback import StepwiseReferenceCallback, concatenate_chunks
    from trainer_plugin.config import StepwiseConfig

    model, tokenizer = load_causal_lm(a.model), load_tokenizer(a.model)
    args = DPOConfig(output_dir=str(out / "model"), max_length=a.max_length, learning_rate=a.learning_rate,
                     per_device_train_batch_size=a.batch_size, num_train_epochs=1, bf16=False, use_cpu=True,
                     gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1,
                     disable_tqdm=True, precompute_ref_log_probs=a.no_reference)
    trainer = DPOTrainer(model, ref_model=None if a.no_reference else copy.deepcopy(model), args=args,
                         train_dataset=concatenate_chunks(partition), processing_class=tokenizer)
    # 3. ... made stepwise: chunk-ordered sampler; after each chunk's last optimizer step, reference <- policy
    # (a reference copy), or the next chunk's reference log-probs scored with the policy (no reference model).
    config = StepwiseConfig(ref_mode="precomputed" if a.no_reference else "live")
    callback = StepwiseReferenceCallback(config=config).install(trainer)
    trainer.train()
    trainer.save_model(args.output_dir)
    print(f"chunks of {callback.chunk_sizes} pairs; reference moved to the policy after optimizer steps "
          f"{callback.refresh_steps} of {trainer.state.global_step}")


if __name__ == "__main__":
    main()
