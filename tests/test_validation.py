"""Validation that reports every problem of a file at once, each as ``file:line: field.path: message`` with a
"did you mean" for misspelt keys and names (constitutions and policies, the Python API and the CLI)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from cai_engine import ConfigError, ConstitutionError, Registry, make_plugin_manager
from cai_engine.cli import cli
from cai_engine.cli.base import reset_state
from cai_engine.constitution.load import check_constitution, load_constitution
from cai_engine.constitution.problems import ConstitutionProblems, PolicyProblems, Problem, did_you_mean
from cai_engine.guard.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("cai_medical", "cai_financial", "cai_legal")
SHIPPED = sorted(glob.glob(str(ROOT / "constitutions" / "*.yaml"))) + sorted(
    glob.glob(str(ROOT / "plugins" / "cai-*" / "cai_*" / "constitutions" / "*.yaml"))
)

TWO_PROBLEMS = """name: x
version: "1"
principles:
  - id: a
    critque_request: c
    weight: heavy
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def domain_registry():
    modules = [pytest.importorskip(name) for name in DOMAINS]
    return Registry(make_plugin_manager(autoload=False, plugins=modules))


@pytest.fixture
def domain_cli(cli_runner, monkeypatch):
    modules = [pytest.importorskip(name) for name in DOMAINS]
    monkeypatch.setenv("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")  # the same modules must not also come by entry point
    reset_state(plugins=modules)
    return cli_runner


def test_every_schema_problem_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, "two.yaml", TWO_PROBLEMS)
    with pytest.raises(ConstitutionProblems) as info:
        load_constitution(path)
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (5, "principles[0].critque_request"),
        (6, "principles[0].weight"),
    ]
    assert str(problems[0]) == (
        f"{path}:5: principles[0].critque_request: unknown key; did you mean 'critique_request'?"
    )
    assert str(problems[1]).startswith(f"{path}:6: principles[0].weight: Input should be a valid number")
    assert isinstance(info.value, ConstitutionError) and "2 problems" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_names_are_reported_with_the_schema_problems(tmp_path, cai_registry):
    path = write(
        tmp_path,
        "names.yaml",
        TWO_PROBLEMS.replace('version: "1"\n', 'version: "1"\nextends: [harmles]\n') + "    checks: [rulez]\n",
    )
    checked = cai_registry.check_constitution(path)
    assert checked.constitution is None
    shown = [str(p) for p in checked.problems]
    assert shown[0] == f"{path}:3: extends[0]: unknown parent constitution 'harmles'; did you mean 'harmless'?"
    assert shown[-1].startswith(f"{path}:8: principles[0].checks[0]: unknown check 'rulez'; did you mean 'rules'")
    assert len(shown) == 4


