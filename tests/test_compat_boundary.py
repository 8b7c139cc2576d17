"""Upstream private code (TRL, transformers, torch, accelerate, ...) is used in ``scorers/compat.py`` only.

The offenders are found from the code (AST), not from a list of names. In every module of our packages except
``scorers/compat.py``, each of these is reported:

* ``from <upstream> import _x``, or an import of an underscored upstream module (``torch._dynamo``);
* ``obj._x`` (read, write or delete), or ``getattr``/``setattr``/``hasattr``/``delattr`` with the literal ``"_x"``,
  where ``_x`` (not a dunder) is defined nowhere in our own code. Ours: a ``def``/``class`` name, a module- or
  class-level assignment, an attribute assigned on ``self``/``cls``, or on a function defined in the same module
  (``forward._sdpo_packed_head = True``). Names defined only in compat do not count as ours: compat overrides and
  sets upstream private names;
* an import of a module-level name that compat itself declares upstream-internal (``compat.UPSTREAM_NAMES``, e.g.
  ``trl.trainer.utils.use_adapter``);
* upstream state that is not public API: an attribute named in ``compat.INTERNAL_ATTRIBUTES`` (TRL's
  ``precompute_ref_logps``..., a model's ``hf_quantizer``) other than on what ``compat.dpo_trainer_flags(...)``
  returns, and assigning ``ref_model`` on a trainer (``trainer.ref_model = ...``, or ``self.ref_model = ...`` in a
  class that defines a TRL trainer method or derives from ``Trainer``/``DPOTrainer``), which swaps what TRL's
  ``compute_loss`` reads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from scorers import compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = tuple(p for p in ("scorers", "partitioner", "trainer_plugin", "sdpo_cli") if (ROOT / p).is_dir())
COMPAT = "scorers/compat.py"
TRAINER_METHODS = {"compute_loss", "training_step", "compute_ref_log_probs", "_precompute_ref_logps"}
TRAINER_BASES = {"Trainer", "DPOTrainer"}
REFLECTION = {"getattr", "setattr", "hasattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _assigned(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        return [node.target]
    return []


def own_private_names(sources: dict[str, str]) -> set[str]:
    """Every underscored name our own code (compat excluded) defines."""
    own = set()
    for path, text in sources.items():
        if path == COMPAT:
            continue
        tree = ast.parse(text)
        functions = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        own |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            for stmt in scope.body:  # module- and class-level assignments
                for target in _assigned(stmt):
                    own |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        for node in ast.walk(tree):
            for target in _assigned(node):
                for t in ast.walk(target):
                    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                            and (t.value.id in ("self", "cls") or t.value.id in functions)):
                        own.add(t.attr)
    return {n for n in own if _private(n)}


def _upstream_internal_imports() -> set[tuple[str, str]]:
    return {(module, path) for module, path in compat.UPSTREAM_NAMES if "." not in path}


def _is_flags_call(node: ast.expr) -> bool:
    """``dpo_trainer_flags(trainer)`` (or ``compat.dpo_trainer_flags(...)``): compat's own record of that state."""
    func = node.func if isinstance(node, ast.Call) else None
    return getattr(func, "id", None) == "dpo_trainer_flags" or getattr(func, "attr", None) == "dpo_trainer_flags"


def _trainer_classes(tree: ast.Module) -> list[ast.ClassDef]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            methods = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if bases & TRAINER_BASES or methods & TRAINER_METHODS:
                out.append(node)
    return out


