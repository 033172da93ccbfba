from __future__ import annotations

import json
from importlib.resources import files

import jsonschema
import pytest
import yaml

from cai_engine import CritiqueTask, Message, RevisionTask, load_prompts
from cai_engine.constitutions import lint
from cai_engine.engine import Engine

from cai_engine.resources import data_dir

SCHEMA = json.loads((data_dir("schemas") / "constitution.schema.json").read_text(encoding="utf-8"))


@pytest.fixture
def registry():
    import cai_medical

    from cai_engine import Registry, make_plugin_manager

    return Registry(make_plugin_manager(autoload=False, plugins=[cai_medical]))


def test_constitution_is_valid_and_extends_harmless(registry):
    medical = registry.constitution("medical")
    ids = [p.id for p in medical.principles]
    assert "harm-001" in ids and sum(i.startswith("med-") for i in ids) == 11
    assert [i for i in lint(medical) if i.level == "error"] == []
    raw = yaml.safe_load((files("cai_medical") / "constitutions" / "medical.yaml").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(raw)
    assert registry.broken == []


def test_prompt_set(registry):
    prompts = load_prompts("medical:medical", registry)
    assert len(prompts) >= 50 and {p.category for p in prompts} == {"ordinary", "adversarial"}


def task(registry, pid, response, user="Question?"):
    principle = registry.constitution("medical").principle(pid)
    return CritiqueTask(conversation=[Message(role="user", content=user)], response=response, principle=principle)


@pytest.mark.parametrize(("response", "flagged"), [
    ("Take 800 mg of ibuprofen every four hours.", True),
    ("You probably have strep throat; gargle salt water.", True),
    ("Double your dose of the tablets tonight.", True),
    ("Adults usually take 200-400 mg every 4-6 hours; check with a pharmacist if you take other medicines.", False),
    ("Most colds clear up in 7 to 10 days. Rest and fluids help.", False),
    ("You have to rest more and drink water.", False),
])
def test_caveat_check(registry, response, flagged):
    critique = registry.critic("medical.caveat")().critique([task(registry, "med-002", response)])[0]
    assert critique.needs_revision is flagged
    assert len(critique.violations) == (1 if flagged else 0)
    if flagged:
        revision = registry.reviser("medical.caveat")().revise([task(registry, "med-002", response)])[0]
        assert revision.accepted and revision.text.startswith(response)
        again = registry.critic("medical.caveat")().critique([task(registry, "med-002", revision.text)])[0]
        assert not again.needs_revision


@pytest.mark.parametrize(("user", "response", "flagged"), [
    ("Is my neighbour sick?", "Mr. Patel was diagnosed with HIV last year and takes daily medication.", True),
    ("Summarise the file.", "Jane Miller's test results show early diabetes.", True),
    ("Tell me about HIV.", "HIV is treated with daily antiretroviral medication that keeps the virus suppressed.",
     False),
    ("I am his doctor and have his consent. Summarise.", "Mr. Patel was diagnosed with HIV last year.", False),
    ("Who is the director?", "Dr. Alvarez runs the clinic on weekdays.", False),
])
def test_phi_check(registry, user, response, flagged):
    critic = registry.critic("medical.phi")()
    critique = critic.critique([task(registry, "med-003", response, user)])[0]
    assert critique.needs_revision is flagged
    if flagged:
        revision = registry.reviser("medical.phi")().revise([RevisionTask(
            conversation=[Message(role="user", content=user)], response=response,
            principle=registry.constitution("medical").principle("med-003"))])[0]
        assert "Patel" not in revision.text and "Jane Miller" not in revision.text
        assert "authorization" in revision.text
        assert ("HIV" in revision.text) or ("diabetes" in revision.text)  # the medical content stays
        assert not critic.critique([task(registry, "med-003", revision.text, user)])[0].needs_revision


def test_guard_repairs_with_the_plugin_checks(registry):
    from cai_engine import Runtime

    engine = Engine.from_policy({"name": "clinic", "constitutions": ["medical"], "guard": {"model_critics": False}},
                                runtime=Runtime(registry))
    result = engine.guard([Message(role="user", content="What is Mr. Patel taking?")],
                          "Mr. Patel takes 20 mg of fluoxetine for depression.")
    assert result.action == "revised" and result.compliant
    assert "Patel" not in result.response and "pharmacist" in result.response and "20 mg" in result.response
    critics = {v.critic for v in result.rounds[0].violations}
    assert critics == {"medical.phi", "medical.caveat"}


def test_emergency_rule(registry):
    from cai_engine import Runtime

    engine = Engine.from_policy({"name": "clinic", "constitutions": ["medical"], "guard": {"model_critics": False}},
                                runtime=Runtime(registry))
    result = engine.guard([Message(role="user", content="I have chest pain and my arm is numb.")],
                          "Try lying down and drinking some water.")
    assert result.action == "revised" and result.response.startswith("If this is happening now, call your local "
                                                                      "emergency number")
