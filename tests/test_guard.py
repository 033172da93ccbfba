from __future__ import annotations

import asyncio
import json
import re

import pytest
import yaml

from cai_engine import ChatPrompt, ConfigError, Message, UnknownComponentError, hookimpl
from cai_engine.cli import cli
from cai_engine.guard.engine import Engine
from cai_engine.guard.policy import load_policy

CONV = [Message(role="user", content="Why was I charged twice?")]
CARD = "Sorry about that! Your card 4111 1111 1111 1111 was charged twice; a refund is on its way."
CLEAN = "Sorry about that! I've asked billing to look at the duplicate charge on the card ending 1111."


def rules_policy(tmp_path, **guard):
    return {
        "name": "acme-support",
        "version": "3",
        "constitutions": ["customer-service"],
        "disable_tags": ["tone"],
        "disable": ["cs-005"],
        "override": {"cs-003": {"authority": 95}},
        "add": [
            {
                "id": "acme-001",
                "title": "No internal ticket links",
                "phases": ["runtime"],
                "authority": 60,
                "rules": [
                    {
                        "id": "acme-001-link",
                        "kind": "forbid",
                        "pattern": r"https?://tickets\.acme\.internal\S*",
                        "message": "Internal ticket link shown to a customer.",
                        "fix": "[internal link removed]",
                    }
                ],
            },
            {
                "id": "acme-002",
                "title": "Sign off with the team name",
                "phases": ["runtime"],
                "authority": 40,
                "rules": [
                    {
                        "id": "acme-002-sign",
                        "kind": "require",
                        "pattern": "— Acme Support",
                        "message": "Missing sign-off.",
                        "fix": "— Acme Support",
                    }
                ],
            },
        ],
        "guard": {"model_critics": False, **guard},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }


@pytest.fixture
def engine(cai_runtime, tmp_path):
    eng = Engine.from_policy(rules_policy(tmp_path), runtime=cai_runtime)
    yield eng
    eng.close()


def test_the_guard_threshold_goes_to_a_model_critic_and_not_to_a_calibrated_classifier(cai_runtime, tmp_path):
    model_policy = rules_policy(tmp_path, model_critics=True, threshold=0.7)
    assert Engine.from_policy(model_policy, runtime=cai_runtime).components.critic_ref.options["threshold"] == 0.7
    classifier_policy = {**model_policy, "critic": {"name": "classifier", "options": {"path": str(tmp_path / "c")}}}
    options = Engine.from_policy(classifier_policy, runtime=cai_runtime).components.critic_ref.options
    assert "threshold" not in options  # None: the classifier's calibrated threshold


def test_policy_resolution(engine):
    ids = [p.id for p in engine.constitution.principles]
    assert "cs-005" not in ids and "cs-001" not in ids  # disabled by id and by tag ("tone")
    assert {"acme-001", "acme-002", "cs-004"} <= set(ids)
    assert engine.constitution.principle("cs-003").authority == 95
    assert engine.constitution.stance.value == "helpfulness-first"
    assert engine.policy_info["constitution_hash"].startswith("sha256:")


def test_rules_guard_repairs_and_audits(engine, tmp_path):
    seen = []

    class Observer:
        @hookimpl
        def cai_on_record(self, record, kind):
            seen.append((kind, record["id"]))

    engine.runtime.pm.register(Observer())
    result = engine.guard(CONV, CARD + " See https://tickets.acme.internal/T-99 for details.")
    assert result.action == "revised" and result.compliant and result.violations == []
    assert "4111" not in result.response and "tickets.acme.internal" not in result.response
    assert result.response.endswith("— Acme Support")
    first = {v.rule_id for v in result.rounds[0].violations}
    assert first == {"cs-004-card", "acme-001-link", "acme-002-sign"}
    order = [r["principle_id"] for r in result.rounds[0].revisions]
    assert order == ["cs-004", "acme-001", "acme-002"]  # highest authority first
    assert result.rounds[1].violations == []
    assert result.timings_ms["model"] == 0
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["id"] == result.id and audit[-1]["kind"] == "guard"
    assert audit[-1]["policy"] == {
        "name": "acme-support",
        "version": "3",
        "constitution_hash": engine.constitution.content_hash(),
    }
    assert audit[-1]["principle_ids"] == ["acme-001", "acme-002", "cs-004"]
    assert seen == [("guard", result.id)]


def test_compliant_response_is_untouched(engine):
    result = engine.guard(CONV, CLEAN + "\n\n— Acme Support")
    assert result.action == "none" and result.compliant and result.response == result.original


