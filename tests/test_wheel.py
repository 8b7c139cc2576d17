"""The package as a user installs it: a built wheel in a fresh venv runs the bundled job from an empty folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest


@pytest.mark.slow
def test_installed_wheel_runs_bundled_job_from_elsewhere(repo_root, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(repo_root)], check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("sdpo_curriculum-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, TRL, ...) come from this environment's site-packages, after the venv's own.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import partitioner, scorers, trainer_plugin, partitioner.run as r; "
                            "print(partitioner.__file__); print(r.BUNDLED_DATA)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout.split()
    assert all(p.startswith(str(env_dir)) for p in where), where  # the wheel's code and data, not the repository's
    proc = subprocess.run([str(env_dir / "bin" / "sdpo"), "run", "--limit-per-source", "4", "--no-progress"],
                          cwd=elsewhere, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 rows in = 8 in 2 chunks + 0 rejected" in proc.stdout, proc.stdout
    assert (elsewhere / "out" / "run" / "partition" / "manifest.json").exists()
