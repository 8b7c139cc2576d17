"""What a stepwise run reads, all checked before any training: the chunks, the tokenizer, held-out pairs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from partitioner.data.tokenization import TokenizeConfig, tokenize_preferences, tokenize_row
from partitioner.io import StorageError, sha256_file
from partitioner.partition.folder import MANIFEST, PartitionError, load_partition, read_manifest, verify_partition
from partitioner.partition.layout import shard_dataset
from scorers.models import chat_template_sha256
from sdpo_core.columns import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS, ROW_ID

from .config import StepwiseInputError

logger = logging.getLogger(__name__)


def load_chunks(partition) -> tuple[list, dict | None]:
    """Chunks in curriculum order and the manifest (None for a list of Datasets), the partition verified first.

    Raises:
        StepwiseInputError: no manifest, no chunks, a missing chunk or a failed verification.
    """
    if not isinstance(partition, (str, os.PathLike)):
        chunks = list(partition)
        if not chunks:
            raise StepwiseInputError("no chunks given")
        return chunks, None
    path = Path(partition)
    if not (path / MANIFEST).is_file():
        raise StepwiseInputError(f"{path} is not a partition folder (no {MANIFEST}); run `sdpo partition` first")
    try:
        manifest = read_manifest(path)
        if not manifest.get("chunks"):
            raise StepwiseInputError(f"partition {path} has no chunks in its manifest")
        verify_partition(path)
    except PartitionError as e:
        raise StepwiseInputError(f"partition {path} fails verification: {str(e).splitlines()[0]}") from e
    return load_detached_chunks(path, manifest), manifest


def load_detached_chunks(path, manifest: dict) -> list:
    """The partition's chunks (Arrow or Parquet shards), detached from their files (:func:`detach_from_file`)."""
    return [detach_from_file(ds, c["sha256"]) for ds, c in zip(load_partition(path), manifest["chunks"], strict=True)]


def detach_from_file(dataset, fingerprint: str):
    """``dataset``, memory-mapped from a file, as an in-memory ``datasets`` table over the same buffers (no copy).

    ``datasets`` writes what ``map``/``filter`` derive from a file-backed dataset as cache files beside that file:
    TRL's preparation of every step's chunk would write into the partition folder, once per training process (the
    processes' fingerprints differ). Detached, the derived tables stay in memory. ``fingerprint`` (the shard's
    sha256) spares ``datasets`` hashing every row to make one.
    """
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(dataset.data.table), info=dataset.info, split=dataset.split, fingerprint=fingerprint)


def check_tokenizer(tokenizer, chunks: list, manifest: dict | None, *, rows: int = 8) -> None:
    """Refuse a tokenizer that differs from the one the partition was scored with.

    Compares what the manifest recorded (chat template hash, vocab size when present), then re-tokenizes the first
    rows of chunk 1 and compares with the stored ``prompt_ids``/``chosen_ids``/``rejected_ids``.

    Raises:
        StepwiseInputError: one line naming both tokenizers.
    """
    scored = ((manifest or {}).get("scoring") or {}).get("tokenizer") or {}
    name = scored.get("name_or_path", "the partition's tokenizer")
    ours = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    want_sha = scored.get("chat_template_sha256")
    have_sha = chat_template_sha256(tokenizer)
    if want_sha and have_sha and want_sha != have_sha:
        raise StepwiseInputError(
            f"tokenizer mismatch: the model's tokenizer {ours!r} has a different chat template than {name!r}, "
            "which scored the partition"
        )
    want_vocab = scored.get("vocab_size")
    if want_vocab is not None and int(want_vocab) != len(tokenizer):
        raise StepwiseInputError(
            f"tokenizer mismatch: the model's tokenizer {ours!r} has {len(tokenizer)} tokens, {name!r} had {want_vocab}"
        )
    first = chunks[0]
    if PROMPT_IDS not in first.column_names:
        return
    for row in first.select(range(min(rows, len(first)))):
        ids = tokenize_row(row, tokenizer)
        for col in (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS):
            if list(ids[col]) != list(row[col]):
                raise StepwiseInputError(
                    f"tokenizer mismatch: the model's tokenizer {ours!r} tokenizes row {row.get(ROW_ID)} "
                    f"differently from {name!r}, which scored the partition"
                )


def ensure_tokens(dataset, tokenizer, max_length, truncation_mode):
    """``dataset`` with TRL's token columns (tokenized here if it has none)."""
    if PROMPT_IDS in dataset.column_names:
        return dataset
    kept, rejects = tokenize_preferences(dataset, tokenizer, TokenizeConfig(max_length, truncation_mode))
    if rejects:
        logger.warning("%d pair(s) rejected by tokenization (prompt fills max_length), as DPOTrainer drops them",
                       len(rejects))
    return kept


def load_held_out(path: str):
    """Held-out pairs: an Arrow stream or Parquet file (a partition's shard, say), or every chunk of a partition folder.

    Raises:
        StepwiseInputError: the path is missing or unreadable, or a folder that is not a partition.
    """
    from datasets import concatenate_datasets

    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST).exists():
            return concatenate_datasets(load_detached_chunks(p, read_manifest(p)))
        raise StepwiseInputError(f"held-out folder {p} is not a partition (no {MANIFEST})")
    if not p.is_file():
        raise StepwiseInputError(f"held-out file does not exist: {p}")
    try:
        return detach_from_file(shard_dataset(p), sha256_file(p))
    except StorageError as e:
        raise StepwiseInputError(f"held-out file {e}") from None