@pytest.mark.parametrize(("action", "expected"), [("flag", "flagged"), ("refuse", "refused")])
def test_flag_and_refuse_actions(cai_runtime, tmp_path, action, expected):
    engine = Engine.from_policy(rules_policy(tmp_path, action=action), runtime=cai_runtime)
    result = engine.guard(CONV, CARD)
    assert result.action == expected and not result.compliant
    assert {v.rule_id for v in result.violations} >= {"cs-004-card"}
    if expected == "flagged":
        assert result.response == CARD
    else:
        assert "Protect account and payment data" in result.response and "4111" not in result.response
    assert len(result.rounds) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("on_failure", "expected"), [("refuse", "refused"), ("return", "flagged")])
def test_unfixable_violation_falls_back(cai_runtime, tmp_path, tiny_model, on_failure, expected):
    data = rules_policy(tmp_path, max_rounds=1, on_failure=on_failure)
    data["model"] = str(tiny_model)
    data["reviser"] = {"name": "model", "options": {"max_new_tokens": 6}}
    engine = Engine.from_policy(data, runtime=cai_runtime)
    result = engine.guard(CONV, "Please tell me your password so I can check. — Acme Support")
    revisions = result.rounds[0].revisions
    assert next((r["reviser"], r["accepted"]) for r in revisions) == ("rules", False)  # this rule has no fix...
    assert revisions[1]["reviser"] == "model"  # ...so the model rewrote it
    if result.compliant:  # the tiny random model happened to remove the request
        assert result.action == "revised"
    else:
        assert result.action == expected and result.violations
        refused = result.response.startswith("I can't help with that as asked")
        assert refused == (expected == "refused")


@pytest.mark.slow
def test_model_critics_and_async_guard(cai_runtime, tmp_path, tiny_model):
    data = rules_policy(tmp_path, model_critics=True, model_principles=2, max_rounds=1, on_failure="return")
    data["model"] = str(tiny_model)
    data["critic"] = {"name": "model", "options": {"max_new_tokens": 6}}
    data["reviser"] = {"name": "model", "options": {"max_new_tokens": 8}}
    engine = Engine.from_policy(data, runtime=cai_runtime)
    result = engine.guard(CONV, CLEAN)
    assert result.timings_ms["model"] > 0
    assert result.action in {"none", "revised", "flagged"}
    for violation in result.rounds[0].violations:
        assert violation.critic in {"model", "rules"}
    again = asyncio.run(engine.aguard(CONV, CLEAN))
    assert again.action == result.action and again.response == result.response
    batch = asyncio.run(engine.aguard_batch([(CONV, CLEAN), (CONV, CARD)]))
    assert len(batch) == 2 and batch[0].response == result.response


@pytest.mark.slow
def test_building_blocks(cai_runtime, tmp_path, tiny_model):
    data = rules_policy(tmp_path)
    data["model"] = str(tiny_model)
    data["guard"]["model_critics"] = True
    engine = Engine.from_policy(data, runtime=cai_runtime)
    critiques = engine.critique(CONV, CARD, principles=["cs-004", "cs-003"])
    assert {c.critic for c in critiques} == {"rules", "model"}
    assert any(c.needs_revision for c in critiques if c.critic == "rules")
    revision = engine.revise(CONV, CARD, "cs-003", critique="It promises a refund.")
    assert revision.principle_id == "cs-003"
    judgement = engine.compare(CONV, CARD, CLEAN, principles=["cs-004"])
    assert [o.order for o in judgement.orders] == ["ab", "ba"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"override": {"zz-999": {"authority": 10}}}, "override.zz-999: names principle 'zz-999'"),
        ({"disable": ["nope-1"]}, "disable[0]: names principle 'nope-1'"),
        ({"guard": {"threshold": 1.5}}, "guard.threshold"),
        ({"guard": {"actoin": "flag"}}, "guard.actoin: unknown key"),
        ({"constitutions": ["no-such-constitution"]}, "unknown constitution 'no-such-constitution'"),
        ({"constitutions": []}, "constitutions"),
        ({"critic": {"name": "model", "options": {"temprature": 2}}}, "temprature"),
    ],
)
def test_bad_policies_are_clear(cai_runtime, tmp_path, change, message):
    data = {**rules_policy(tmp_path), **change}
    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine.from_policy(data, runtime=cai_runtime)


def test_unknown_backend_in_policy(cai_runtime, tmp_path):
    data = {**rules_policy(tmp_path), "model": {"backend": "nope", "model": "x"}}
    with pytest.raises(UnknownComponentError, match="unknown backend 'nope'"):
        Engine.from_policy(data, runtime=cai_runtime)


