"""The main job (`sdpo run`): load -> score -> partition -> stats, end to end on real data."""

from __future__ import annotations

import json
import subprocess
import sys

from partitioner import load_partition, read_manifest, verify_partition


def test_run_job_by_source_on_real_data(shared_data, tiny_model_dir, tmp_path):
    out = tmp_path / "job"
    orca = tmp_path / "orca.jsonl"  # the first 40 real orca rows
    orca.write_text("".join((shared_data / "orca_dpo_pairs/validation.jsonl").read_text().splitlines(True)[:40]))
    cmd = [
        sys.executable, "-m", "partitioner.cli", "run",
        f"orca={orca}",
        f"v1={shared_data / 'llamafactory_demo/v1_dpo_demo.jsonl'}",
        "--model", str(tiny_model_dir), "--max-length", "256", "-o", str(out), "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = read_manifest(out / "partition")
    verify_partition(out / "partition")
    # by_source: one chunk per source, sources ordered by the reference's reward accuracy (highest first).
    scoring = json.loads((out / "scored" / "scoring.json").read_text())
    acc = {s: v["reward_accuracy"] for s, v in scoring["per_source"].items()}
    chunks = load_partition(out / "partition")
    assert [set(c["source"]) for c in chunks] == [{s} for s in sorted(acc, key=lambda s: -acc[s])]
    # Every row accounted for: 50 in (40 orca + 10 v1) = kept + rejected.
    assert manifest["rows_in"] == 50 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["reject_reasons"].get("prompt_too_long", 0) == manifest["rows_rejected"] > 0
    assert (out / "stats.png").stat().st_size > 0 and json.loads((out / "stats.json").read_text())
    assert "rejected" in proc.stdout and "reward_accuracy" in proc.stdout
