"""Every private TRL / transformers name we rely on still exists, and the version ranges match pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version

from scorers import compat


def test_every_private_upstream_name_still_exists():
    missing = compat.missing_upstream_names()
    assert not missing, (f"the installed TRL/transformers renamed or removed {missing}: update scorers/compat.py "
                         f"(written for {compat.SUPPORTED})")


def test_supported_ranges_are_the_pinned_ones(repo_root):
    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {m.group(1): m.group(2).replace(" ", "") for d in deps if (m := re.match(r"([a-z]+)(\W.*)", d))}
    for package, spec in compat.SUPPORTED.items():
        assert pinned[package] == spec, f"pyproject.toml pins {package}{pinned[package]}, compat.py says {spec}"


def test_installed_versions_are_in_range():
    from packaging.specifiers import SpecifierSet

    for package, spec in compat.SUPPORTED.items():
        assert version(package) in SpecifierSet(spec), f"{package} {version(package)} is outside {spec}"


def test_patches_are_undone():
    import trl.trainer.dpo_trainer as dpo_module

    originals = dpo_module.hash_module, dpo_module.create_model_from_path
    with compat.trl_init_with_given_ref_logps():
        assert dpo_module.hash_module is not originals[0] and dpo_module.create_model_from_path is not originals[1]
    with compat.trl_init_with_given_ref_logps(policy_is_loaded=False):  # TRL loads the policy from its path
        assert dpo_module.create_model_from_path is originals[1]
    assert (dpo_module.hash_module, dpo_module.create_model_from_path) == originals