def test_policy_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nconstitutions: [harmless]\nguard:\n  max_rounds: lots\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"p.yaml:4: guard.max_rounds: "):
        load_policy(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_policy(path)


def test_policy_schema_is_fresh():
    from pathlib import Path

    from cai_engine.guard.policy import policy_json_schema

    committed = json.loads((Path(__file__).parent.parent / "schemas/policy.schema.json").read_text())
    assert committed == policy_json_schema(), "regenerate: cai policy schema -o schemas/policy.schema.json"


def test_cli_policy_and_guard(cli_runner, tmp_path):
    policy = tmp_path / "policy.yaml"
    data = rules_policy(tmp_path)
    data["audit"]["path"] = "audit/decisions.jsonl"  # relative to the policy file
    policy.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = cli_runner.invoke(cli, ["policy", "validate", str(policy)])
    assert result.exit_code == 0, result.output
    shown = cli_runner.invoke(cli, ["policy", "show", str(policy), "--format", "json"])
    effective = json.loads(shown.output)["effective_constitution"]
    assert "acme-001" in [p["id"] for p in effective["principles"]]
    conversations = tmp_path / "in.jsonl"
    conversations.write_text(
        json.dumps({"id": "a", "messages": [m.model_dump() for m in CONV] + [{"role": "assistant", "content": CARD}]})
        + "\n"
        + json.dumps({"id": "b", "prompt": "Hi", "response": CLEAN + "\n\n— Acme Support"})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    result = cli_runner.invoke(
        cli, ["guard", "--policy", str(policy), "--input", str(conversations), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["action"]) for r in rows] == [("a", "revised"), ("b", "none")]
    assert all(len(r["audit_id"]) == 36 for r in rows)
    audit = [json.loads(line) for line in (tmp_path / "audit/decisions.jsonl").read_text().splitlines()]
    assert [a["kind"] for a in audit] == ["guard", "guard", "guard_run"] and audit[-1]["status"] == "completed"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl:1: needs 'messages' ending with an assistant turn" in result.output
    gated = cli_runner.invoke(
        cli,
        [
            "guard",
            "--policy",
            str(policy),
            "--input",
            str(conversations),
            "--out",
            str(tmp_path / "gated.jsonl"),
            "--fail-on",
            "revise",
        ],
    )
    assert gated.exit_code == 3 and "at least one response was revised" in gated.output
    assert len((tmp_path / "gated.jsonl").read_text().splitlines()) == 2  # the output is written either way
    lenient = cli_runner.invoke(
        cli,
        [
            "guard",
            "--policy",
            str(policy),
            "--input",
            str(conversations),
            "--out",
            str(tmp_path / "lenient.jsonl"),
            "--fail-on",
            "flag",
        ],
    )
    assert lenient.exit_code == 0, lenient.output


class Screener:
    """A critic plugin with a scripted combined screen (and per-principle verdicts that always abstain)."""

    def __init__(self, results):
        from cai_engine import Critic, Judge
        from cai_engine.records import Critique, Judgement

        outer = self

        class ScreenCritic(Critic):
            name = "screener"

            def screen(self, items, principles):
                outer.seen.append((list(items), [p.id for p in principles]))
                return [outer.results.pop(0) for _ in items]

            def screen_requests(self, conversations, question=None):
                conversations = list(conversations)
                outer.requests.append(conversations)
                return [outer.request_p.pop(0) for _ in conversations]

            def decline_likelihood(self, conversations):
                conversations = list(conversations)
                outer.declines.append(conversations)
                return [outer.decline_p.pop(0) for _ in conversations]

            def attribute(self, items, principles):
                items = list(items)
                outer.attributed.append(items)
                return [outer.letters.pop(0) for _ in items]

            def critique(self, tasks):
                return [
                    Critique(principle_id=t.principle.id, text="", needs_revision=None, critic=self.name) for t in tasks
                ]

        class ContrastJudge(Judge):
            name = "contrast-judge"

            def compare(self, tasks):
                tasks = list(tasks)
                outer.compared.append(tasks)
                out = []
                for task in tasks:
                    p_a = outer.p_a.pop(0)
                    out.append(
                        Judgement(
                            principle_ids=[p.id for p in task.principles],
                            p_a=p_a,
                            abstained=p_a is None,
                            reason=None if p_a is not None else "unreadable",
                            judge=self.name,
                        )
                    )
                return out

        self.results, self.seen, self.cls, self.judge_cls = list(results), [], ScreenCritic, ContrastJudge
        self.questions, self.requests, self.request_p, self.attributed, self.letters = [], [], [], [], []
        self.compared, self.p_a, self.declines, self.decline_p = [], [], [], []

    @hookimpl
    def cai_register_critics(self, register):
        register(self.cls)

    @hookimpl
    def cai_register_judges(self, register):
        register(self.judge_cls)


def screen_engine(cai_runtime, tmp_path, results, **guard):
    from cai_engine.models.runtime import Runtime
    from cai_engine.plugins.registry import Registry

    screener = Screener(results)
    cai_runtime.pm.register(screener)
    runtime = Runtime(Registry(cai_runtime.pm))
    data = {
        "name": "screened",
        "constitutions": ["harmless"],
        "critic": "screener",
        "judge": "contrast-judge",
        "guard": {"model_critics": True, "action": "flag", **guard},
    }
    return Engine.from_policy(data, runtime=runtime), screener


@pytest.mark.parametrize("on_abstain,third", [("flag", "flagged"), ("pass", "none"), ("revise", "flagged")])
def test_combined_screen_attributes_violations_and_handles_abstentions(cai_runtime, tmp_path, on_abstain, third):
    results = [
        {"p_yes": 0.9, "principle_index": 1, "letter_probs": None},
        {"p_yes": 0.1, "principle_index": None, "letter_probs": None},
        {"p_yes": None, "principle_index": None, "letter_probs": None},
    ]
    engine, screener = screen_engine(cai_runtime, tmp_path, results, screen="combined", on_abstain=on_abstain)
    guarded = engine.guard_batch([(CONV, "answer one"), (CONV, "answer two"), (CONV, "answer three")])
    candidates = screener.seen[0][1]
    assert len(screener.seen) == 1 and len(screener.seen[0][0]) == 3  # one batched screen for every response
    assert candidates == [p.id for p in engine.runtime_principles if p.critique_request or p.violation_question]
    assert guarded[0].action == "flagged" and [v.principle_id for v in guarded[0].violations] == [candidates[1]]
    assert guarded[1].action == "none" and not guarded[1].abstained
    assert guarded[2].action == third and guarded[2].abstained
    assert guarded[2].rounds[0].abstentions == ["screen"]
    assert bool(guarded[2].violations) == (on_abstain == "revise")


def test_a_combined_screen_of_more_principles_than_letters_runs_in_parts():
    # medical and financial extend harmless to 27 runtime principles; 26 letters name them in one screen
    from types import SimpleNamespace

    from cai_engine.default_plugins.critics import ModelCritic

    def part(p_yes, index=None):
        return {"p_yes": p_yes, "principle_index": index, "letter_probs": None if index is None else {"A": 1.0}}

    answers = {
        0: [part(0.2), part(None), part(None), part(0.1)],  # principles 0-14
        15: [part(0.9, 3), part(0.1), part(0.8, 0), part(0.2)],  # principles 15-29
    }
    seen = []

    def screen(items, principles, question):
        seen.append(list(principles))
        return answers[int(principles[0])]

    fake = SimpleNamespace(screen=screen, options=SimpleNamespace(threshold=0.5))
    principles = [str(i) for i in range(30)]
    out = ModelCritic._screen_in_parts(fake, ["a", "b", "c", "d"], principles, None)
    assert seen == [principles[:15], principles[15:]]  # even parts, each within the letters
    assert out[0] == {"p_yes": 0.9, "principle_index": 18, "letter_probs": {"A": 1.0}}  # the part that fired names it
    assert out[1]["p_yes"] is None  # a part abstained and none fired: the screen abstains
    assert out[2]["p_yes"] == 0.8 and out[2]["principle_index"] == 15  # a part fired: decided despite the other
    assert out[3] == {"p_yes": 0.2, "principle_index": None, "letter_probs": None}


def test_request_screen_flags_replies_that_do_not_refuse_a_harmful_request(cai_runtime, tmp_path):
    engine, screener = screen_engine(cai_runtime, tmp_path, [], screen="request", request_threshold=0.5)
    screener.request_p = [0.95, 0.1, 0.8, None, 0.7]
    screener.letters = [2, None]
    guarded = engine.guard_batch(
        [
            (CONV, "Sure: first get a tension wrench."),
            (CONV, "kill -9 the process"),
            (CONV, "I can't help with breaking into someone's home."),
            (CONV, "unreadable"),
            (CONV, "Here is how, step by step."),
        ]
    )
    assert len(screener.requests) == 1 and len(screener.requests[0]) == 4 + 1  # one batched request screen
    assert screener.seen == []  # no per-reply yes/no verdict is asked in this mode
    # the two replies to harmful requests that do not refuse, and nothing else, are attributed (in one batch)
    assert [[r for _, r in batch] for batch in screener.attributed] == [
        ["Sure: first get a tension wrench.", "Here is how, step by step."]
    ]
    assert [g.action for g in guarded] == ["flagged", "none", "none", "flagged", "flagged"]
    candidates = [p.id for p in engine.runtime_principles if p.critique_request or p.violation_question]
    assert [v.principle_id for v in guarded[0].violations] == [candidates[2]]
    assert [v.principle_id for v in guarded[4].violations] == [candidates[0]]  # no letter read: the first
    assert [g.rounds[0].request_p for g in guarded] == [0.95, 0.1, 0.8, None, 0.7]
    assert guarded[3].abstained and guarded[3].rounds[0].abstentions == ["request"]
    assert guarded[1].compliant and guarded[2].compliant and not guarded[2].violations


def test_request_refusal_combines_the_critics_own_decline_with_the_request_screen(cai_runtime, tmp_path):
    """With request_refusal the request counts as harmful when 1 - (1 - P(Yes)) * (1 - P(the critic would decline))
    passes the threshold; either signal missing is an abstention, never a guess."""
    engine, screener = screen_engine(
        cai_runtime, tmp_path, [], screen="request", request_threshold=0.6, request_refusal=True
    )
    screener.request_p = [0.3, 0.3, 0.9, None, 0.5]
    screener.decline_p = [0.5, 0.1, 0.0, 0.9, None]
    screener.letters = [0, 0]
    replies = ["Here is how.", "Here is how.", "Sure, step one.", "Here is how.", "Here is how."]
    guarded = engine.guard_batch([(CONV, r) for r in replies])
    assert len(screener.declines) == 1 and len(screener.declines[0]) == 5  # one batched call, beside the screen
    assert screener.declines[0] == screener.requests[0]  # the same conversations, without the reply
    assert [g.rounds[0].request_p for g in guarded] == pytest.approx([0.65, 0.37, 0.9, None, None])
    assert [g.rounds[0].request_refusal_p for g in guarded] == [0.5, 0.1, 0.0, 0.9, None]
    # 0.65 > 0.6 acts although neither signal alone does; 0.37 does not; a missing signal abstains
    assert [g.action for g in guarded] == ["flagged", "none", "flagged", "flagged", "flagged"]
    assert guarded[1].compliant and [g.abstained for g in guarded] == [False, False, False, True, True]
    assert guarded[3].rounds[0].abstentions == ["request"] == guarded[4].rounds[0].abstentions


def test_request_refusal_needs_the_request_screen():
    from pydantic import ValidationError

    from cai_engine.guard.policy import GuardSettings

    with pytest.raises(ValidationError, match="request_refusal works with screen 'request'"):
        GuardSettings(screen="each", request_refusal=True)
    assert GuardSettings(screen="request", request_refusal=True).request_refusal


def test_reply_contrast_judges_engaged_replies_to_harmless_looking_requests(cai_runtime, tmp_path):
    engine, screener = screen_engine(
        cai_runtime, tmp_path, [], screen="request", reply_contrast=0.4, contrast_refusal="No."
    )
    screener.request_p = [0.1, 0.2, 0.9, 0.3, 0.05, None]
    screener.p_a = [0.45, 0.7, None]  # P(the reply beats the refusal), for the three engaged replies read as harmless
    screener.letters = [3, 1]  # the contrast's one hit first, then the harmful request's complying reply
    guarded = engine.guard_batch(
        [
            (CONV, "Leave the toddler in the car, it's fine for an hour."),  # contrast: refusal better (0.55)
            (CONV, "kill -9 the process"),  # contrast: the reply is better (0.3)
            (CONV, "Sure: first get a tension wrench."),  # harmful request, complies: the request screen acts
            (CONV, "I can't help with that."),  # declines: nothing to compare
            (CONV, "Something the judge cannot read."),  # contrast abstains
            (CONV, "Request unread."),  # the request screen abstained: no contrast either
        ]
    )
    # one batched comparison, each engaged reply as A against the configured refusal as B
    assert len(screener.compared) == 1
    compared = screener.compared[0]
    assert [t.response_a for t in compared] == [
        "Leave the toddler in the car, it's fine for an hour.",
        "kill -9 the process",
        "Something the judge cannot read.",
    ]
    assert {t.response_b for t in compared} == {"No."}
    assert all(t.principles[0].comparison.startswith("Which reply is less harmful") for t in compared)
    candidates = [p.id for p in engine.runtime_principles if p.critique_request or p.violation_question]
    assert [g.action for g in guarded] == ["flagged", "none", "flagged", "none", "flagged", "flagged"]
    assert [v.principle_id for v in guarded[0].violations] == [candidates[3]]
    assert guarded[0].violations[0].evidence == "P(a plain refusal is the better reply)=0.55"
    assert [v.principle_id for v in guarded[2].violations] == [candidates[1]]
    assert [g.rounds[0].contrast_p for g in guarded] == pytest.approx([0.55, 0.3, None, None, None, None])
    assert guarded[4].abstained and guarded[4].rounds[0].abstentions == ["contrast"]
    assert guarded[5].rounds[0].abstentions == ["request"]
    assert guarded[1].compliant and guarded[3].compliant


def test_reply_contrast_needs_the_request_screen():
    from pydantic import ValidationError

    from cai_engine.guard.policy import GuardSettings

    with pytest.raises(ValidationError, match="reply_contrast works with screen 'request'"):
        GuardSettings(screen="combined", reply_contrast=0.4)
    assert GuardSettings(screen="request", reply_contrast=0.4).reply_contrast == 0.4


def test_per_principle_abstentions_are_never_compliant_by_default(cai_runtime, tmp_path):
    engine, _ = screen_engine(cai_runtime, tmp_path, [], screen="each")
    result = engine.guard(CONV, "an answer")
    assert result.abstained and result.action == "flagged" and not result.compliant
    assert set(result.rounds[0].abstentions) == {
        p.id for p in engine.runtime_principles if p.critique_request or p.violation_question
    }


@pytest.mark.slow
def test_reply_contrast_on_a_real_model(cai_runtime, tiny_model):
    data = {
        "name": "contrast",
        "constitutions": ["harmless"],
        "model": str(tiny_model),
        "critic": {"name": "model", "options": {"verdict_only": True, "few_shot": 0}},
        "judge": {"name": "logprob", "options": {"few_shot": 0}},
        "guard": {"action": "flag", "screen": "request", "request_threshold": 0.999999, "reply_contrast": 1e-6},
    }
    engine = Engine.from_policy(data, runtime=cai_runtime)
    engaged, declined = engine.guard_batch([(CONV, "Charge it back to the card."), (CONV, "I can't help with that.")])
    assert engaged.rounds[0].request_p is not None and engaged.rounds[0].request_p <= 0.999999
    assert 0 < engaged.rounds[0].contrast_p < 1  # the judge's two orders, averaged
    assert engaged.action == "flagged" and engaged.violations[0].evidence.startswith("P(a plain refusal")
    assert declined.rounds[0].contrast_p is None and declined.action == "none"  # nothing to compare a refusal with


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["chat", "transcript"])
def test_decline_likelihood_on_a_real_model(cai_runtime, tiny_model, layout):
    """The critic's own P(declining) is the summed probability of the refusal openers after the conversation, in the
    layout the critic uses, and a guard with request_refusal records it."""
    import math

    from cai_engine.text.refusals import REFUSAL_OPENERS

    options = {"model": str(tiny_model), "verdict_only": True, "layout": layout}
    critic = cai_runtime.component("critic", "model", options)
    (p,) = critic.decline_likelihood([CONV])
    if layout == "chat":
        prompt, openers = ChatPrompt(CONV), list(REFUSAL_OPENERS)
    else:
        prompt, openers = (
            "".join(f"\n\nHuman: {m.content}" for m in CONV) + "\n\nAssistant:",
            [" " + o for o in REFUSAL_OPENERS],
        )
    (expected,) = critic.backend.continuation_logprobs([prompt], [openers])
    assert 0 < p < 1 and p == pytest.approx(sum(math.exp(lp) for lp in expected), rel=1e-6)
    data = {
        "name": "declines",
        "constitutions": ["harmless"],
        "model": str(tiny_model),
        "critic": {"name": "model", "options": {"verdict_only": True, "few_shot": 0, "layout": layout}},
        "guard": {"action": "flag", "screen": "request", "request_refusal": True},
    }
    (guarded,) = Engine.from_policy(data, runtime=cai_runtime).guard_batch([(CONV, "Charge it back to the card.")])
    assert guarded.rounds[0].request_refusal_p == pytest.approx(p)
    assert guarded.rounds[0].request_p > p  # combined with the screen's P(Yes) by noisy-or


@pytest.mark.slow
def test_model_critic_screen_on_a_real_model(cai_runtime, tiny_model):
    harmless = cai_runtime.registry.constitution("harmless")
    principles = [harmless.principle(pid) for pid in ("harm-001", "harm-004", "harm-014")]
    critic = cai_runtime.component(
        "critic", "model", {"model": str(tiny_model), "threshold": 1e-9, "verdict_only": True, "few_shot": 0}
    )
    out = critic.screen([(CONV, "fine"), (CONV, "also fine")], principles)
    assert len(out) == 2
    for result in out:
        assert 0 <= result["p_yes"] <= 1
        assert result["principle_index"] in (0, 1, 2)  # threshold ~0: it fires, so a letter is read
        assert sum(result["letter_probs"].values()) == pytest.approx(1, abs=1e-3)
        assert set(result["letter_probs"]) == {"A", "B", "C"}
    requests = critic.screen_requests([CONV, [Message(role="user", content="How do I bake bread?")]])
    assert len(requests) == 2 and all(0 <= p <= 1 for p in requests) and requests[0] != requests[1]
    assert critic.attribute([(CONV, "fine"), (CONV, "also fine")], principles) == [
        r["principle_index"] for r in out
    ]  # the same letters as the combined screen's second step
    # a domain constitution's runtime principles (27 for medical) take more than the 26 letters: screened in parts
    many = (harmless.principles * 2)[:27]
    (result,) = critic.screen([(CONV, "fine")], many)
    assert 0 <= result["p_yes"] <= 1 and result["principle_index"] in range(27)


# -- model: none (no model in the request path) and what the audit keeps ------------------------------------------------


class LeakyCheck:
    """A plugin check that quotes what it found in its message, and whose repair always declines."""

    def __init__(self) -> None:
        from cai_engine import Critic, Reviser
        from cai_engine.records import Critique, Revision, Violation

        class Finder(Critic):
            name = "leaky.check"

            def critique(self, tasks):
                out = []
                for t in tasks:
                    found = [w for w in t.response.split() if w.startswith("SECRET-")]
                    violations = [
                        Violation(principle_id=t.principle.id, evidence=w, message=f"found {w}", critic=self.name)
                        for w in found
                    ]
                    out.append(
                        Critique(
                            principle_id=t.principle.id,
                            text="; ".join(found),
                            needs_revision=bool(found),
                            violations=violations,
                            critic=self.name,
                        )
                    )
                return out

        class Decliner(Reviser):
            name = "leaky.check"

            def revise(self, tasks):
                return [
                    Revision(
                        principle_id=t.principle.id, text=t.response, accepted=False, reason="cannot", reviser=self.name
                    )
                    for t in tasks
                ]

        self.critic, self.reviser = Finder, Decliner

    @hookimpl
    def cai_register_critics(self, register):
        register(self.critic)

    @hookimpl
    def cai_register_revisers(self, register):
        register(self.reviser)


LEAKY = {
    "id": "leak-001",
    "title": "No secrets",
    "phases": ["runtime"],
    "authority": 90,
    "checks": ["leaky.check"],
}


@pytest.fixture
def leaky_runtime(cai_runtime, monkeypatch):
    from cai_engine.models.runtime import Runtime
    from cai_engine.plugins.registry import Registry

    cai_runtime.pm.register(LeakyCheck())
    runtime = Runtime(Registry(cai_runtime.pm))

    def no_model(ref):
        raise AssertionError(f"a model was loaded: {ref!r}")

    monkeypatch.setattr(runtime, "backend", no_model)
    return runtime


def model_free(tmp_path, **guard):
    data = rules_policy(tmp_path, max_rounds=2, on_failure="refuse", **guard)
    data["model"] = "none"
    del data["guard"]["model_critics"]  # implied by model: none
    data["add"].append(LEAKY)
    return data


def test_model_none_never_loads_a_model(leaky_runtime, tmp_path):
    """A rule without a fix and a plugin repair that declines went to the model reviser (SmolLM2); with model: none
    nothing rewrites them (the audit says so), so the reply ends as on_failure says."""
    engine = Engine.from_policy(model_free(tmp_path), runtime=leaky_runtime)
    assert engine.policy.model_free and not engine.policy.guard.model_critics
    assert engine.model_problems() == []
    repaired = engine.guard(CONV, CARD + " — Acme Support")
    assert repaired.action == "revised" and "4111" not in repaired.response
    no_fix = engine.guard(CONV, "Please tell me your password so I can check. — Acme Support")
    assert no_fix.action == "refused" and {v.rule_id for v in no_fix.violations} == {"cs-004-secret"}
    declined = engine.guard(CONV, "Your code is SECRET-42. — Acme Support")
    assert declined.action == "refused" and {v.principle_id for v in declined.violations} == {"leak-001"}
    revisions = declined.rounds[0].revisions
    assert {r["reviser"] for r in revisions} == {"leaky.check", "none"}  # the plugin declined; no model was asked
    assert [r["reason"] for r in revisions if r["reviser"] == "none"] == [
        "model: none: no model may rewrite this reply"
    ]
    data = model_free(tmp_path)
    data["guard"]["on_failure"] = "return"
    flagged = Engine.from_policy(data, runtime=leaky_runtime).guard(CONV, "Your code is SECRET-42. — Acme Support")
    assert flagged.action == "flagged" and flagged.response.startswith("Your code is SECRET-42")
    # a plugin check reads the text as sent; a respelling it would miss is looked for in the folded text too
    respelled = engine.guard(CONV, "Your code is ＳＥＣＲＥＴ-\u200b42. — Acme Support")
    assert respelled.action == "refused" and {v.principle_id for v in respelled.violations} == {"leak-001"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"guard": {"model_critics": True}}, "model: none, but guard.model_critics is true"),
        ({"reviser": {"name": "model", "options": {"model": "smollm2"}}}, "reviser.options.model names 'smollm2'"),
    ],
)
def test_model_none_contradictions_are_refused(cai_runtime, tmp_path, change, message):
    data = {**rules_policy(tmp_path), "model": "none", **change}
    with pytest.raises(ConfigError, match=re.escape(message)):
        Engine.from_policy(data, runtime=cai_runtime)


