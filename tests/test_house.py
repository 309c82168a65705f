"""The house rules of shared/design.md, checked on the sources (static: nothing of the library runs).

* Imports point down: the import graph of ``ssdkit/`` and ``models/`` (installed as ``ssdkit.models``)
  has no cycle, counting imports inside functions too.
* No private name (``_x``) is imported from another module.
* No module-level mutable state: no module-level container that starts empty or that the module mutates
  (item assignment, ``append`` / ``update`` / ``setdefault`` / ...), and no ``global`` rebinding.
* A public name is one thing: nothing ``ssdkit`` exports shares its name with a submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ssdkit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ssdkit": ROOT / "ssdkit", "ssdkit.models": ROOT / "models"}  # import name -> folder
MUTATING_METHODS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add",
                    "discard", "remove", "appendleft"}
CONTAINER_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "WeakValueDictionary", "WeakKeyDictionary",
                   "WeakSet", "deque", "Counter"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the library by import name (a package by its own name), parsed."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if name == "ssdkit.models" and prefix == "ssdkit":  # never: models/ is not under ssdkit/
                continue
            out[name] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """The longest library module that ``name`` names or lies inside."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported library module, the name taken from it or None) for every import in ``module``."""
    path, tree = MODULES[module]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(m, None) for a in node.names if (m := _known(a.name))]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, path.name == "__init__.py")
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in MODULES:
                    found.append((full, None))
                elif (m := _known(source)) is not None:
                    found.append((m, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            # a module reaching a package above it (its __init__) is how Python imports it, not a cycle of ideas
            if target != m and not m.startswith(target + "."):
                edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_the_library():
    assert {"ssdkit", "ssdkit.core.scan", "ssdkit.inference.loop", "ssdkit.models.mamba2.model",
            "ssdkit.models.cli"} <= set(MODULES)
    assert ("ssdkit.core.layers", "scan_layers") in _imports("ssdkit")
    # positive control for the cycle finder
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_have_no_cycles():
    assert _cycles(_graph()) == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} imports {name} from {target}" for m in MODULES for target, name in _imports(m)
               if name and name.startswith("_") and not name.startswith("__") and target != m]
    assert private == []


def _mutable_state(tree: ast.Module) -> list[str]:
    containers = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            getattr(node, "target", None)
        value = getattr(node, "value", None)
        if not isinstance(target, ast.Name) or value is None:
            continue
        literal = isinstance(value, (ast.Dict, ast.List, ast.Set))
        call = isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) \
            in CONTAINER_CALLS
        if literal or call:
            empty = (literal and not (getattr(value, "keys", None) or getattr(value, "elts", None))) or \
                (call and not value.args and not value.keywords)
            containers[target.id] = (node.lineno, empty)
    found = [f"{name} (line {line}): an empty module-level container" for name, (line, empty) in containers.items()
             if empty]
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"global {', '.join(node.names)} (line {node.lineno})")
        mutated = None
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for t in getattr(node, "targets", None) or [node.target]:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                    mutated = t.value.id
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in MUTATING_METHODS and isinstance(node.func.value, ast.Name):
            mutated = node.func.value.id
        if mutated in containers:
            found.append(f"{mutated} (line {containers[mutated][0]}) is mutated at line {node.lineno}")
    return found


def test_no_module_level_mutable_state():
    state = [f"{m}: {item}" for m, (_, tree) in MODULES.items() for item in _mutable_state(tree)]
    assert state == []


def test_the_state_finder_finds_state():
    tree = ast.parse("A = {}\nB = {'x': 1}\nC = (1, 2)\ndef f(k):\n    B[k] = 2\n    global D\n")
    assert sorted(_mutable_state(tree)) == ["A (line 1): an empty module-level container",
                                            "B (line 2) is mutated at line 5", "global D (line 6)"]


def test_a_public_name_is_one_thing():
    folder = PACKAGES["ssdkit"]
    shadowing = [name for name in ssdkit.__all__ if (folder / f"{name}.py").exists() or (folder / name).is_dir()]
    assert shadowing == [], "exported names that are also submodules (the export shadows the module)"
