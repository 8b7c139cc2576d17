"""Drop-in stepwise reference refresh for an existing TRL ``DPOTrainer`` (one optimizer, one LR schedule).

Usage::

    train_dataset = concatenate_chunks("out/partition")          # chunks in curriculum order + chunk column
    trainer = DPOTrainer(model, ref_model=copy.deepcopy(model), args=args, train_dataset=train_dataset, ...)
    StepwiseReferenceCallback().install(trainer)                 # chunk-ordered sampler + refresh at boundaries
    trainer.train()

    # no reference model in memory: TRL's one-time M0 pass, then the next chunk scored at each boundary
    trainer = DPOTrainer(model, args=DPOConfig(..., precompute_ref_log_probs=True), train_dataset=train_dataset, ...)
    StepwiseReferenceCallback(config=StepwiseConfig(ref_mode="precomputed")).install(trainer)

Difference from the driver (``trainer_plugin.driver.train_stepwise``): here a single ``DPOTrainer`` runs over all
chunks with **one optimizer and one LR schedule** (warmup once, decay over the whole run; Adam moments carry over
chunk boundaries); the driver, as in the sDPO paper, builds a fresh trainer, optimizer and schedule per chunk and
saves M(t) after each one. Both use M(t-1) as the reference of chunk t: here the reference is overwritten with the
policy's weights (a hard refresh) right after the last optimizer step of each chunk.

Chunk boundaries in optimizer steps: every chunk is padded to a multiple of ``rows_per_step =
per_device_train_batch_size × gradient_accumulation_steps × processes`` by repeating rows of the same chunk
(so no optimizer step mixes two chunks), which gives chunk c ``ceil(n_c / rows_per_step)`` optimizer steps.

Several processes (``torchrun`` / ``accelerate launch``; DDP, FSDP, DeepSpeed): accelerate shards the training
dataloader with ``BatchSamplerShard``: the sampler's order is cut into batches of ``per_device_train_batch_size``
rows and process i takes batches i, i + processes, ... (every process draws the same order: the sampler is seeded,
not random per process). One optimizer step is ``gradient_accumulation_steps`` batches on each process, i.e. the
next ``rows_per_step`` rows of the order, which the padding keeps inside one chunk. With
``accelerator_config={"split_batches": True}`` each batch is split across the processes instead, so
``rows_per_step`` has no ``processes`` factor. The arithmetic is checked against the prepared dataloader when
training starts. Every process refreshes its own reference at the same global step: a DDP replica copies its
policy replica; under FSDP policy and reference are sharded alike (each parameter along dim 0), so each process
copies its own shards; under ZeRO-3 the parameters are gathered and rank 0 copies.

Without a reference model (``config=StepwiseConfig(ref_mode="precomputed")``): the DPOTrainer is built with
``ref_model=None`` and ``precompute_ref_log_probs=True``, so TRL keeps no reference copy and scores M0's reference
log-probs of every row once in its ``__init__``; those are chunk 1's reference. At each chunk boundary the callback
scores the next chunk's rows with the current policy (the project's scorer, on the trainer's device; under several
processes each scores a share of the rows and the scores are gathered) and the batches of that chunk read them
(:mod:`trainer_plugin.callback_scores`). The losses equal the live reference's to rounding. ``ref_refresh='never'``
keeps the first reference (M0) for every chunk in either mode.

Assumptions:
    ``ref_mode`` 'live': a live ``ref_model`` (not PEFT, not ``precompute_ref_log_probs``: a refreshed reference
    invalidates precomputed log-probs); 'precomputed': no ``ref_model``, ``precompute_ref_log_probs=True``, no
    ``ld_alpha``, whole weights on each process (not FSDP / ZeRO-3), and eval batches keep TRL's M0 reference
    columns; 'peft' is refused. ``num_train_epochs`` whole epochs (each epoch replays the chunk order and refreshes
    at each of its boundaries); ``max_steps`` unset. Resuming mid-run from a Trainer checkpoint does not restore
    the reference (it is not in the checkpoint); with no reference model the chunk being resumed is scored with
    the resumed policy, which is exact only for a checkpoint at a chunk boundary.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback

from partitioner.partition.folder import read_manifest, verify_partition
from scorers.compat import set_train_sampler

from .callback_scores import ScoredReference
from .config import StepwiseConfig
from .inputs import load_detached_chunks
from .ref_refresh import REFRESH_RULES, kl_probe, reference_moves
from .reference import hard_refresh

logger = logging.getLogger(__name__)

CHUNK_COLUMN = "stepwise_chunk"  # our column: the chunk index of each row (not read by TRL)


def concatenate_chunks(partition):
    """One dataset of all chunks in curriculum order with a ``stepwise_chunk`` column (chunk index per row).

    Args:
        partition: a partition folder (verified) or a list of ``datasets.Dataset`` chunks.
    """
    from datasets import concatenate_datasets

    if isinstance(partition, (str, os.PathLike)):
        manifest = verify_partition(partition)
        chunks = load_detached_chunks(partition, manifest)  # TRL's map/filter then write no cache files beside them
    else:
        chunks = list(partition)
    tagged = [c.add_column(CHUNK_COLUMN, [i] * len(c)) for i, c in enumerate(chunks)]
    return concatenate_datasets(tagged)


class ChunkOrderedSampler(Sampler[int]):
    """Yields the chunks in order, each shuffled on its own (seeded per epoch and chunk), never mixing chunks.

    Each chunk is padded with its own rows (cyclically, from its shuffled order) to a multiple of
    ``rows_per_step`` so that every optimizer step sees rows of one chunk only.
    """

    def __init__(self, chunk_sizes: list[int], rows_per_step: int, seed: int = 0, shuffle: bool = True):
        if rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
        if not chunk_sizes or any(n < 1 for n in chunk_sizes):
            raise ValueError(f"every chunk needs at least one row, got sizes {chunk_sizes}")
        self.chunk_sizes = list(chunk_sizes)
        self.rows_per_step = rows_per_step
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_chunk(self) -> list[int]:
        return [math.ceil(n / self.rows_per_step) for n in self.chunk_sizes]

    def __len__(self) -> int:
        return sum(self.steps_per_chunk()) * self.rows_per_step

    def __iter__(self):
        start = 0
        for c, (n, steps) in enumerate(zip(self.chunk_sizes, self.steps_per_chunk(), strict=True)):
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + c)
                perm = torch.randperm(n, generator=g).tolist()
            else:
                perm = list(range(n))
            for i in range(steps * self.rows_per_step):
                yield start + perm[i % n]
            start += n


def optimizer_step_rows(loader, accumulation: int) -> int:
    """Rows of the sampler's order that one optimizer step consumes, over all processes, for a dataloader prepared by
    accelerate (``DataLoaderShard`` with ``BatchSamplerShard``, ``DataLoaderDispatcher``) or a plain one."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher

    batches = loader.batch_sampler
    if isinstance(loader, DataLoaderDispatcher):  # the main process reads `processes` batches (or one, split)
        per_batch = batches.batch_size * (1 if loader.split_batches else loader.state.num_processes)
    elif isinstance(batches, BatchSamplerShard):  # process i takes batches i, i + processes, ... (or a slice)
        per_batch = batches.batch_size * (1 if batches.split_batches else batches.num_processes)
    else:
        per_batch = batches.batch_size
    return per_batch * accumulation


