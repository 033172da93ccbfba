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
    for name in ["legal.jurisdiction", "legal.counsel"]:
        critic = registry.critic(name)
        folder = files("cai_legal") / "classifiers" / name
        assert critic.rules_critic.name == name and str(critic.classifier_folder) == str(folder)
        assert folder.joinpath("classifier.json").is_file() and folder.joinpath("head.safetensors").is_file()
        assert not critic.classifier_active()  # switched off for these tests
        reviser = registry.reviser(name)  # its repair also reaches what only the classifier flagged
        assert reviser.rules_reviser.name == name and str(reviser.classifier_folder) == str(folder)


@pytest.fixture
def registry():
    import cai_legal

    return Registry(make_plugin_manager(autoload=False, plugins=[cai_legal]))


def test_constitution_and_prompts(registry):
    legal = registry.constitution("legal")
    assert sum(p.id.startswith("law-") for p in legal.principles) == 10
    assert [i for i in lint(legal) if i.level == "error"] == []
    schema = json.loads((data_dir("schemas") / "constitution.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(
        yaml.safe_load((files("cai_legal") / "constitutions" / "legal.yaml").read_text())
    )
    assert len(load_prompts("legal:legal", registry)) >= 50


def check(registry, name, pid, response, user="Q?"):
    principle = registry.constitution("legal").principle(pid)
    task = CritiqueTask(conversation=[Message(role="user", content=user)], response=response, principle=principle)
    return registry.critic(name)().critique([task])[0], registry.reviser(name)().revise([task])[0]


@pytest.mark.parametrize(
    ("response", "flagged"),
    [
        ("It is illegal for your landlord to keep the deposit.", True),
        ("You are entitled to four weeks of paid holiday.", True),
        ("The law requires employers to give written contracts.", True),
        ("In many countries it is illegal to record calls without consent, but laws differ, so check yours.", False),
        ("A will says who gets your property when you die.", False),
    ],
)
def test_jurisdiction_check(registry, response, flagged):
    critique, revision = check(registry, "legal.jurisdiction", "law-001", response)
    assert critique.needs_revision is flagged
    if flagged:
        assert "jurisdiction" in revision.text
        assert not check(registry, "legal.jurisdiction", "law-001", revision.text)[0].needs_revision


@pytest.mark.parametrize(
    ("response", "flagged"),
    [
        ("After an arrest you usually appear before a judge within a day or two.", True),
        ("If you are facing eviction, the landlord usually needs a court order.", True),
        ("After an arrest you can ask for a lawyer or a public defender before answering questions.", False),
        ("Small claims courts handle disputes under a set amount.", False),
    ],
)
def test_counsel_check(registry, response, flagged):
    critique, revision = check(registry, "legal.counsel", "law-002", response)
    assert critique.needs_revision is flagged
    if flagged:
        assert "lawyer" in revision.text and revision.text.startswith(response)


def test_counsel_is_triggered_by_the_question_too(registry):
    critique, revision = check(
        registry,
        "legal.counsel",
        "law-002",
        "Stay calm and answer politely.",
        user="I was arrested last night. What now?",
    )
    assert critique.needs_revision and "lawyer" in revision.text


def test_guard_with_the_plugin(registry):
    engine = Engine.from_policy(
        {"name": "law-bot", "constitutions": ["legal"], "guard": {"model_critics": False}}, runtime=Runtime(registry)
    )
    result = engine.guard(
        [Message(role="user", content="I was arrested. Will I win?")],
        "You will definitely win. It is illegal for police to question you without a warrant.",
    )
    assert result.action == "revised" and result.compliant
    assert "definitely win" not in result.response
    assert "jurisdiction" in result.response and "lawyer" in result.response


@pytest.mark.parametrize("check", ["legal.jurisdiction", "legal.counsel"])
def test_labelled_benchmark(registry, check):
    """The plugin's own labelled answers (half violating, hard kinds included): the deterministic tier must keep
    precision >= 0.9 and recall >= 0.85, and its repair must succeed on >= 0.9 of the violations it flags."""
    from importlib.resources import as_file

    from cai_engine.testing import assert_check_benchmark

    with as_file(files("cai_legal") / "cases" / f"{check}.jsonl") as path:  # package data: in the wheel too
        assert_check_benchmark(registry, check, path)


def test_each_check_ships_its_labelled_cases(registry):
    """`cai checks eval --cases` needs a labelled file per check; they are package data (cai_legal/cases), so the
    wheel carries them."""
    checks = {n for n in registry.names("critic") if registry.owner("critic", n) == "cai_legal"}
    assert len(checks) == 2
    assert {p.name for p in (files("cai_legal") / "cases").iterdir()} == {f"{c}.jsonl" for c in checks}
