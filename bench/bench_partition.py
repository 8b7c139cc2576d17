"""Partitioning at scale: our streamed partitioner vs the straightforward ``datasets`` path, in one run.

Generates N synthetic scored rows (realistic text, ~1 KB per pair) once into a temporary scored folder
(CONTRACTS.md section 2 layout), then, each in its own subprocess so peak RSS is measured separately:

* ``datasets``: ``concatenate_datasets(Dataset.from_file(part) ...)`` -> ``sort(["difficulty", "row_id"])`` ->
  ``select`` each quarter -> ``save_to_disk`` (the anchor);
* ``ours``: ``partition_preferences(scored_dir, out, PartitionConfig(chunks=4))``.

Prints wall time, peak RSS (VmHWM of the child) and the time ratio; with ``--flat-rows`` it also runs ours on a
second, larger input and prints the RSS ratio (goal: within 1.2x). Generated data is deleted at the end.

Usage (heavy: run it alone)::

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_partition.py --rows 1000000 --flat-rows 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_PER_PART = 100_000
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part model answer question reason because therefore step solution explain result value").split()


def _corpus(n_bytes: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([w + " " for w in WORDS])
    out, size = [], 0
    while size < n_bytes:
        piece = "".join(words[rng.integers(0, len(words), 200_000)]).encode()
        out.append(piece)
        size += len(piece)
    return np.frombuffer(b"".join(out)[:n_bytes], dtype=np.uint8)


SYNTHETIC_SETTINGS = {
    "schema_version": 1, "library_version": "bench", "model": {"name_or_path": "synthetic"}, "dtype": "float32",
    "tokenizer": {}, "scoring": {},
    "signals": [{"name": "ref_margin", "column": "ref_margin", "direction": "higher_is_easier",
                 "formula": "chosen_logps - rejected_logps"}],
    "difficulty": {"signal": "ref_margin", "column": "difficulty", "direction": "higher_is_harder"},
}


def generate(scored_dir: Path, rows: int, seed: int = 0) -> None:
    """Write ``rows`` synthetic scored rows as a scored folder (parts + scoring.json + rejects + _SUCCESS)."""
    import numpy as np
    import pyarrow as pa

    from partitioner.scoring.folder import finish, write_part

    rng = np.random.default_rng(seed)
    corpus = _corpus(64 << 20, seed)
    pos = 0
    (scored_dir / "parts").mkdir(parents=True)
    parts = []

    def text(n, mean):
        nonlocal pos
        lens = np.clip(rng.normal(mean, mean / 3, n), 16, mean * 3).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        total = int(offsets[-1])
        if pos + total > len(corpus):
            pos = 0
        data = corpus[pos:pos + total]
        pos += total
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data.copy()))

    sources = pa.array(["orca", "ultrafeedback", "hh", "math"])
    for p, start in enumerate(range(0, rows, ROWS_PER_PART)):
        n = min(ROWS_PER_PART, rows - start)
        ids = pa.array([f"{x:016x}" for x in rng.integers(0, 2**63, n, dtype=np.int64)])
        chosen_logps = rng.normal(-250, 80, n)
        rejected_logps = chosen_logps - rng.normal(5, 40, n)
        margin = chosen_logps - rejected_logps
        table = pa.table({
            "row_id": ids,
            "source": sources.take(pa.array(rng.integers(0, 4, n))),
            "prompt": text(n, 250),
            "chosen": text(n, 330),
            "rejected": text(n, 380),
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_tokens": rng.integers(20, 400, n),
            "rejected_tokens": rng.integers(20, 400, n),
            "ref_margin": margin,
            "difficulty": -margin,
        })
        write_part(scored_dir, p, table)
        parts.append(n)
    finish(scored_dir, SYNTHETIC_SETTINGS, len(parts), [], rows, rows)


def _child(path: str, scored: str, out: str) -> None:
    """Run one path and print {"seconds", "peak_rss_mb"} as JSON (RSS from /proc/self/status VmHWM)."""
    t0 = time.perf_counter()
    if path == "ours":
        from partitioner import PartitionConfig, partition_preferences

        partition_preferences(scored, out, PartitionConfig(chunks=4), progress=False)
    else:
        from datasets import Dataset, concatenate_datasets

        parts = sorted(Path(scored, "parts").glob("part-*.arrow"))
        ds = concatenate_datasets([Dataset.from_file(str(p)) for p in parts])
        ds = ds.sort(["difficulty", "row_id"])
        n = len(ds)
        bounds = [round(i * n / 4) for i in range(5)]
        for i in range(4):
            ds.select(range(bounds[i], bounds[i + 1])).save_to_disk(f"{out}/step_{i}")
    seconds = time.perf_counter() - t0
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm / 1024}))


def measure(path: str, scored: Path, work: Path) -> dict:
    out = work / f"out-{path}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", path, str(scored), str(out)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{path} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--flat-rows", type=int, default=0, help="also run ours on this many rows (RSS flatness)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per path (best time, max RSS reported)")
    ap.add_argument("--workdir", default=None, help="where to generate data (default: a temp dir)")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "SCORED", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(*args.child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    work = Path(tempfile.mkdtemp(prefix="sdpo-bench-", dir=args.workdir))
    try:
        results = {}
        for rows in [args.rows] + ([args.flat_rows] if args.flat_rows else []):
            scored = work / f"scored-{rows}"
            t0 = time.perf_counter()
            generate(scored, rows)
            os.sync()  # the generated data's writeback must not be charged to whichever path runs first
            size = sum(p.stat().st_size for p in (scored / "parts").iterdir())
            print(f"generated {rows:,} rows ({size / 1e9:.2f} GB of Arrow) in {time.perf_counter() - t0:.1f}s", flush=True)
            paths = ["datasets", "ours"] if rows == args.rows else ["ours"]
            for path in paths:
                runs = [measure(path, scored, work) for _ in range(args.repeat)]
                best = {"seconds": min(r["seconds"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                        "all_seconds": [round(r["seconds"], 2) for r in runs]}
                results[(path, rows)] = best
                print(f"{path:9s} {rows:>9,} rows: {best['seconds']:6.2f}s (runs {best['all_seconds']}), "
                      f"peak RSS {best['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(scored)
        d, o = results[("datasets", args.rows)], results[("ours", args.rows)]
        print(f"speed-up (datasets / ours) at {args.rows:,} rows: {d['seconds'] / o['seconds']:.2f}x")
        if args.flat_rows:
            big = results[("ours", args.flat_rows)]
            print(f"peak RSS ours {args.flat_rows:,} / {args.rows:,} rows: {big['peak_rss_mb'] / o['peak_rss_mb']:.2f}x; "
                  f"time {big['seconds'] / o['seconds']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
