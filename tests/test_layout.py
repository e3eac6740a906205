"""The package graph and file sizes, read from the source with ``ast`` (nothing is imported).

composer (tensor code) <- index_store (loading) <- eval, demo <- server (serving, and the CLI at
the very top: ``server.cli`` is the console entry point and nothing imports it).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("composer", "index_store", "server", "demo", "eval", "bench")
MAX_LINES = 400  # per file in composer/, index_store/, server/
# Files over MAX_LINES today, with their line count now: a listed file may only shrink, and leaves
# the list once it is under MAX_LINES. Do not add to it; split the file instead.
OVER_LIMIT: dict[str, int] = {
    # (empty: server/engine.py, 543 lines, is now the server/engine/ package; server/cli.py, 407, lost
    # its load summary to server/summary.py)
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every first-party package."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def imports_of(module: str, path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level too), relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES)
    return found


IMPORTS = {m: imports_of(m, f) for m, f in MODULES.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def first_party(names: set[str]) -> set[str]:
    return {top(n) for n in names if top(n) in PACKAGES}


def test_the_scan_sees_the_packages():
    assert {"composer.model", "index_store.loader", "server.app", "server.cli", "demo.build", "eval.run",
            "bench.soak"} <= set(MODULES)
    assert "composer.modes" in IMPORTS["server.serving"] and "server.protocol" in IMPORTS["server.serving"]
    assert "server.engine" in IMPORTS["server.serving_chat"]  # a relative import, resolved


@pytest.mark.parametrize("pkg, allowed", [("composer", {"composer"}), ("index_store", {"composer", "index_store"})])
def test_lower_packages_import_only_below_them(pkg, allowed):
    bad = {m: sorted(first_party(i) - allowed) for m, i in IMPORTS.items() if top(m) == pkg}
    assert not {m: b for m, b in bad.items() if b}


def test_nothing_below_the_server_imports_it():
    bad = {m: sorted(n for n in i if top(n) == "server") for m, i in IMPORTS.items()
           if top(m) in ("composer", "index_store", "eval", "demo")}
    assert not {m: b for m, b in bad.items() if b}


def test_nothing_imports_the_cli():
    """``server.cli`` is the console entry point (``constellation = "server.cli:main"``); only tests use it."""
    bad = [m for m, i in IMPORTS.items() if m != "server.cli" and any(n == "server.cli" or n.startswith("server.cli.")
                                                                    for n in i)]
    assert not bad


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_no_cycles_between_top_level_packages():
    graph = {pkg: set() for pkg in PACKAGES}
    for m, i in IMPORTS.items():
        graph[top(m)] |= first_party(i) - {top(m)}
    assert _cycle(graph) is None, _cycle(graph)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_files_stay_small():
    sizes = {str(f.relative_to(ROOT)): _lines(f) for pkg in ("composer", "index_store", "server")
             for f in sorted((ROOT / pkg).rglob("*.py"))}
    over = {f: n for f, n in sizes.items() if n >= MAX_LINES and f not in OVER_LIMIT}
    assert not over, f"split these files (each under {MAX_LINES} lines): {over}"
    for f, listed in OVER_LIMIT.items():
        assert f in sizes, f"{f} is gone: drop it from OVER_LIMIT"
        assert sizes[f] <= listed, f"{f} grew from {listed} to {sizes[f]} lines"
        assert sizes[f] >= MAX_LINES, f"{f} is under {MAX_LINES} lines now: drop it from OVER_LIMIT"
