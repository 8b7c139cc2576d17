"""``sdpo verify PART``: check a partition's checksums (shards, rejects, dataset card), row accounting and schema
(exit status 1 on a mismatch); Arrow and Parquet shards alike."""

from __future__ import annotations

import sys

from sdpo_core.errors import ConfigError


def add_arguments(options) -> None:
    options.add_positional("partition", "a partition folder (sdpo partition -o PART)", many=False, metavar="PART")


def run(values: dict) -> int:
    from partitioner.partition.folder import PartitionError, verify_partition

    if not values.get("partition"):
        raise ConfigError("give a partition folder: sdpo verify PART")
    try:
        m = verify_partition(values["partition"])
    except PartitionError as e:
        print(f"sdpo: verify failed: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 1
    card = " (dataset card included)" if m.get("card_sha256") else ""
    print(f"ok: {len(m['chunks'])} chunks, {m['rows_kept']} rows kept + {m['rows_rejected']} rejected"
          f" = {m['rows_in']} rows in; checksums{card}, row counts and schema match")
    return 0