def private_upstream_uses(sources: dict[str, str], own: set[str] | None = None, skip=(COMPAT,)) -> list[str]:
    """``path:line: what`` for every use of upstream private code outside the modules in ``skip``."""
    own = own_private_names(sources) if own is None else own
    internal = _upstream_internal_imports()
    ours = set(PACKAGES)
    found = []
    for path, text in sources.items():
        if path in skip:
            continue
        tree = ast.parse(text)
        trainer_nodes = {id(n) for c in _trainer_classes(tree) for n in ast.walk(c)}

        def report(node, what):
            found.append(f"{path}:{node.lineno}: {what}")

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                if node.module.split(".")[0] in ours:
                    continue
                if any(_private(p) for p in node.module.split(".")):
                    report(node, f"imports from private module {node.module}")
                for alias in node.names:
                    if _private(alias.name):
                        report(node, f"imports {alias.name} from {node.module}")
                    elif (node.module, alias.name) in internal:
                        report(node, f"imports TRL/transformers internal {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] not in ours and any(_private(p) for p in parts):
                        report(node, f"imports private module {alias.name}")
            elif isinstance(node, ast.Attribute):
                if _private(node.attr) and node.attr not in own:
                    report(node, f"upstream private attribute .{node.attr}")
                elif node.attr in compat.INTERNAL_ATTRIBUTES and not _is_flags_call(node.value):
                    report(node, f"upstream internal attribute .{node.attr}")
                elif node.attr == "ref_model" and isinstance(node.ctx, ast.Store):
                    on_self = isinstance(node.value, ast.Name) and node.value.id == "self"
                    if not on_self or id(node) in trainer_nodes:
                        report(node, "swaps the TRL trainer's ref_model")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in REFLECTION
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and _private(node.args[1].value)
                  and node.args[1].value not in own):
                report(node, f"{node.func.id}(..., {node.args[1].value!r})")
    return found


def test_upstream_private_code_only_in_compat():
    offenders = private_upstream_uses(_sources())
    assert not offenders, ("upstream private names used outside scorers/compat.py (add a named function there):\n"
                           + "\n".join(offenders))


def test_compat_itself_would_be_reported():
    """The rule is not vacuous: compat's own uses are found when compat is checked like any other module."""
    found = "\n".join(private_upstream_uses(_sources(), skip=()))
    for what in ("._name_or_path", "._attn_implementation", "._get_train_sampler", "imports _tokenize",
                 "._linear_pointwise", ".precompute_ref_logps", ".hf_quantizer", "ref_model", "FusedCausalLMOutput"):
        assert what in found, f"{what} in scorers/compat.py not reported:\n{found}"


OURS = '''
class Scorer:
    _CACHE = {}

    def _forward(self, x):
        self._state = x
        return self._state, self._forward, Scorer._CACHE


def install(model):
    def forward():
        pass
    forward._flag = True
    return getattr(model.forward, "_flag", False)
'''


@pytest.mark.parametrize("line, reported", [
    ("name = config._name_or_path", "upstream private attribute ._name_or_path"),
    ("config._name_or_path = 'x'", "upstream private attribute ._name_or_path"),
    ("name = getattr(config, '_name_or_path', '')", "getattr(..., '_name_or_path')"),
    ("from trl.data_utils import _tokenize", "imports _tokenize from trl.data_utils"),
    ("from trl.trainer.utils import use_adapter", "internal trl.trainer.utils.use_adapter"),
    ("import torch._dynamo", "imports private module torch._dynamo"),
    ("op = torch.ops.mkldnn._linear_pointwise", "._linear_pointwise"),
    ("flag = trainer.use_weighting", "upstream internal attribute .use_weighting"),
    ("flag = self.precompute_ref_logps", "upstream internal attribute .precompute_ref_logps"),
    ("model.hf_quantizer = None", "upstream internal attribute .hf_quantizer"),
    ("trainer.ref_model = stand_in", "swaps the TRL trainer's ref_model"),
    ("class T(DPOTrainer):\n    def f(self, m):\n        self.ref_model = m", "swaps the TRL trainer's ref_model"),
])
def test_checker_reports_synthetic_offender(line, reported):
    """Each kind of offence in a module other than compat is reported; the same line inside compat is not."""
    sources = {"scorers/ours.py": OURS, "trainer_plugin/offender.py": line + "\n"}
    found = private_upstream_uses(sources)
    assert len(found) == 1 and found[0].startswith("trainer_plugin/offender.py:") and reported in found[0], found
    assert private_upstream_uses({"scorers/ours.py": OURS, COMPAT: line + "\n"}) == []


def test_checker_leaves_our_own_private_names_alone():
    callback = ("class Callback:\n    def on_step(self, trainer):\n        self.ref_model = trainer.ref_model\n"
                "        return dpo_trainer_flags(trainer).use_weighting\n")
    assert private_upstream_uses({"scorers/ours.py": OURS, "trainer_plugin/callback.py": callback}) == []
