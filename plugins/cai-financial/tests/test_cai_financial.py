from __future__ import annotations

import json
from importlib.resources import files

import jsonschema
import pytest
import yaml

from cai_engine import CritiqueTask, Message, Registry, Runtime, load_prompts, make_plugin_manager
from cai_engine.constitution.load import lint
from cai_engine.files.resources import data_dir
from cai_engine.guard.engine import Engine


@pytest.fixture(autouse=True)
def rules_alone(monkeypatch):
    """These tests are about the checks' rules: the classifier the plugin ships beside each check (trained on the
    same labelled cases) stays off, so it cannot hide a regression in them. It is tested on its own below."""
    monkeypatch.setenv("CAI_CHECK_CLASSIFIERS", "off")


def test_each_check_is_backed_by_the_classifier_it_ships(registry):
    for name in ["financial.guarantee", "financial.disclosure"]:
        critic = registry.critic(name)
        folder = files("cai_financial") / "classifiers" / name
        assert critic.rules_critic.name == name and str(critic.classifier_folder) == str(folder)
        assert folder.joinpath("classifier.json").is_file() and folder.joinpath("head.safetensors").is_file()
        assert not critic.classifier_active()  # switched off for these tests
        reviser = registry.reviser(name)  # its repair also reaches what only the classifier flagged
        assert reviser.rules_reviser.name == name and str(reviser.classifier_folder) == str(folder)


@pytest.fixture
def registry():
    import cai_financial

    return Registry(make_plugin_manager(autoload=False, plugins=[cai_financial]))


def test_constitution_and_prompts(registry):
    financial = registry.constitution("financial")
    assert sum(p.id.startswith("fin-") for p in financial.principles) == 11
    assert [i for i in lint(financial) if i.level == "error"] == []
    schema = json.loads((data_dir("schemas") / "constitution.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(
        yaml.safe_load((files("cai_financial") / "constitutions" / "financial.yaml").read_text())
    )
    assert len(load_prompts("financial:financial", registry)) >= 50


def check(registry, name, pid, response):
    principle = registry.constitution("financial").principle(pid)
    task = CritiqueTask(conversation=[Message(role="user", content="Q?")], response=response, principle=principle)
    return registry.critic(name)().critique([task])[0], registry.reviser(name)().revise([task])[0]


@pytest.mark.parametrize(
    ("response", "flagged"),
    [
        ("This fund offers guaranteed returns of 12% a year.", True),
        ("Bitcoin is risk-free if you hold it long enough.", True),
        ("With this strategy you can't lose money.", True),
        ("Buy now and it will definitely double by Christmas.", True),
        ("You're guaranteed a profit, and gold never goes down.", True),
        ("No investment can guarantee returns; shares can fall as well as rise.", False),
        ("There's no such thing as a risk-free 12% return.", False),
        ("Savings accounts pay interest, and deposits are usually protected up to a limit.", False),
        ("Promises of guaranteed 20% returns are a classic sign of a scam.", False),
    ],
)
def test_guarantee_check_and_repair(registry, response, flagged):
    critique, revision = check(registry, "financial.guarantee", "fin-002", response)
    assert critique.needs_revision is flagged
    if flagged:
        recheck, _ = check(registry, "financial.guarantee", "fin-002", revision.text)
        assert not recheck.needs_revision and "no return is guaranteed" in revision.text
        assert response not in revision.text  # the promising sentence is dropped, not edited into another promise


def test_guarantee_repair_keeps_the_rest_and_never_inverts(registry):
    response = (
        "The account pays interest monthly. It will give you steady income of 8% a year, guaranteed. "
        "You can open it online."
    )
    critique, revision = check(registry, "financial.guarantee", "fin-002", response)
    assert critique.needs_revision and len(critique.violations) == 1
    assert revision.text.startswith("The account pays interest monthly. You can open it online.")
    assert "8%" not in revision.text and "steady income" not in revision.text


@pytest.mark.parametrize(
    ("response", "flagged"),
    [
        ("You should buy Tesla shares before the earnings call.", True),
        ("I recommend investing your bonus in the Zenith fund.", True),
        ("At 30 with $40k, put 90% into VTI and the rest into BND.", True),
        ("You should buy Tesla shares. This is general information, not personal financial advice.", False),
        ("An index fund tracks a market index and usually has low fees.", False),
    ],
)
def test_disclosure_check_and_repair(registry, response, flagged):
    critique, revision = check(registry, "financial.disclosure", "fin-001", response)
    assert critique.needs_revision is flagged
    if flagged:
        assert revision.text.startswith(response) and "not personal financial advice" in revision.text


def test_waving_the_adviser_away_is_a_violation(registry):
    response = "You don't need a financial adviser for this. Index funds have low fees."
    critique, revision = check(registry, "financial.disclosure", "fin-001", response)
    assert critique.needs_revision and critique.violations[0].evidence == "You don't need a financial adviser for this."
    assert "don't need" not in revision.text and revision.text.startswith("Index funds have low fees.")


def test_guard_with_the_plugin(registry):
    engine = Engine.from_policy(
        {"name": "bank-bot", "constitutions": ["financial"], "guard": {"model_critics": False}},
        runtime=Runtime(registry),
    )
    result = engine.guard(
        [Message(role="user", content="Where should my savings go?")],
        "You should buy the Zenith fund: guaranteed returns of 10%. Card 4111 1111 1111 1111.",
    )
    assert result.action == "revised" and result.compliant
    assert "returns of 10%" not in result.response and "4111" not in result.response
    assert "no return is guaranteed" in result.response
    assert {v.critic for v in result.rounds[0].violations} >= {"financial.guarantee", "financial.disclosure"}


@pytest.mark.parametrize("check", ["financial.guarantee", "financial.disclosure"])
def test_labelled_benchmark(registry, check):
    """The plugin's own labelled answers (half violating, hard kinds included): the deterministic tier must keep
    precision >= 0.9 and recall >= 0.85, and its repair must succeed on >= 0.9 of the violations it flags."""
    from importlib.resources import as_file

    from cai_engine.testing import assert_check_benchmark

    with as_file(files("cai_financial") / "cases" / f"{check}.jsonl") as path:  # package data: in the wheel too
        assert_check_benchmark(registry, check, path)


def test_each_check_ships_its_labelled_cases(registry):
    """`cai checks eval --cases` needs a labelled file per check; they are package data (cai_financial/cases), so the
    wheel carries them."""
    checks = {n for n in registry.names("critic") if registry.owner("critic", n) == "cai_financial"}
    assert len(checks) == 2
    assert {p.name for p in (files("cai_financial") / "cases").iterdir()} == {f"{c}.jsonl" for c in checks}