def _chunk_sizes_of(dataset) -> list[int]:
    ids = dataset[CHUNK_COLUMN]
    if any(b < a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"the training dataset's {CHUNK_COLUMN} column is not in chunk order")
    sizes: list[int] = []
    prev = None
    for i in ids:
        if i != prev:
            sizes.append(0)
            prev = i
        sizes[-1] += 1
    return sizes


class StepwiseReferenceCallback(TrainerCallback):
    """Moves the reference to the policy at every chunk boundary: a live reference model is hard-refreshed with
    the policy's weights, or (no reference model) the next chunk's reference log-probs are scored with the policy.

    Args:
        partition_dir: a partition folder; its manifest gives the chunk sizes (when the training dataset has no
            ``stepwise_chunk`` column). Default: ``config.partition_dir``.
        chunk_sizes: the chunk sizes, alternatively.
        ref_model, accelerator: bound by :meth:`install` (or give them, as for TRL's ``SyncRefModelCallback``).
        config: ``ref_mode`` 'live' (default: a reference copy) or 'precomputed' (no reference model); 'peft' is
            refused. ``ref_refresh`` 'step' (default, sDPO), 'never' (the first reference for every chunk) or, with a
            live reference, 'kl' (at a chunk boundary the reference moves only when the mean per-token KL of the
            policy to it on a seeded probe of ``kl_probe_rows`` training rows exceeds ``kl_threshold``;
            :mod:`trainer_plugin.ref_refresh`); ``score_batch_tokens``: the scoring passes' token budget.

    After training, ``refresh_steps`` lists the global steps at which the reference moved and ``refresh_seconds``
    the time each move took (the scoring pass, with no reference model); with 'kl', ``kl_measurements`` holds
    ``(global step, KL)`` of every boundary.

    Raises:
        ValueError: ``ref_mode`` 'peft', or 'kl' without a reference model (the KL needs the reference's
            distribution, which the scored log-probs do not keep).
    """

    def __init__(self, partition_dir=None, *, chunk_sizes: list[int] | None = None, ref_model=None,
                 accelerator=None, config: StepwiseConfig | None = None):
        self.config = config if config is not None else StepwiseConfig()
        if self.config.ref_mode not in ("live", "precomputed"):
            raise ValueError(f"StepwiseReferenceCallback supports ref_mode 'live' and 'precomputed', not "
                             f"{self.config.ref_mode!r} (the stepwise driver merges each step's LoRA adapter)")
        if REFRESH_RULES[self.config.ref_refresh].measures_kl and self.config.ref_mode != "live":
            raise ValueError("StepwiseReferenceCallback's ref_refresh 'kl' needs a live reference model (ref_mode "
                             "'live'): the KL is measured against the reference's distribution")
        partition_dir = partition_dir if partition_dir is not None else self.config.partition_dir
        if partition_dir is not None and chunk_sizes is None:
            chunk_sizes = [c["rows"] for c in read_manifest(partition_dir)["chunks"]]
        self.chunk_sizes = chunk_sizes
        self.ref_model, self.accelerator = ref_model, accelerator
        self.scores: ScoredReference | None = None  # the reference log-probs, with no reference model
        self.sampler: ChunkOrderedSampler | None = None
        self.boundaries: list[int] = []
        self.refresh_steps: list[int] = []
        self.refresh_seconds: list[float] = []
        self.kl_measurements: list[tuple[int, float]] = []
        self._probe = None

    def install(self, trainer) -> StepwiseReferenceCallback:
        """Bind to ``trainer``: its reference (a live model, or its reference columns), a chunk-ordered sampler in
        place of its own, and this callback.

        Raises:
            ValueError: 'live' without a live reference model or with a PEFT or precomputed-reference setup;
                'precomputed' with a reference model or without ``precompute_ref_log_probs`` (see
                :class:`~trainer_plugin.callback_scores.ScoredReference`); chunk sizes that do not add up to the
                training dataset (e.g. rows TRL dropped for a prompt that fills ``max_length``).
        """
        args = trainer.args
        live = self.config.ref_mode == "live"
        if live and getattr(trainer, "ref_model", None) is None:
            raise ValueError("StepwiseReferenceCallback needs a DPOTrainer with a live ref_model to refresh (or "
                             "config=StepwiseConfig(ref_mode='precomputed') for no reference model)")
        if live and args.precompute_ref_log_probs:
            raise ValueError("StepwiseReferenceCallback cannot refresh precomputed reference log-probs of a live "
                             "reference (use config=StepwiseConfig(ref_mode='precomputed') and no ref_model)")
        if args.max_steps and args.max_steps > 0:
            raise ValueError("StepwiseReferenceCallback needs max_steps unset (the chunks define the run's length)")
        ds = trainer.train_dataset
        if CHUNK_COLUMN in ds.column_names:
            sizes = _chunk_sizes_of(ds)
            if self.chunk_sizes is not None and sum(self.chunk_sizes) != len(ds):
                logger.warning("TRL dropped %d row(s) (prompt fills max_length); chunk sizes now %s",
                               sum(self.chunk_sizes) - len(ds), sizes)
            self.chunk_sizes = sizes
        elif self.chunk_sizes is None or sum(self.chunk_sizes) != len(ds):
            raise ValueError(
                f"chunk sizes {self.chunk_sizes} do not add up to the training dataset's {len(ds)} rows; build it "
                "with concatenate_chunks() so the chunk of every row is known"
            )
        if live:
            self.ref_model = trainer.ref_model
        else:
            self.scores = ScoredReference(trainer, batch_tokens=self.config.score_batch_tokens,
                                          packed_attention=self.config.packed_attention)
        self.accelerator = trainer.accelerator
        shards = 1 if trainer.accelerator.split_batches else trainer.accelerator.num_processes
        rows_per_step = args.train_batch_size * args.gradient_accumulation_steps * shards
        self.sampler = ChunkOrderedSampler(self.chunk_sizes, rows_per_step, seed=args.data_seed or args.seed)
        set_train_sampler(trainer, self.sampler)
        if REFRESH_RULES[self.config.ref_refresh].measures_kl:
            self._probe = kl_probe(ds, self.config.kl_probe_rows, args.seed)
            self._truncation = (args.max_length, args.truncation_mode)  # the probe cut as the collator cuts rows
        trainer.add_callback(self)
        return self

    def boundary_steps(self, num_epochs: int = 1) -> list[int]:
        """Global optimizer steps after which the reference is refreshed (end of every chunk but the last)."""
        per_chunk = self.sampler.steps_per_chunk()
        per_epoch = sum(per_chunk)
        ends = [sum(per_chunk[: c + 1]) for c in range(len(per_chunk))]
        steps = [epoch * per_epoch + e for epoch in range(num_epochs) for e in ends]
        return steps[:-1]

    def chunk_rows(self, step: int) -> range:
        """The training dataset's rows of the chunk that global optimizer step ``step`` (from 1) trains on."""
        per_chunk = self.sampler.steps_per_chunk()
        position = (step - 1) % sum(per_chunk)
        c = 0
        while position >= per_chunk[c]:
            position -= per_chunk[c]
            c += 1
        start = sum(self.chunk_sizes[:c])
        return range(start, start + self.chunk_sizes[c])

    def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
        if self.sampler is None:
            raise ValueError("call StepwiseReferenceCallback.install(trainer) before training")
        if train_dataloader is not None:
            self._check_sharding(train_dataloader, args.gradient_accumulation_steps)
        self.boundaries = self.boundary_steps(math.ceil(args.num_train_epochs))
        if self.scores is not None and self.config.ref_refresh == "step":
            # chunk 1 keeps M0's columns; every other chunk is scored at its boundary, before its first batch
            self.scores.forget(range(self.chunk_sizes[0] if state.global_step == 0 else 0, sum(self.chunk_sizes)))
            if state.global_step > 0:  # resumed: the next step's chunk against the policy as resumed
                self.refresh(model, state)
        if not state.is_world_process_zero:  # every process refreshes; the main one says so
            return
        if state.global_step > 0:
            logger.warning("resumed at step %d: the reference is not restored from the checkpoint%s",
                           state.global_step, "" if self.scores is None else " (its chunk is scored with the policy "
                           "as resumed: exact only at a chunk boundary)")
        logger.info("stepwise reference (%s) moves at optimizer steps %s (chunks of %s steps)",
                    "reference model" if self.scores is None else "scored log-probs, no reference model",
                    {"step": self.boundaries, "never": "never",
                     "kl": f"{self.boundaries} where the KL to it exceeds {self.config.kl_threshold}"}[
                        self.config.ref_refresh], self.sampler.steps_per_chunk())

    def _check_sharding(self, loader, accumulation: int) -> None:
        """The rows one optimizer step takes from the sampler's order, as the prepared dataloader shards it, must be
        the sampler's ``rows_per_step`` (else a step could straddle two chunks).

        Raises:
            ValueError: they differ (e.g. a device mesh with tensor parallelism, which accelerate shards differently).
        """
        rows = optimizer_step_rows(loader, accumulation)
        if rows != self.sampler.rows_per_step:
            raise ValueError(f"the prepared dataloader takes {rows} rows per optimizer step, the chunk-ordered sampler "
                             f"was built for {self.sampler.rows_per_step}; chunk boundaries would not fall on steps")

    def should_refresh(self, state, model=None) -> bool:
        """Whether the reference moves to the policy after the optimizer step ``state.global_step`` just ended:
        at each chunk boundary with ``ref_refresh`` 'step', never with 'never', and with 'kl' when the policy's KL
        to the reference on the probe exceeds ``kl_threshold`` (the rule: ``ref_refresh.reference_moves``)."""
        if state.global_step not in self.boundaries or state.global_step in self.refresh_steps:
            return False

        def measure_kl() -> float:
            from scorers.divergence import mean_token_kl

            unwrap = self.accelerator.unwrap_model if self.accelerator is not None else (lambda m: m)
            max_length, truncation_mode = self._truncation
            return mean_token_kl(unwrap(model), unwrap(self.ref_model), self._probe, max_length=max_length,
                                 truncation_mode=truncation_mode)

        moves, kl = reference_moves(self.config.ref_refresh, self.config.kl_threshold, measure_kl)
        if kl is not None:
            self.kl_measurements.append((state.global_step, kl))
            if state.is_world_process_zero:
                logger.info("step %d: chunk boundary, KL(policy ‖ reference) = %.4g nats/token (threshold %g)",
                            state.global_step, kl, self.config.kl_threshold)
        return moves

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.should_refresh(state, model):
            self.refresh(model, state)

    def refresh(self, model, state) -> None:
        """Make the policy as it is now the reference of the next optimizer step's chunk: copy its weights into the
        reference model, or score that chunk's rows with it."""
        import time

        t0 = time.perf_counter()
        policy = self.accelerator.unwrap_model(model) if self.accelerator is not None else model
        if self.scores is None:
            ref = self.accelerator.unwrap_model(self.ref_model) if self.accelerator is not None else self.ref_model
            hard_refresh(policy, ref)
            what = "reference <- policy"
        else:
            rows = self.chunk_rows(state.global_step + 1)
            self.scores.score(policy, rows)
            what = f"rows {rows.start}..{rows.stop - 1} scored with the policy"
        self.refresh_seconds.append(time.perf_counter() - t0)
        self.refresh_steps.append(state.global_step)
        if state.is_world_process_zero:
            logger.info("step %d: chunk boundary, %s (%.3fs)", state.global_step, what, self.refresh_seconds[-1])
