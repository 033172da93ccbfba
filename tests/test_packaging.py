"""What the packages declare matches what the code does: every third-party import is a declared dependency, the
`all` extra covers every extra a user can use, the classifiers match requires-python, and the sdist carries every
folder the tests read. (`tools/check_dist.sh` builds and installs the packages; these checks need no network.)"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"cai_engine", "cai_medical", "cai_financial", "cai_legal"}
PLUGINS = sorted((ROOT / "plugins").glob("cai-*"))


def project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def imported(package: Path) -> dict[str, list[str]]:
    """Top-level names of the third-party modules ``package`` imports (at module level or inside functions), with
    the files that import each."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                where = str(path.relative_to(ROOT))
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and where not in found.get(top, []):
                    found.setdefault(top, []).append(where)
    return found


# Import names that differ from their distribution's, for when the distribution is not installed here.
NOT_INSTALLED = {"llama_cpp": "llama-cpp-python", "yaml": "PyYAML", "re2": "google-re2", "faker": "Faker"}


def distribution(module: str) -> str:
    """The distribution that provides an importable top-level name, as installed (else from NOT_INSTALLED, else the
    name itself)."""
    providers = importlib.metadata.packages_distributions().get(module) or [NOT_INSTALLED.get(module, module)]
    return canonicalize_name(providers[0])


def declared(meta: dict, *, extras: bool = True) -> set[str]:
    requirements = list(meta.get("dependencies", []))
    if extras:
        requirements += [r for group in meta.get("optional-dependencies", {}).values() for r in group]
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def expand(meta: dict, extra: str) -> set[str]:
    """The extras ``extra`` names, itself included, following cai-engine[...] references."""
    seen, todo = set(), [extra]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in map(Requirement, meta["optional-dependencies"][name]):
            if canonicalize_name(requirement.name) == canonicalize_name(meta["name"]):
                todo += sorted(requirement.extras)
    return seen


def test_every_third_party_import_of_the_core_is_declared():
    core = project(ROOT)
    allowed = declared(core)
    missing = {
        module: files for module, files in imported(ROOT / "cai_engine").items() if distribution(module) not in allowed
    }
    assert not missing, f"imported but declared in no dependency list of pyproject.toml: {missing}"


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_every_third_party_import_of_a_plugin_is_declared(plugin):
    meta = project(plugin)
    assert "cai-engine" in declared(meta, extras=False)
    allowed = declared(meta) | declared(project(ROOT), extras=False)  # the core's own dependencies come along
    package = plugin / plugin.name.replace("-", "_")
    missing = {m: f for m, f in imported(package).items() if distribution(m) not in allowed}
    assert not missing, f"{plugin.name} imports packages its pyproject.toml does not declare: {missing}"


def test_all_brings_every_extra_a_user_can_use():
    core = project(ROOT)
    extras = set(core["optional-dependencies"])
    contributors_only = {"dev", "llamacpp-server", "server", "all"}  # tests, linters, the tests' llama.cpp server
    assert expand(core, "all") - {"all"} == extras - contributors_only
    assert "dev" not in expand(core, "all")


def test_the_old_server_extra_is_an_alias_of_llamacpp_server():
    extras = project(ROOT)["optional-dependencies"]
    assert [Requirement(r) for r in extras["server"]] == [Requirement("cai-engine[llamacpp-server]")]
    assert any(Requirement(r).name == "llama-cpp-python" for r in extras["llamacpp-server"])


def python_versions(meta: dict) -> list[int]:
    """The minor versions of the ``Programming Language :: Python :: 3.N`` classifiers."""
    return sorted(
        int(m.group(1))
        for c in meta["classifiers"]
        if (m := re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c))
    )


@pytest.mark.parametrize("folder", [ROOT, *PLUGINS], ids=lambda p: "cai-engine" if p == ROOT else p.name)
def test_classifiers_name_the_pythons_requires_python_admits(folder):
    meta = project(folder)
    supported = SpecifierSet(meta["requires-python"])
    minors = python_versions(meta)
    assert minors == list(range(minors[0], minors[-1] + 1)), "a gap in the Python classifiers"
    assert all(f"3.{m}" in supported for m in minors)
    assert f"3.{minors[0] - 1}" not in supported, "the oldest Python requires-python admits has no classifier"
    assert minors == python_versions(project(ROOT)) and meta["requires-python"] == project(ROOT)["requires-python"]


def test_urls_are_the_same_for_core_and_plugins():
    urls = project(ROOT)["urls"]
    assert {"Homepage", "Documentation", "Repository", "Issues", "Changelog"} <= set(urls)
    for plugin in PLUGINS:
        theirs = project(plugin)["urls"]
        assert {k: v for k, v in theirs.items() if k != "Homepage"} == {
            k: v for k, v in urls.items() if k != "Homepage"
        }
        assert theirs["Homepage"].startswith(urls["Repository"]) and theirs["Homepage"].endswith(plugin.name)


def test_the_sdist_carries_every_folder_the_tests_read():
    """Tests reach project files through ROOT (or their file's parent's parent): each top-level name they read must be
    in the sdist's include list, or the tests fail from an unpacked sdist."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["hatch"]["build"]["targets"][
        "sdist"
    ]["include"]
    pattern = re.compile(r'(?:ROOT|root|parent\.parent|parents\[1\])\s*/\s*"([^"/]+)')
    read = {m for path in (ROOT / "tests").glob("*.py") for m in pattern.findall(path.read_text(encoding="utf-8"))}
    read |= {"plugins", "conftest.py"}  # the plugins' own tests, and the fixtures every test uses
    assert read <= {entry.strip("/") for entry in include}, f"tests read {sorted(read)}; the sdist has {include}"
