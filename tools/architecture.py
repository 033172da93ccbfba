"""The architecture of cai_engine, read from its import graph (imports under ``if TYPE_CHECKING:`` left out).

    python tools/architecture.py                                # fail on import cycles, imports of the root and
                                                                # imports of another module's private names
    python tools/architecture.py --write docs/architecture.md   # the same, then regenerate the architecture page
    python tools/architecture.py --check docs/architecture.md   # the same, and fail if the page is stale

The layers come from the `layers` contract in pyproject.toml, which `lint-imports` enforces.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import grimp
from importlinter.api import read_configuration

PACKAGE = "cai_engine"
PROJECT = Path(__file__).resolve().parent.parent
PAGE = "docs/architecture.md"
sys.path.insert(0, str(PROJECT))  # the checkout's cai_engine, whichever the environment has installed


def build_graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every module-level import cycle: Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return sorted(cycles)


BUILTINS = f"{PACKAGE}.default_plugins"
PUBLIC_MODULES = (f"{PACKAGE}.text.layouts",)  # public besides the root's names (see cai_engine/__init__.py)


def root_importers(graph: grimp.ImportGraph) -> list[str]:
    """Modules that import the package root, the public API that itself imports everything. The built-in plugins
    are the exception: like any plugin, they import the public API, which imports none of them."""
    return sorted(
        m
        for m in graph.find_modules_that_directly_import(PACKAGE)
        if m != BUILTINS and not m.startswith(BUILTINS + ".")
    )


def root_reaches_up(graph: grimp.ImportGraph) -> list[str]:
    """Imports by the public API (the package root) of a layer at or above the built-in plugins, which import it."""
    top = layers()
    builtins_layer = next(i for i, layer in enumerate(top) if "default_plugins" in layer)
    above = {package for layer in top[: builtins_layer + 1] for package in layer}
    return sorted(
        f"{PACKAGE} -> {m}" for m in graph.find_modules_directly_imported_by(PACKAGE) if m.split(".")[1] in above
    )


def builtin_private_imports(graph: grimp.ImportGraph) -> list[str]:
    """Imports by a built-in plugin of anything but the public API and its own modules."""
    found = []
    for module in sorted(m for m in graph.modules if m == BUILTINS or m.startswith(BUILTINS + ".")):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            public = (
                imported in (PACKAGE, *PUBLIC_MODULES) or imported == BUILTINS or imported.startswith(BUILTINS + ".")
            )
            if imported.startswith(PACKAGE) and not public:
                found.append(f"{module} -> {imported}")
    return found


def private_imports(root: Path = PROJECT / PACKAGE) -> list[str]:
    """``from cai_engine.x import _name`` anywhere in the package: a module using another module's private name."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(root.parent).as_posix()}: {node.module}.{alias.name}")
    return found


def reexports(root: Path = PROJECT / PACKAGE) -> list[str]:
    """Imports kept only to re-export a name from elsewhere (silenced with ``noqa: F401`` or ``E402``); the one
    allowed is the CLI importing its command modules so that they register their commands."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"noqa: ?(F401|E402)", line) and "registers its command" not in line:
                found.append(f"{path.relative_to(root.parent).as_posix()}:{number}")
    return found


def layers() -> list[list[str]]:
    """The layers contract of pyproject.toml, top to bottom, each layer a list of sibling packages."""
    config = read_configuration(str(PROJECT / "pyproject.toml"))
    contract = next(c for c in config["contracts_options"] if c["type"] == "layers")
    return [[name.strip() for name in re.split(r"[|:]", layer)] for layer in contract["layers"]]


def package_edges(graph: grimp.ImportGraph) -> set[tuple[str, str]]:
    """(importer, imported) between the root's children, the root itself included as ``cai_engine``."""

    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else PACKAGE

    edges = {(package(m), package(i)) for m in graph.modules for i in graph.find_modules_directly_imported_by(m)}
    return {(a, b) for a, b in edges if a != b}


def upward(edge: tuple[str, str], order: dict[str, int]) -> bool:
    """Whether an import breaks the layering: onto its own layer or one above (the root counts as the top)."""
    return order.get(edge[0], len(order)) >= order.get(edge[1], len(order))


