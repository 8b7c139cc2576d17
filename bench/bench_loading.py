"""Loading at scale: ``sdpo inspect`` (our streamed loader) vs ``datasets.load_dataset("json")``, in one run.

Generates a TRL-standard JSONL file (``prompt``/``chosen``/``rejected`` text of realistic lengths, ~1.15 KB a row,
as the 200k-row / 230 MB file of the issue) under a temporary folder, plus gzipped copies, then runs each contender
in its own child process and reads that child's peak RSS (``VmHWM`` of ``/proc/self/status`` at its exit):

* ``datasets``: ``load_dataset("json", data_files=FILE, split="train", cache_dir=<fresh>)`` (the anchor);
* ``ours``: ``python -m sdpo_cli inspect FILE --json`` (the whole command: start-up, load, report);
* ``partition``: ``python -m sdpo_cli partition FILE.jsonl.gz --order random --chunks 8 -o OUT`` (the whole
  offline job without a model) on the largest size.

Goals (issue 12): ours <= 2x datasets' time, peak RSS < 1 GB, peak RSS flat (<= 1.2x) from the smallest to the
largest size; the partition job within the same memory bound. Generated data is deleted at the end.

Usage (heavy, ~2.3 GB per 2M rows on disk, several minutes: run it alone, under the lock)::

    flock /tmp/sdpo-heavy.lock .venv/bin/python bench/bench_loading.py --rows 1000000 --flat-rows 200000 2000000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part model answer question reason because therefore step solution explain result value").split()
REPO = Path(__file__).resolve().parent.parent


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` TRL-standard JSON lines: prompt ~300, chosen ~390, rejected ~420 characters (normal lengths)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    corpus = " ".join(rng.choice(WORDS, 4_000_000))
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, rows, 100_000):
            n = min(100_000, rows - lo)
            lens = [np.clip(rng.normal(m, m / 3, n), 8, 4 * m).astype(int) for m in (300, 390, 420)]
            starts = [rng.integers(0, len(corpus) - 5000, n) for _ in range(3)]
            lines = []
            for i in range(n):
                p, c, r = (corpus[s[i]:s[i] + ln[i]] for s, ln in zip(starts, lens))
                lines.append(json.dumps({"prompt": p + "?", "chosen": c + ".", "rejected": r + "."}))
            f.write("\n".join(lines) + "\n")


# Runs a command's Python code in this child and prints the child's own peak RSS (VmHWM, reset at exec; a fork's
# ru_maxrss would include the parent's memory) to stderr at exit.
PEAK_WRAPPER = """
import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("VMHWM_KB", line.split()[1], file=sys.stderr)
atexit.register(peak)
mode, target, sys.argv = sys.argv[1], sys.argv[2], [sys.argv[2]] + sys.argv[3:]
runpy.run_module(target, run_name="__main__") if mode == "-m" else runpy.run_path(target, run_name="__main__")
"""


def run_child(argv: list[str]) -> dict:
    """Run ``-m MODULE ARGS`` / ``-s SCRIPT ARGS`` in a child Python process: wall seconds, peak RSS (VmHWM)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr[-800:]}")
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB")]
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(int(peak[-1]) / 1024, 1), "stdout": proc.stdout}


DATASETS_CHILD = """
import sys, tempfile
import datasets
datasets.disable_progress_bars()
ds = datasets.load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=tempfile.mkdtemp(dir=sys.argv[2]))
print(len(ds))
"""


def bench_inspect(path: Path, work: Path) -> dict:
    ours = run_child(["-m", "sdpo_cli", "inspect", str(path), "--json"])
    report = json.loads(ours["stdout"])
    script = work / "datasets_child.py"
    script.write_text(DATASETS_CHILD)
    theirs = run_child(["-s", str(script), str(path), str(work)])
    shutil.rmtree(work / "datasets-cache", ignore_errors=True)
    for p in work.glob("tmp*"):
        shutil.rmtree(p, ignore_errors=True)
    assert int(theirs["stdout"].split()[-1]) == report["rows_kept"] == report["rows_in"]
    return {"file": path.name, "rows": report["rows_in"], "bytes": path.stat().st_size,
            "ours_s": ours["seconds"], "ours_rss_mb": ours["peak_rss_mb"],
            "datasets_s": theirs["seconds"], "datasets_rss_mb": theirs["peak_rss_mb"],
            "time_ratio": round(ours["seconds"] / theirs["seconds"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the timed comparison (plain and gzip)")
    parser.add_argument("--flat-rows", type=int, nargs="*", default=[200_000, 2_000_000],
                        help="sizes for the flat-memory check (ours only); the largest also runs the partition job")
    parser.add_argument("--dir", default=None, help="where to generate (default: a temporary folder under /tmp)")
    parser.add_argument("--generate", nargs=2, metavar=("FILE", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="sdpo-bench-loading-", dir=args.dir))
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "python": sys.version.split()[0]}
    try:
        largest = max([args.rows, *args.flat_rows])
        full = work / f"pairs-{largest}.jsonl"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(full), str(largest)], check=True)
        print(f"generated {largest} rows ({full.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f}s",
              flush=True)
        files = {}
        for n in sorted({args.rows, *args.flat_rows}):
            if n == largest:
                files[n] = full
                continue
            files[n] = work / f"pairs-{n}.jsonl"
            with open(full, "rb") as src, open(files[n], "wb") as dst:
                for _, line in zip(range(n), src):
                    dst.write(line)
        gz = {}
        for n in sorted({args.rows, largest}):
            gz[n] = work / f"pairs-{n}.jsonl.gz"
            with open(files[n], "rb") as src, gzip.open(gz[n], "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        results["inspect"] = [bench_inspect(files[args.rows], work), bench_inspect(gz[args.rows], work)]
        for r in results["inspect"]:
            print(json.dumps(r), flush=True)
        flat = []
        for n in sorted(args.flat_rows):
            res = run_child(["-m", "sdpo_cli", "inspect", str(files[n]), "--json"])
            flat.append({"rows": n, "ours_s": res["seconds"], "ours_rss_mb": res["peak_rss_mb"]})
            print(json.dumps(flat[-1]), flush=True)
        results["flat"] = flat
        results["rss_ratio_largest_smallest"] = round(flat[-1]["ours_rss_mb"] / flat[0]["ours_rss_mb"], 2)
        out = work / "partition"
        res = run_child(["-m", "sdpo_cli", "partition", str(gz[largest]), "--order", "random",
                         "--chunks", "8", "-o", str(out), "--no-progress"])
        manifest = json.loads((out / "manifest.json").read_text())
        results["partition"] = {"rows": largest, "file": gz[largest].name, "seconds": res["seconds"],
                                "peak_rss_mb": res["peak_rss_mb"], "chunks": len(manifest["chunks"]),
                                "rows_kept": manifest["rows_kept"]}
        print(json.dumps(results["partition"]), flush=True)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