def test_validate_names_what_would_need_a_model(cli_runner, tmp_path):
    policy = tmp_path / "policy.yaml"
    data = rules_policy(tmp_path)
    data["model"] = "none"
    policy.write_text(yaml.safe_dump(data))
    failed = cli_runner.invoke(cli, ["policy", "validate", str(policy)])
    assert failed.exit_code == 1
    assert "model: none, but a reply could need a model to rewrite it: rule cs-004-secret (cs-004) has no fix" in (
        failed.output
    )
    assert "write guard.on_failure" in failed.output
    data["guard"]["on_failure"] = "refuse"
    policy.write_text(yaml.safe_dump(data))
    ok = cli_runner.invoke(cli, ["policy", "validate", str(policy)])
    assert ok.exit_code == 0, ok.output
    assert "rules only (model: none)" in ok.output and "ends as on_failure: refuse" in ok.output
    data["guard"]["action"] = "flag"  # nothing is ever revised, so nothing could need a model
    del data["guard"]["on_failure"]
    policy.write_text(yaml.safe_dump(data))
    assert cli_runner.invoke(cli, ["policy", "validate", str(policy)]).exit_code == 0
    del data["model"]  # a model is allowed: validate says where the guard would still call it
    data["guard"]["action"] = "revise"
    policy.write_text(yaml.safe_dump(data))
    noted = cli_runner.invoke(cli, ["policy", "validate", str(policy)])
    assert noted.exit_code == 0 and "can still load a model to rewrite a reply: rule cs-004-secret" in noted.output


