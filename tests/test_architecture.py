"""The shape of the code: one-way dependencies, no import cycles, no private names across modules, small modules,
options declared once.

Every module's imports are read from its source (module level and inside functions, by AST), never by importing.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("scorers", "partitioner", "trainer_plugin", "sdpo_cli")
# package -> the project packages it may import (scorers <- partitioner <- trainer_plugin; the command line,
# sdpo_cli, is the application layer above all three, and none of them imports it)
ALLOWED = {"scorers": {"scorers"}, "partitioner": {"scorers", "partitioner"},
           "trainer_plugin": {"scorers", "partitioner", "trainer_plugin"},
           "sdpo_cli": {"scorers", "partitioner", "trainer_plugin", "sdpo_cli"}}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import statement, wherever it is."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            out += [(f"{target}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                out.append((target, rest, node.lineno))
    return out


def _project_edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            if target.split(".")[0] in PACKAGES and target in MODULES and target != module:
                edges[module].add(target)
    return edges


def test_dependencies_point_one_way():
    wrong = []
    for module, path in MODULES.items():
        pkg = module.split(".")[0]
        for target, _, line in _imports(module, path):
            top = target.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[pkg]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against scorers <- partitioner <- trainer_plugin <- sdpo_cli:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    edges = _project_edges()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_crosses_modules():
    crossing = []
    for module, path in MODULES.items():
        for target, names, line in _imports(module, path):
            if target.split(".")[0] not in PACKAGES or target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and part != "__main__" for part in target.split(".")):
                crossing.append(f"{path.relative_to(ROOT)}:{line} takes {private or target} from {target}")
    assert not crossing, "\n".join(crossing)


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("module", ["partitioner", "sdpo_cli.main", "sdpo_cli.verify",
                                    "sdpo_cli.stats", "partitioner.partition.folder"])
def test_light_modules_import_no_heavy_package(module):
    """What ``sdpo --help``/``verify``/``stats`` import at module level reaches no torch/transformers/TRL import."""
    heavy = ("torch", "transformers", "trl", "vllm", "ray", "datasets")
    seen, todo, found = set(), [module], []
    while todo:
        m = todo.pop()
        if m in seen or m not in MODULES:
            continue
        seen.add(m)
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: function bodies run when a command needs them
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                t = _resolve(m, MODULES[m], node)
                targets = [t] + [f"{t}.{a.name}" for a in node.names]
            for t in targets:
                if t.split(".")[0] in heavy:
                    found.append(f"{m} -> {t}")
                todo.append(t)
                parent = t.rsplit(".", 1)[0]
                while parent and parent in MODULES:  # importing a.b.c runs a/__init__ and a/b/__init__
                    todo.append(parent)
                    parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    assert not found, found


def _config_dataclasses() -> list[type]:
    """Every config dataclass of the project (``*Config``, ``*Command``), imported."""
    import dataclasses
    import importlib

    found = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith(("Config", "Command"))]
        if names:
            mod = importlib.import_module(module)
            found.update({f"{module}.{n}": getattr(mod, n) for n in names if dataclasses.is_dataclass(getattr(mod, n))})
    return list(found.values())


def test_a_composition_never_restates_an_option_of_its_parts():
    """A config that nests others (``RunConfig``, the commands' configs) declares only what its parts lack: an
    option restated beside the config that owns it is how ``sdpo partition`` once scored with other settings than
    ``sdpo score``."""
    import dataclasses

    restated, compositions = [], 0
    for cls in _config_dataclasses():
        sections = [f for f in dataclasses.fields(cls) if "section" in f.metadata]
        compositions += bool(sections)
        own = {f.name for f in dataclasses.fields(cls) if "section" not in f.metadata}
        for f in sections:
            for leaf in dataclasses.fields(f.metadata["section"]):
                if leaf.name in own:
                    restated.append(f"{cls.__name__}.{leaf.name} restates {f.metadata['section'].__name__}.{leaf.name}")
    assert compositions >= 4, "RunConfig and the score/partition/inspect commands are compositions"
    assert not restated, restated


def test_loader_options_are_declared_once():
    """The loader's options live in LoadConfig; its functions take that config (or its fields as keywords)."""
    import dataclasses
    import inspect

    from partitioner.data import loading

    options = {f.name for f in dataclasses.fields(loading.LoadConfig)}
    for fn in (loading.load_preferences, loading.load_preferences_with_rejects):
        assert not options & set(inspect.signature(fn).parameters), fn.__name__
