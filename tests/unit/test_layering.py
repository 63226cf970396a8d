"""The library's layering, read from its source: Ray only in `allmrec/distributed/`, and the
library never imports the app packages built on it (`serve_app`, `jobs`, `tune`)."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "allmrec"


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names (at any depth: the
    library imports heavy packages inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_ray_is_imported_only_in_the_distributed_layer():
    offenders = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        if "distributed" in path.relative_to(LIBRARY).parts:
            continue
        ray = sorted(m for m in _imported_modules(path) if m == "ray" or m.startswith("ray."))
        if ray:
            offenders[str(path.relative_to(LIBRARY))] = ray
    assert offenders == {}


def test_the_library_never_imports_the_apps_built_on_it():
    apps = ("serve_app", "jobs", "tune")
    offenders = {
        str(path.relative_to(LIBRARY)): sorted(modules)
        for path in sorted(LIBRARY.rglob("*.py"))
        if (modules := {m for m in _imported_modules(path) if m.split(".")[0] in apps})
    }
    assert offenders == {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, package: str) -> set[str]:
    """The allmrec modules a file imports when it is loaded (module level, not in functions:
    those are the imports that can form a cycle)."""
    names = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "allmrec"}


def test_no_import_cycle_in_the_library():
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _top_level_imports(path, package) if m in modules and m != name}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for name in sorted(graph) if (c := cycle_from(name))]
    assert cycles == []