def test_unknown_check_fails_validation_and_lists_the_closest(tmp_path, domain_cli):
    path = write(
        tmp_path,
        "checks.yaml",
        'name: c\nversion: "1"\nextends: harmless\nprinciples:\n  - id: c-1\n    critique_request: c\n'
        "    revision_request: r\n    comparison: q\n    checks: [medical.phl, acme.nope]\n",
    )
    result = domain_cli.invoke(cli, ["constitutions", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:9: principles[0].checks[0]: unknown check 'medical.phl'; did you mean 'medical.phi'" in (
        result.output
    )
    assert f"{path}:9: principles[0].checks[1]: unknown check 'acme.nope'; known checks: " in result.output
    assert "1 of 1 file(s) failed validation" in result.output and "ok " not in result.output


def test_extends_and_remove_suggest_what_exists(tmp_path, cai_registry):
    path = write(
        tmp_path,
        "child.yaml",
        'name: child\nversion: "1"\nextends: [harmless, helpfull-first]\nprinciples: []\n',
    )
    problems = cai_registry.check_constitution(path).problems
    assert [str(p) for p in problems] == [
        f"{path}:3: extends[1]: unknown parent constitution 'helpfull-first'; did you mean 'helpful-first'?"
    ]
    path.write_text('name: child\nversion: "1"\nextends: harmless\nremove: [harm-0012]\n', encoding="utf-8")
    problems = cai_registry.check_constitution(path).problems
    assert str(problems[0]) == (
        f"{path}:4: remove[0]: 'remove' names 'harm-0012', which no parent defines; did you mean 'harm-012'?"
    )


def test_lint_problems_point_at_the_file_and_line_that_defines_the_principle(tmp_path):
    parent = write(
        tmp_path,
        "parent.yaml",
        'name: parent\nversion: "1"\nprinciples:\n  - id: a\n    critique_request: c\n    revision_request: r\n'
        "    comparison: q\n    conflicts_with: [bb]\n  - {id: b, critique_request: c, revision_request: r, "
        "comparison: q}\n",
    )
    child = write(
        tmp_path,
        "child.yaml",
        'name: child\nversion: "1"\nextends: parent.yaml\nprinciples:\n  - id: c\n    comparison: q\n',
    )
    checked = check_constitution(child)
    shown = [str(p) for p in checked.problems]
    assert (
        f"{parent}:8: principles[0].conflicts_with[0]: warning: 'bb' matches no other principle's id or tag"
        in (shown[0])
    )
    assert f"{child}:5: principles[0].critique_request: is missing" in shown[1]
    assert [p.level for p in checked.problems] == ["warning", "error", "error"]


def test_validate_prints_every_problem_of_each_file(cli_runner, tmp_path):
    bad = write(tmp_path, "bad.yaml", TWO_PROBLEMS)
    result = cli_runner.invoke(cli, ["constitutions", "validate", str(bad)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"{bad}:5: principles[0].critque_request: unknown key; did you mean 'critique_request'?"
    assert lines[1].startswith(f"{bad}:6: principles[0].weight: ")
    assert lines[2:] == ["Error: 1 of 1 file(s) failed validation"]


def test_misspelt_constitution_names_get_a_suggestion(cli_runner, cai_registry):
    result = cli_runner.invoke(cli, ["constitutions", "show", "harmles"])
    assert result.exit_code == 1
    assert result.output.strip().endswith("did you mean 'harmless'?")
    with pytest.raises(KeyError, match="did you mean 'helpful-first'"):
        cai_registry.constitution("helpfull-first")


def test_misspelt_domain_constitution_name(domain_cli):
    result = domain_cli.invoke(cli, ["constitutions", "show", "medicl"])
    assert result.exit_code == 1 and "unknown constitution 'medicl'" in result.output
    assert "did you mean 'medical'?" in result.output


@pytest.mark.parametrize("path", SHIPPED, ids=[Path(p).stem for p in SHIPPED])
def test_shipped_constitutions_are_clean_under_strict(domain_registry, path):
    checked = domain_registry.check_constitution(path)
    assert checked.constitution is not None
    assert [str(p) for p in checked.problems] == []


def test_shipped_constitutions_pass_the_strict_command(domain_cli):
    assert len(SHIPPED) >= 8
    result = domain_cli.invoke(cli, ["constitutions", "validate", "--strict", *SHIPPED])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok ") == len(SHIPPED)


POLICY = """name: p
constitutions: [harmles, helpful-first]
disable: [harm-0011]
guard:
  actoin: flag
  max_rounds: lots
"""


def test_policy_schema_problems_come_with_unknown_names(tmp_path, cai_registry):
    path = write(tmp_path, "p.yaml", POLICY)
    with pytest.raises(PolicyProblems) as info:
        load_policy(path, registry=cai_registry)
    assert [str(p) for p in info.value.problems][:3] == [
        f"{path}:2: constitutions[0]: unknown constitution 'harmles'; did you mean 'harmless'?",
        f"{path}:5: guard.actoin: unknown key; did you mean 'action'?",
        f"{path}:6: guard.max_rounds: Input should be a valid integer, unable to parse string as an integer",
    ]
    assert isinstance(info.value, ConfigError)


def test_policy_validate_reports_ids_tags_and_checks_together(tmp_path, cli_runner):
    path = write(
        tmp_path,
        "p.yaml",
        "name: p\nmodel: none\nconstitutions: [harmless]\ndisable: [harm-0011]\ndisable_tags: [cautoin]\n"
        "override:\n  harm-0012: {authority: 3}\nadd:\n  - id: x-1\n    title: X\n    phases: [runtime]\n"
        "    checks: [rulez]\nguard:\n  on_failure: refuse\n",
    )
    result = cli_runner.invoke(cli, ["policy", "validate", str(path)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:4] == [
        f"{path}:4: disable[0]: names principle 'harm-0011', which none of its constitutions defines; "
        "did you mean 'harm-011'?",
        f"{path}:5: disable_tags[0]: names 'cautoin', which no principle carries (a typo would leave principles "
        "on); did you mean 'caution'?",
        f"{path}:7: override.harm-0012: names principle 'harm-0012', which none of its constitutions defines; "
        "did you mean 'harm-012'?",
        f"{path}:12: add[0].checks[0]: unknown check 'rulez'; did you mean 'rules'?",
    ]
    assert lines[4:] == ["Error: 1 of 1 policy file(s) failed validation"]


def test_policy_names_a_misspelt_constitution(tmp_path, cli_runner):
    path = write(tmp_path, "p.yaml", "name: p\nconstitutions: [harmless, helpfull-first]\n")
    result = cli_runner.invoke(cli, ["policy", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: constitutions[1]: unknown constitution 'helpfull-first'; did you mean 'helpful-first'?" in (
        result.output
    )


def test_did_you_mean():
    assert did_you_mean("medicl", ["medical", "legal"]) == "; did you mean 'medical'?"
    assert did_you_mean("zzz", ["medical"]) == ""
    assert did_you_mean("zzz", ["b", "a"], listing="known") == "; known: a, b"
    assert str(Problem("m", source="f.yaml", path="a.b", line=3, level="warning")) == "f.yaml:3: a.b: warning: m"
    assert str(Problem("m", source="f.yaml")) == "f.yaml: m"
