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
PACKAGES = ("sdpo_core", "scorers", "partitioner", "trainer_plugin", "sdpo_eval", "sdpo_cli")
# package -> the project packages it may import: sdpo_core (columns, errors, config checks, stats) is imported by
# every layer and imports none; scorers <- partitioner <- trainer_plugin; sdpo_eval (benchmarks, paired
# statistics) stands on scorers alone; the command line, sdpo_cli, is the application layer above all, and none of
# them imports it
ALLOWED = {"sdpo_core": {"sdpo_core"}, "scorers": {"sdpo_core", "scorers"},
           "partitioner": {"sdpo_core", "scorers", "partitioner"},
           "trainer_plugin": {"sdpo_core", "scorers", "partitioner", "trainer_plugin"},
           "sdpo_eval": {"sdpo_core", "scorers", "sdpo_eval"},
           "sdpo_cli": {"sdpo_core", "scorers", "partitioner", "trainer_plugin", "sdpo_eval", "sdpo_cli"}}
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
    assert not wrong, "imports against sdpo_core <- scorers <- partitioner <- trainer_plugin <- sdpo_cli:\n" + "\n".join(wrong)


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


@pytest.mark.parametrize("module", ["partitioner", "sdpo_cli.main", "sdpo_cli.verify", "sdpo_cli.stats",
                                    "partitioner.partition.folder", "sdpo_core", "sdpo_core.config",
                                    "sdpo_core.columns", "sdpo_core.stats", "sdpo_eval.paired_stats",
                                    "trainer_plugin.training_record"])
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


# Options of one name in several configs that are different options (each config's own thing, not a restatement):
# what the name means in each.
HOMONYMS = {
    "output_dir": "the folder each command writes: the job, the partition, the scored folder",
    "model": "the reference model scored with (score), M0 the pairs were scored with (crossfit), the model evaluated "
             "(truthfulqa)",
    "seed": "the random signal's seed (scoring), the order's and shuffle's seed (partition)",
    "overwrite": "start a scored folder over (default off: resume) / replace a partition (default on)",
    "batch_rows": "rows per output record batch (partition) / rows per Ray actor call",
    "limit": "loaded rows to score / TruthfulQA questions to evaluate",
    "tokenizer": "the scoring tokenizer (default the model's) / inspect's optional tokenizer (default none)",
    "json": "each command's own report as JSON",
}
# Metadata a config adds about its own use of an option, not about the option (ScoringConfig's resumption guard).
CONFIG_LOCAL_METADATA = {"guards_resume"}


def _declaration(f) -> tuple:
    import dataclasses

    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return default, {k: v for k, v in f.metadata.items() if k not in CONFIG_LOCAL_METADATA}


def test_sibling_configs_never_restate_an_option():
    """Two configs with an option of the same name declare it once, as a function returning its ``field(...)``
    (``sdpo_core.option_fields``, ``scorers.flex_attention.packed_attention_field``): one default, one help, one range
    or choices. ``max_length``/``truncation_mode`` written out in both TokenizeConfig and ScoringConfig, and
    ``dtype`` in three configs, had drifted apart (a minimum declared in one and checked by hand in the other,
    choices listed in one and only named in the help of another)."""
    import dataclasses

    declared: dict[str, list[tuple[tuple, list[str]]]] = defaultdict(list)
    for cls in _config_dataclasses():
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                continue
            same = next((owners for decl, owners in declared[f.name] if decl == _declaration(f)), None)
            if same is None:
                declared[f.name].append((_declaration(f), [cls.__name__]))
            else:
                same.append(cls.__name__)
    shared = {name for name, decls in declared.items() if sum(len(owners) for _, owners in decls) > 1}
    assert {"dtype", "max_length", "truncation_mode", "packed_attention", "batch_tokens", "device"} <= shared
    differ = {name: {owner for _, owners in decls for owner in owners} for name, decls in declared.items()
              if len(decls) > 1 and name not in HOMONYMS}
    assert not differ, f"options declared differently by several configs: {differ}"
    assert set(HOMONYMS) <= shared, f"not declared by several configs: {set(HOMONYMS) - shared}"


# Configs whose option checks are all their fields' metadata (check_ranges), their __post_init__ relating fields only
# (issue 34); the single-field checks metadata cannot say are named here.
METADATA_CHECKED = {"partitioner.scoring.config.ScoringConfig": {"rating_columns"},  # a list's length: two names
                    "partitioner.data.tokenization.TokenizeConfig": set(),
                    # an exclusive minimum (metadata's are inclusive) and a list's shape, sum and order
                    "partitioner.partition.config.PartitionConfig": {"keep_fraction", "fractions", "quantiles",
                                                                     "thresholds"},
                    "trainer_plugin.config.StepwiseConfig": set(),
                    "sdpo_cli.truthfulqa.TruthfulQACommand": set()}


@pytest.mark.parametrize("qualified", sorted(METADATA_CHECKED))
def test_option_values_are_checked_by_their_declared_metadata_only(qualified):
    """A declared range or choice is the option's check (``sdpo_core.config.check_ranges``): every one refuses a value
    outside it (``None`` too, for a choice that has a default), naming the option, and ``__post_init__`` restates
    none of them (no ``check_choice``, no ``if self.x < n: raise``), so the command line's choices, the help and
    the check cannot disagree."""
    import dataclasses
    import importlib

    from sdpo_core.errors import ConfigError

    module, name = qualified.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    class_def = next(c for c in ast.parse(MODULES[module].read_text(encoding="utf-8")).body
                     if isinstance(c, ast.ClassDef) and c.name == name)
    post_init = next(n for n in class_def.body if isinstance(n, ast.FunctionDef) and n.name == "__post_init__")
    restated = []
    for node in ast.walk(post_init):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check_choice":
            restated.append(ast.unparse(node))
        if isinstance(node, ast.If) and any(isinstance(n, ast.Raise) for n in node.body):
            fields = {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id == "self"}
            numbers = [c for n in ast.walk(node.test) if isinstance(n, ast.Compare) for c in n.comparators
                       if isinstance(c, ast.Constant) and type(c.value) in (int, float)]
            if len(fields) == 1 and numbers and not fields <= METADATA_CHECKED[qualified]:
                restated.append(ast.unparse(node.test))
    assert not restated, f"{name}.__post_init__ restates its fields' metadata: {restated}"

    checked = 0
    for f in dataclasses.fields(cls):
        outside = [(v, "must be one of") for v in ("not-a-choice", None) if "choices" in f.metadata]
        outside += [(f.metadata["min"] - 1, "must be")] if "min" in f.metadata else []
        outside += [(f.metadata["max"] + 1, "must be")] if "max" in f.metadata else []
        for value, says in outside:
            with pytest.raises(ConfigError, match=f"^{f.name} {says}"):
                cls(**{f.name: value})
            checked += 1
    assert checked >= 2
