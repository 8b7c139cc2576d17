"""The main job (`sdpo run`): load -> score -> partition -> stats, end to end on real data."""

from __future__ import annotations

import json
import subprocess
import sys

from partitioner import load_partition, read_manifest, verify_partition


def test_run_job_by_source_on_real_data(shared_data, tiny_model_dir, tmp_path):
    out = tmp_path / "job"
    cmd = [
        sys.executable, "-m", "sdpo_cli", "run",
        f"orca={shared_data / 'orca_dpo_pairs/validation.jsonl'}",
        f"v1={shared_data / 'llamafactory_demo/v1_dpo_demo.jsonl'}",
        "--model", str(tiny_model_dir), "--max-length", "256", "--limit-per-source", "40", "-o", str(out), "--no-progress",
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
    # Every row accounted for: 50 in (the first 40 orca rows + all 10 v1 rows) = kept + rejected.
    assert manifest["rows_in"] == 50 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["reject_reasons"].get("prompt_too_long", 0) == manifest["rows_rejected"] > 0
    assert (out / "stats.png").stat().st_size > 0 and json.loads((out / "stats.json").read_text())
    assert "rejected" in proc.stdout and "reward_accuracy" in proc.stdout


def test_score_cli_reads_other_layouts_through_loader_options(tiny_model_dir, tmp_path):
    """`sdpo score --column-mapping ... --drop-duplicates` loads a custom layout; duplicates are counted rejects."""
    rows = [{"question": f"What is {i} + {i}?", "response_j": f"{2 * i}.", "response_k": f"{2 * i + 1}.",
             "system": "Answer briefly."} for i in range(5)]
    rows.append(rows[0])
    (tmp_path / "se.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "scored"
    proc = subprocess.run(
        [sys.executable, "-m", "sdpo_cli", "score", f"stack={tmp_path / 'se.jsonl'}", "-o", str(out),
         "--model", str(tiny_model_dir), "--column-mapping",
         "prompt=question,chosen=response_j,rejected=response_k,system=system", "--drop-duplicates", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "scoring.json").read_text())
    assert (meta["rows_in"], meta["rows_scored"], meta["rows_rejected"]) == (6, 5, 1)
    assert meta["reject_reasons"] == {"duplicate_pair": 1}
    from partitioner import read_scored

    scored, _ = read_scored(out)
    assert scored[0]["prompt"][0] == {"role": "system", "content": "Answer briefly."}
