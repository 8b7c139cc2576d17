"""Test-only start-up hook: on PYTHONPATH only while pytest runs with ``--auto-linear-kernel onednn|torch``
(tests/conftest.py). It makes ``linear_kernel="auto"`` pick the forced kernel in every Python subprocess the tests
start (the CLI, killed and resumed jobs, torchrun workers), as a host where that GEMM wins would: the measurement
``scorers.onednn.onednn_is_faster`` is replaced right after that module is first imported. Nothing of the product
reads the variable."""

import importlib.abc
import importlib.machinery
import os
import sys

_FORCED = os.environ.get("SDPO_TESTS_AUTO_LINEAR_KERNEL")


class _ForceAutoLinearKernel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "scorers.onednn":
            return None
        sys.meta_path.remove(self)  # once, and let the regular finders load the module
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.onednn_is_faster = lambda *a, **kw: _FORCED == "onednn"

        spec.loader.exec_module = exec_module
        return spec


if _FORCED in ("onednn", "torch"):
    sys.meta_path.insert(0, _ForceAutoLinearKernel())