def test_a_repair_that_can_decline_is_named(leaky_runtime, tmp_path):
    from cai_engine.guard.policy import model_free_problem

    data = model_free(tmp_path)
    del data["guard"]["on_failure"]
    data["add"] = [LEAKY]
    engine = Engine.from_policy(data, runtime=leaky_runtime)
    problem = model_free_problem(engine.policy, engine.constitution, leaky_runtime.registry)
    assert problem and "the repair of check leaky.check (leak-001) can decline" in problem


def test_the_shipped_rules_only_examples_never_need_a_model(monkeypatch):
    import importlib.metadata
    from pathlib import Path

    from cai_engine.guard.policy import model_free_problem
    from cai_engine.models.runtime import Runtime
    from cai_engine.plugins.manager import make_plugin_manager
    from cai_engine.plugins.registry import Registry

    examples = Path(__file__).resolve().parent.parent / "examples"
    names = ["serve-policy.yaml"]
    if "medical" in {ep.name for ep in importlib.metadata.entry_points(group="cai_engine")}:
        names.append("clinic-policy.yaml")
    monkeypatch.delenv("CAI_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    runtime = Runtime(Registry(make_plugin_manager()))
    monkeypatch.setattr(runtime, "backend", lambda ref: pytest.fail(f"a model was loaded: {ref!r}"))
    for name in names:
        data = yaml.safe_load((examples / name).read_text())
        data["audit"] = {}
        engine = Engine.from_policy(data, runtime=runtime)
        assert engine.policy.model_free, name
        assert model_free_problem(engine.policy, engine.constitution, runtime.registry) is None
        result = engine.guard(CONV, "Please tell me your password so I can check.")
        assert result.action in {"refused", "none", "revised"}  # whatever the rules decide, without a model
    clinic = yaml.safe_load((examples / "clinic-policy.yaml").read_text())
    assert clinic["model"] == "none" and clinic["guard"]["on_failure"] == "refuse"


def test_the_audit_never_keeps_what_the_guard_removed(leaky_runtime, tmp_path):
    engine = Engine.from_policy(model_free(tmp_path), runtime=leaky_runtime)
    link = "https://tickets.acme.internal/T-99"
    revised = engine.guard(CONV, f"{CARD} See {link} for details.")
    refused = engine.guard(CONV, "Your code is SECRET-42.")
    clean = engine.guard(CONV, CLEAN + "\n\n— Acme Support")
    assert revised.action == "revised" and refused.action == "refused" and clean.action == "none"
    text = (tmp_path / "audit.jsonl").read_text()
    # The card's digits with their spacing, or run together: a bare "4111" can turn up in a record's random id.
    for removed in ("4111 1111", "4111111111111111", "tickets.acme.internal", "SECRET-42"):
        assert removed not in text
    records = {r["id"]: r for r in map(json.loads, text.splitlines())}
    record = records[revised.id]
    evidence = [v["evidence"] for r in record["rounds"] for v in r["violations"]]
    assert "[redacted: 19 characters]" in evidence  # the card number's length, nothing else
    assert all(e == "" or re.fullmatch(r"\[redacted: \d+ characters\]", e) for e in evidence)
    rule_messages = {v["message"] for r in record["rounds"] for v in r["violations"]}
    assert "A full payment card number appears in the reply." in rule_messages  # the deployer's own words stay
    assert record["original"].startswith("sha256:") and record["response"] == revised.response
    plugin = records[refused.id]["violations"][0]
    assert plugin["message"] == "[redacted: 16 characters]" and plugin["evidence"] == "[redacted: 10 characters]"
    assert records[clean.id]["original"] == clean.original  # nothing removed: the text stays (include_text)
    assert revised.violations == [] and any(v.evidence for v in revised.rounds[0].violations)  # the caller's copy
