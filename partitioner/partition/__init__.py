"""Ordering, chunking, shard writing, the partition folder and its statistics."""
