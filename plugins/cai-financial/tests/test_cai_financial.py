from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from cai_engine import CritiqueTask, Message, Registry, Runtime, load_prompts, make_plugin_manager
from cai_engine.constitutions import lint
from cai_engine.engine import Engine
from cai_engine.resources import data_dir


@pytest.fixture
def registry():
    import cai_financial

    return Registry(make_plugin_manager(autoload=False, plugins=[cai_financial]))


def test_constitution_and_prompts(registry):
    from importlib.resources import files

    financial = registry.constitution("financial")
    assert sum(p.id.startswith("fin-") for p in financial.principles) == 11
    assert [i for i in lint(financial) if i.level == "error"] == []
    schema = json.loads((data_dir("schemas") / "constitution.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(
        yaml.safe_load((files("cai_financial") / "constitutions" / "financial.yaml").read_text()))
    assert len(load_prompts("financial:financial", registry)) >= 50


def check(registry, name, pid, response):
    principle = registry.constitution("financial").principle(pid)
    task = CritiqueTask(conversation=[Message(role="user", content="Q?")], response=response, principle=principle)
    return registry.critic(name)().critique([task])[0], registry.reviser(name)().revise([task])[0]


@pytest.mark.parametrize(("response", "flagged"), [
    ("This fund offers guaranteed returns of 12% a year.", True),
    ("Bitcoin is risk-free if you hold it long enough.", True),
    ("With this strategy you can't lose money.", True),
    ("Buy now and it will definitely double by Christmas.", True),
    ("No investment can guarantee returns; shares can fall as well as rise.", False),
    ("Savings accounts pay interest, and deposits are usually protected up to a limit.", False),
])
def test_guarantee_check_and_repair(registry, response, flagged):
    critique, revision = check(registry, "financial.guarantee", "fin-002", response)
    assert critique.needs_revision is flagged
    if flagged:
        recheck, _ = check(registry, "financial.guarantee", "fin-002", revision.text)
        assert not recheck.needs_revision and "past performance" in revision.text


@pytest.mark.parametrize(("response", "flagged"), [
    ("You should buy Tesla shares before the earnings call.", True),
    ("I recommend investing your bonus in the Zenith fund.", True),
    ("You should buy Tesla shares. This is general information, not personal financial advice.", False),
    ("An index fund tracks a market index and usually has low fees.", False),
])
def test_disclosure_check_and_repair(registry, response, flagged):
    critique, revision = check(registry, "financial.disclosure", "fin-001", response)
    assert critique.needs_revision is flagged
    if flagged:
        assert revision.text.startswith(response) and "not personal financial advice" in revision.text


def test_guard_with_the_plugin(registry):
    engine = Engine.from_policy({"name": "bank-bot", "constitutions": ["financial"],
                                 "guard": {"model_critics": False}}, runtime=Runtime(registry))
    result = engine.guard([Message(role="user", content="Where should my savings go?")],
                          "You should buy the Zenith fund: guaranteed returns of 10%. Card 4111 1111 1111 1111.")
    assert result.action == "revised" and result.compliant
    assert "guaranteed" not in result.response and "4111" not in result.response
    assert "not personal financial advice" in result.response