def reachable(start: str, edges: set[tuple[str, str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for a, b in edges:
            if a == node and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def reduce(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Drop each edge that another path already implies (a transitive reduction, for a readable diagram)."""
    kept = set(edges)
    for edge in sorted(edges):
        if edge[1] in reachable(edge[0], kept - {edge}):
            kept.discard(edge)
    return kept


def summary(package: str) -> str:
    """The first paragraph of a package's (or module's) docstring, on one line, in Markdown."""
    path = PROJECT / PACKAGE / package
    source = (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")
    doc = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or ""
    return re.sub(r":\w+:`", "`", " ".join(doc.split("\n\n")[0].split())).replace("``", "`")


def layer_boxes(layered: list[list[str]]) -> list[str]:
    """The diagram's layers: one box (a mermaid subgraph) per layer of sibling packages, side by side in it."""
    lines = []
    for number, layer in enumerate(layered, 1):
        lines += [
            f'    subgraph layer{number} ["layer {number}"]',
            "        direction LR",
            *(f"        {p}" for p in layer),
            "    end",
        ]
    return lines


def render(graph: grimp.ImportGraph) -> str:
    """The architecture page."""
    layered = layers()
    order = {p: i for i, layer in enumerate(layered) for p in layer} | {PACKAGE: -1}
    packages = sorted(
        (c.split(".")[1] for c in graph.find_children(PACKAGE)), key=lambda p: (order.get(p, len(order)), p)
    )
    edges = package_edges(graph)
    allowed = reduce({e for e in edges if not upward(e, order)})
    arrows = [f"    {a} --> {b}" for a, b in sorted(allowed)]
    arrows += [f"    {a} -. breaks the layers .-> {b}" for a, b in sorted(edges) if upward((a, b), order)]
    return "\n".join(
        [
            "# Architecture",
            "",
            f"<!-- Generated by `python tools/architecture.py --write {PAGE}` from the code; do not edit. -->",
            "",
            "`cai_engine` is built in layers. A module imports only from layers below its own, packages on one layer",
            "do not import each other, and no import cycle exists between modules. `cai_engine/__init__.py` is the",
            "public API: it imports from the layers below the built-in plugins, and only the built-in plugins import",
            "it, as any plugin does (they import nothing else of the core but the prompt layouts). `make lint`",
            "enforces all of this (the contracts under `[tool.importlinter]` in `pyproject.toml`, and",
            "`tools/architecture.py`).",
            "",
            "## Layers, top to bottom",
            "",
            "```",
            *(" | ".join(layer) for layer in layered),
            "```",
            "",
            *(line for p in packages for line in (f"**`{p}`**: {summary(p)}", "")),
            "## Dependencies",
            "",
            "Each box is a layer, top to bottom as above, `cai_engine` (the public API) on its own. An arrow points",
            "from the importer to what it imports; arrows that another path implies are left out.",
            "",
            "```mermaid",
            "flowchart TD",
            *layer_boxes(layered),
            *arrows,
            "```",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="PAGE", help="regenerate the architecture page")
    action.add_argument("--check", metavar="PAGE", help="fail if the architecture page is not what --write writes")
    args = parser.parse_args(argv)
    graph = build_graph()
    problems = [f"import cycle among: {', '.join(cycle)}" for cycle in import_cycles(graph)]
    problems += [f"imports the package root {PACKAGE}: {module}" for module in root_importers(graph)]
    problems += [f"imports a private name: {where}" for where in private_imports()]
    problems += [f"a re-export shim: {where}" for where in reexports()]
    problems += [f"the public API imports an upper layer: {edge}" for edge in root_reaches_up(graph)]
    problems += [f"a built-in imports beyond the public API: {edge}" for edge in builtin_private_imports(graph)]
    page = render(graph)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(page, encoding="utf-8")
    elif args.check and (not Path(args.check).is_file() or Path(args.check).read_text(encoding="utf-8") != page):
        problems.append(f"{args.check} is stale: run `python tools/architecture.py --write {args.check}`")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
