"""The import graph of cai_engine has no cycle and no import of the package root, and docs/architecture.md is what
tools/architecture.py draws from it (the layers themselves are import-linter's contracts, run by `make lint`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("architecture", ROOT / "tools" / "architecture.py")
assert _spec is not None and _spec.loader is not None
architecture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(architecture)


@pytest.fixture(scope="module")
def graph():
    return architecture.build_graph()


def test_no_import_cycle(graph):
    assert architecture.import_cycles(graph) == []


def test_no_module_imports_the_package_root(graph):
    assert architecture.root_importers(graph) == []


def test_built_in_plugins_import_only_the_public_api(graph):
    """A built-in is shaped like a third-party plugin: what it needs from the core is public."""
    assert architecture.builtin_private_imports(graph) == []


def test_the_built_in_check_finds_a_private_import():
    graph = grimp.ImportGraph()
    graph.add_import(importer="cai_engine.default_plugins.x", imported="cai_engine.models.runtime")
    graph.add_import(importer="cai_engine.default_plugins.x", imported="cai_engine")
    graph.add_import(importer="cai_engine.default_plugins.y", imported="cai_engine.text.layouts")
    assert architecture.builtin_private_imports(graph) == ["cai_engine.default_plugins.x -> cai_engine.models.runtime"]
    assert architecture.root_importers(graph) == []


def test_the_public_api_imports_no_upper_layer(graph):
    assert architecture.root_reaches_up(graph) == []
    fake = grimp.ImportGraph()
    fake.add_import(importer="cai_engine", imported="cai_engine.pipeline")
    fake.add_import(importer="cai_engine", imported="cai_engine.models.runtime")
    assert architecture.root_reaches_up(fake) == ["cai_engine -> cai_engine.pipeline"]


def test_no_re_export_shims(tmp_path):
    assert architecture.reexports() == []
    (tmp_path / "cai_engine").mkdir()
    (tmp_path / "cai_engine" / "a.py").write_text("x = 1\nfrom cai_engine.b import y  # noqa: E402, F401\n")
    assert architecture.reexports(tmp_path / "cai_engine") == ["cai_engine/a.py:2"]


def test_no_module_imports_another_modules_private_name():
    assert architecture.private_imports() == []


def test_the_private_import_check_finds_one(tmp_path):
    (tmp_path / "cai_engine").mkdir()
    (tmp_path / "cai_engine" / "a.py").write_text("from cai_engine.b import _hidden, public\n")
    assert architecture.private_imports(tmp_path / "cai_engine") == ["cai_engine/a.py: cai_engine.b._hidden"]


def test_architecture_page_is_up_to_date(graph):
    page = (ROOT / architecture.PAGE).read_text(encoding="utf-8")
    assert page == architecture.render(graph), "run `python tools/architecture.py --write docs/architecture.md`"


def test_the_checks_find_cycles_and_root_imports():
    graph = grimp.ImportGraph()
    for importer, imported in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]:
        graph.add_import(importer=f"cai_engine.{importer}", imported=f"cai_engine.{imported}")
    graph.add_import(importer="cai_engine.d", imported="cai_engine")
    assert architecture.import_cycles(graph) == [["cai_engine.a", "cai_engine.b", "cai_engine.c"]]
    assert architecture.root_importers(graph) == ["cai_engine.d"]


def test_the_diagram_boxes_each_layer_with_its_packages(graph):
    """The page's mermaid flowchart has one box per layer of pyproject.toml's contract, holding that layer's
    packages, and an arrow for each import between packages that no other path implies."""
    page = architecture.render(graph)
    diagram = page.split("```mermaid\n", 1)[1].split("```", 1)[0]
    boxes = re.findall(r'subgraph layer\d+ \["layer \d+"\]\n        direction LR\n((?:        \w+\n)+)    end', diagram)
    assert [box.split() for box in boxes] == architecture.layers()
    assert "    cli --> pipeline\n" in diagram
