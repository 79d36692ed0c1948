"""The package layering written in neox/__init__.py holds for every import in the code: read from the source with
ast (function-level and TYPE_CHECKING imports included), nothing imported."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import neox

ROOT = Path(__file__).resolve().parents[2]
# Layered packages live under neox/; the rest of the code sits above all of them (tests are not checked).
SCANNED = ("neox", "launcher", "tools", "benchmarks")


def layers_from_docstring(doc: str) -> dict[str, int]:
    """package -> layer, from the indented block of neox/__init__.py's docstring (lowest line = layer 0)."""
    lines = doc.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("    ") and line.strip())
    layers: dict[str, int] = {}
    for layer, line in enumerate(lines[start:]):
        if not line.startswith("    ") or not line.strip():
            break
        layers.update(dict.fromkeys(line.split(), layer))
    return layers


LAYERS = layers_from_docstring(neox.__doc__ or "")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or package, when the name is not a submodule)
    names: tuple[str, ...]  # names taken from it ("" for `import target`)
    line: int
    type_only: bool = False  # under `if TYPE_CHECKING:`: never executed, so it cannot close an import cycle


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scanned_files() -> dict[str, Path]:
    files = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(path)] = path
    return files


FILES = scanned_files()


def is_package(module: str) -> bool:
    return module in FILES and FILES[module].name == "__init__.py"


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import statement of a module, relative ones resolved; `from pkg import sub` targets the submodule."""
    found = []
    package = module if is_package(module) else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                 for stmt in node.body for inner in ast.walk(stmt)}
    for node in ast.walk(tree):
        guarded = id(node) in type_only
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, ("",), node.lineno, guarded) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in FILES:
                    found.append(Import(module, sub, ("",), node.lineno, guarded))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(module, base, tuple(plain), node.lineno, guarded))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


IMPORTS = [imp for module, path in FILES.items() for imp in imports_of(module, path)]


def is_ours(name: str) -> bool:
    return name.split(".")[0] in SCANNED


def package_of(module: str) -> str | None:
    """The layered package of a neox module (neox.entrypoint is its own), None outside neox."""
    parts = module.split(".")
    if parts[0] != "neox" or len(parts) < 2:
        return None
    return parts[1]


def layering_violations(imports: list[Import]) -> list[str]:
    out = []
    for imp in imports:
        source, target = package_of(imp.source), package_of(imp.target)
        if source is None or not is_ours(imp.target):
            continue
        where = f"{imp.source} (line {imp.line}) imports {imp.target}"
        if imp.target.split(".")[0] != "neox":
            out.append(f"{where}: neox never imports launcher/, tools/, benchmarks/ or tests/")
        elif target is None or target == source:
            continue
        elif source not in LAYERS or target not in LAYERS:
            out.append(f"{where}: {source if source not in LAYERS else target} has no layer in neox/__init__.py")
        elif LAYERS[target] > LAYERS[source]:
            out.append(f"{where}: upward ({target} is above {source})")
        elif LAYERS[target] == LAYERS[source]:
            out.append(f"{where}: {source} and {target} share a layer and stay independent")
    return out


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's algorithm."""
    graph: dict[str, set[str]] = {m: set() for m in FILES}
    for imp in imports:
        if imp.target in FILES and not imp.type_only:
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def private_name_uses(imports: list[Import]) -> list[str]:
    """`from m import _x`, `import m._x`, and `alias._x` on a name bound to another of our modules."""
    out = []
    for imp in imports:
        if not is_ours(imp.target):
            continue
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
        if private:
            out.append(f"{imp.source} (line {imp.line}) imports {imp.target}: {', '.join(private)}")
    for module, path in FILES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if is_ours(alias.name) and alias.name in FILES:
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in FILES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                out.append(f"{module} (line {node.lineno}) uses {aliases[node.value.id]}.{node.attr}")
    return out


def test_the_layering_is_declared_once_and_names_every_package():
    assert LAYERS["config"] == 0 and LAYERS["optim"] < LAYERS["parallel"] < LAYERS["checkpoint"] < LAYERS["train"]
    assert LAYERS["tokenizer"] == LAYERS["data"] == LAYERS["model"]
    packages = {package_of(m) for m in FILES if package_of(m) is not None}
    assert packages == set(LAYERS), f"packages without a layer: {packages - set(LAYERS)}; layers without a " \
                                    f"package: {set(LAYERS) - packages}"


def test_no_import_runs_upward_or_across_a_layer():
    bad = layering_violations(IMPORTS)
    assert not bad, "\n".join(bad) + "\nMove what both sides need down to a layer both may import (the layers are " \
                                     "listed in neox/__init__.py), or move the importing code up."


def test_no_import_cycle_between_modules():
    assert not (found := cycles(IMPORTS)), "\n".join(" <-> ".join(c) for c in found)


def test_no_module_imports_another_modules_private_names():
    assert not (bad := private_name_uses(IMPORTS)), "\n".join(bad)


def test_the_checks_fire_on_the_imports_they_forbid():
    # The tests above pass on clean code; these made-up imports show that each check would catch its case.
    def layering(source: str, target: str) -> list[str]:
        return layering_violations([Import(source, target, ("x",), 1)])

    assert "upward" in layering("neox.parallel.engine", "neox.train.engine")[0]
    assert "share a layer" in layering("neox.model.model", "neox.data.loader")[0]
    assert "never imports" in layering("neox.train.run", "launcher.deepy")[0]
    assert layering("neox.train.run", "neox.parallel.engine") == []
    pair = ("neox.checkpoint.consolidated", "neox.checkpoint.layout_rebuild")
    assert cycles([Import(pair[0], pair[1], ("",), 1), Import(pair[1], pair[0], ("x",), 1)]) == [sorted(pair)]
    assert private_name_uses([Import(pair[1], pair[0], ("_load",), 1)])
