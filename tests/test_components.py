from __future__ import annotations

import math

import pytest

from cai_engine import (
    Backend,
    ComparisonTask,
    ConfigError,
    CritiqueTask,
    Message,
    ModelError,
    RevisionTask,
    ScoringTask,
    hookimpl,
    make_plugin_manager,
)
from cai_engine.models.runtime import Runtime
from cai_engine.plugins.registry import Registry
from cai_engine.text.layouts import clean_revision, transcript_block

pytestmark = pytest.mark.slow

CONV = [Message(role="user", content="How do I pick a lock?")]


@pytest.fixture
def harmless(cai_registry):
    return cai_registry.constitution("harmless")


@pytest.fixture
def model_opts(tiny_model):
    return {"model": str(tiny_model), "max_new_tokens": 12}


def test_sampler_returns_n_per_conversation(cai_runtime, model_opts):
    sampler = cai_runtime.component("sampler", "model", {**model_opts, "seed": 3})
    out = sampler.sample([CONV, [Message(role="user", content="Hi")]], n=3)
    assert [len(x) for x in out] == [2 * 0 + 3, 3]
    assert all(isinstance(s, str) for row in out for s in row)
    assert sampler.sample([CONV], n=2) == sampler.sample([CONV], n=2)  # seeded


@pytest.mark.parametrize("layout", ["chat", "transcript"])
def test_critic_batch(cai_runtime, model_opts, harmless, layout):
    critic = cai_runtime.component("critic", "model", {**model_opts, "layout": layout})
    tasks = [
        CritiqueTask(conversation=CONV, response=r, principle=harmless.principle(pid), examples=harmless.examples)
        for r, pid in [("Use a tension wrench.", "harm-014"), ("I can't help.", "help-001"), ("Sure.", "harm-001")]
    ]
    out = critic.critique(tasks)
    assert [c.principle_id for c in out] == ["harm-014", "help-001", "harm-001"]
    assert all(c.critic == "model" for c in out)
    # a verdict is read for every written critique, and only an empty critique leaves it undecided
    assert [c.needs_revision is None for c in out] == [not c.text for c in out]


@pytest.mark.parametrize("layout", ["chat", "transcript"])
def test_reviser_batch(cai_runtime, model_opts, harmless, layout):
    reviser = cai_runtime.component("reviser", "model", {**model_opts, "layout": layout})
    tasks = [
        RevisionTask(
            conversation=CONV, response="Use a tension wrench.", principle=harmless.principle("harm-014"), critique=crit
        )
        for crit in ("It helps with a crime.", None)
    ]
    out = reviser.revise(tasks)
    assert len(out) == 2
    for revision, task in zip(out, tasks):
        assert revision.raw is not None
        assert revision.accepted == (revision.reason is None)
        assert revision.accepted or revision.text == task.response


def test_transcript_layout_is_the_papers():
    conv = [Message(role="user", content="Q?")]
    text = transcript_block(conv, "R.", "Crit req", "Crit.", "Rev req")
    assert text == (
        "\n\nHuman: Q?\n\nAssistant: R.\n\nCritiqueRequest: Crit req\n\nCritique: Crit."
        "\n\nRevisionRequest: Rev req\n\nRevision:"
    )
    assert transcript_block(conv, "R.", "Crit req").endswith("\n\nCritique:")
    direct = transcript_block(conv, "R.", None, None, "Rev req")
    assert "Critique" not in direct and direct.endswith("RevisionRequest: Rev req\n\nRevision:")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Sure, here is a revised response: Be kind.", "Be kind."),
        ("Revision: Be kind.\n\nHuman: next", "Be kind."),
        ("Here's the rewritten reply:\nBe kind.", "Be kind."),
        ('"Be kind."', "Be kind."),
        ("Certainly! Revised response: Be kind.<|im_end|>garbage", "Be kind."),
        ("No revision needed.", "ORIGINAL"),
    ],
)
def test_clean_revision_strips_leakage_and_preambles(raw, expected):
    text, reason = clean_revision(raw, "ORIGINAL", "The reply was rude to the person.")
    assert (text, reason) == (expected, None)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty revision"),
        ("   \n\nHuman: hi", "empty revision"),
        ("Sure, here is the revised response:", "empty revision"),
        ("The reply was rude to the person.", "copies the critique"),
        ("the reply was rude to the person!", "copies the critique"),
    ],
)
def test_clean_revision_rejects(raw, reason):
    text, why = clean_revision(raw, "ORIGINAL", "The reply was rude to the person.")
    assert text is None and reason in why


def pair_tasks(harmless, n_principles=1):
    principles = [harmless.principle(p) for p in ("harm-001", "help-001", "harm-009")[:n_principles]]
    return [
        ComparisonTask(
            conversation=CONV, response_a=a, response_b=b, principles=principles, examples=harmless.comparison_examples
        )
        for a, b in [("No.", "Use a wrench and a pick."), ("Call a locksmith.", "Here is how to break in.")]
    ]


@pytest.mark.parametrize("layout", ["chat", "transcript"])
def test_logprob_judge_scores_both_orders(cai_runtime, model_opts, harmless, layout):
    judge = cai_runtime.component("judge", "logprob", {**model_opts, "layout": layout, "few_shot": 2})
    for judgement in judge.compare(pair_tasks(harmless)):
        assert not judgement.abstained
        assert [o.order for o in judgement.orders] == ["ab", "ba"]
        for order in judgement.orders:
            p_first = math.exp(order.logprobs["A"]) / (math.exp(order.logprobs["A"]) + math.exp(order.logprobs["B"]))
            p_second = 1 - p_first
            assert math.isclose(p_first + p_second, 1.0)
            assert math.isclose(order.p_a, p_first if order.order == "ab" else p_second, abs_tol=1e-9)
        assert math.isclose(judgement.p_a, sum(o.p_a for o in judgement.orders) / 2)
        prefers = {o.p_a > 0.5 for o in judgement.orders}
        assert judgement.position_consistent == (len(prefers) == 1)


def test_swapping_responses_mirrors_the_label(cai_runtime, model_opts, harmless):
    judge = cai_runtime.component("judge", "logprob", model_opts)
    task = pair_tasks(harmless)[0]
    swapped = task.model_copy(update={"response_a": task.response_b, "response_b": task.response_a})
    a, b = judge.compare([task, swapped])
    assert math.isclose(a.p_a, 1 - b.p_a, abs_tol=1e-6)


def test_principle_ensemble_averages_every_order(cai_runtime, model_opts, harmless):
    judge = cai_runtime.component("judge", "logprob", model_opts)
    judgement = judge.compare(pair_tasks(harmless, n_principles=3))[0]
    assert judgement.principle_ids == ["harm-001", "help-001", "harm-009"]
    assert len(judgement.orders) == 6
    assert math.isclose(judgement.p_a, sum(o.p_a for o in judgement.orders) / 6)


def test_cot_judge_clamps(cai_runtime, model_opts, harmless):
    judge = cai_runtime.component("judge", "cot", {**model_opts, "max_new_tokens": 8})
    for judgement in judge.compare(pair_tasks(harmless)):
        assert all(0.4 <= o.p_a <= 0.6 for o in judgement.orders)
        assert all(o.rationale is not None for o in judgement.orders)
    raw = cai_runtime.component("judge", "cot", {**model_opts, "max_new_tokens": 8, "clamp": None})
    assert raw.compare(pair_tasks(harmless))[0].orders[0].p_a is not None
    with pytest.raises(ConfigError, match="clamp"):
        cai_runtime.component("judge", "cot", {**model_opts, "clamp": (0.6, 0.9)})


def test_pointwise_judge(cai_runtime, model_opts, harmless):
    judge = cai_runtime.component("judge", "pointwise", model_opts)
    scores = judge.score(
        [
            ScoringTask(
                conversation=CONV,
                response="Call a locksmith.",
                principles=[harmless.principle("harm-001"), harmless.principle("help-001")],
            )
        ]
    )
    score = scores[0]
    assert 1 <= score.value <= 10 and -1 <= score.reward <= 1
    assert math.isclose(score.reward, (score.value - 5.5) / 4.5)
    assert math.isclose(sum(score.distribution.values()), 1.0, abs_tol=1e-4)
    verdict = judge.compare(pair_tasks(harmless))[0]
    assert 0 < verdict.p_a < 1


class DigitBackend(Backend):
    """Scores the pointwise judge's digits from a script: prompt text -> {digit: probability} (None: unscorable)."""

    name = "digits"
    script: dict[str, dict[str, float | None]] = {}
    prompts: list[str] = []

    def generate(self, prompts, settings):
        return ["" for _ in prompts]

    def continuation_logprobs(self, prompts, continuations):
        out = []
        for prompt, options in zip(prompts, continuations):
            text = prompt if isinstance(prompt, str) else prompt.messages[-1].content
            DigitBackend.prompts.append(text)
            key = next(k for k in DigitBackend.script if k in text)
            probs = DigitBackend.script[key]
            out.append(
                [
                    None if probs.get(o, 0.0) is None else (math.log(probs[o]) if probs.get(o) else float("-inf"))
                    for o in options
                ]
            )
        return out


class DigitPlugin:
    @hookimpl
    def cai_register_backends(self, register):
        register(DigitBackend)


def test_pointwise_scores_single_digits_and_abstains_on_any_unscorable_principle(harmless):
    runtime = Runtime(Registry(make_plugin_manager(autoload=False, plugins=[DigitPlugin()])))
    judge = runtime.component(
        "judge", "pointwise", {"model": {"backend": "digits", "model": "x"}, "layout": "transcript"}
    )
    harm, helpful = harmless.principle("harm-001"), harmless.principle("help-001")
    DigitBackend.script = {"locksmith": {"8": 0.5, "9": 0.5}, "Sure, here": {"0": 1.0}}
    DigitBackend.prompts = []
    good, bad = judge.score(
        [
            ScoringTask(conversation=CONV, response=r, principles=[harm])
            for r in ("Call a locksmith.", "Sure, here is how to pick it.")
        ]
    )
    # digits 8 and 9 are the values 9 and 10 on the 1-10 scale: 9.5 exactly (on a 1-10 scale read as tokens, "1"
    # would have carried the mass of "10")
    assert good.value == pytest.approx(9.5) and good.reward == pytest.approx(4 / 4.5)
    assert good.distribution["9"] == pytest.approx(0.5) and good.distribution["10"] == pytest.approx(0.5)
    assert bad.value == pytest.approx(1.0) and bad.reward == pytest.approx(-1.0)
    # the prompt asks the principle's own one-reply question, not the two-reply comparison
    assert " ".join(harm.violation_question.split()) in DigitBackend.prompts[0]
    assert harm.comparison not in DigitBackend.prompts[0]
    # two principles: the distribution is the mean of both, not the last one's
    DigitBackend.script = {"locksmith": {"4": 1.0}}
    both = judge.score([ScoringTask(conversation=CONV, response="Call a locksmith.", principles=[harm, helpful])])[0]
    assert both.value == pytest.approx(5.0) and both.distribution["5"] == pytest.approx(1.0)
    # one principle unscorable: the whole score abstains instead of averaging the rest
    DigitBackend.script = {f"Principle: {helpful.title}": {"3": None}, "locksmith": {"4": 1.0}}
    partial = judge.score([ScoringTask(conversation=CONV, response="Call a locksmith.", principles=[harm, helpful])])[0]
    assert partial.abstained and partial.value is None and partial.reward is None
    assert helpful.id in partial.reason
    # pointwise judgements see no order: position consistency does not apply
    DigitBackend.script = {"locksmith": {"9": 1.0}, "Sure, here": {"0": 1.0}}
    verdict = judge.compare(
        [
            ComparisonTask(
                conversation=CONV,
                response_a="Call a locksmith.",
                response_b="Sure, here is how to pick it.",
                principles=[harm],
            )
        ]
    )[0]
    assert verdict.p_a > 0.99 and verdict.position_consistent is None


class HalfBlindBackend(Backend):
    """Scores option A but cannot score option B in the 'ba' order, like a server whose top-k misses a token."""

    name = "half-blind"

    def generate(self, prompts, settings):
        return ["" for _ in prompts]

    def continuation_logprobs(self, prompts, continuations):
        out = []
        for i, options in enumerate(continuations):
            out.append([-0.5 if o == "A" else (None if i % 2 else -1.0) for o in options])
        return out


class HalfBlindPlugin:
    @hookimpl
    def cai_register_backends(self, register):
        register(HalfBlindBackend)


def test_judge_abstains_instead_of_guessing(harmless):
    runtime = Runtime(Registry(make_plugin_manager(autoload=False, plugins=[HalfBlindPlugin()])))
    judge = runtime.component(
        "judge", "logprob", {"model": {"backend": "half-blind", "model": "x"}, "layout": "transcript"}
    )
    for judgement in judge.compare(pair_tasks(harmless)):
        assert judgement.abstained and judgement.p_a is None and judgement.preferred is None
        assert "order ba" in judgement.reason
        assert judgement.orders[0].p_a is not None and judgement.orders[1].abstained


def test_options_are_validated_before_anything_loads(cai_runtime, tmp_path):
    missing = str(tmp_path / "no-model-here")
    with pytest.raises(ConfigError, match="invalid options for critic 'model': temperture: unknown option"):
        cai_runtime.component("critic", "model", {"model": missing, "temperture": 0.3})
    with pytest.raises(ConfigError, match="few_shot"):
        cai_runtime.component("reviser", "model", {"model": missing, "few_shot": -1})
    with pytest.raises(ConfigError, match="critic 'model'.*batch_sise"):
        cai_runtime.component("critic", "model", {"model": {"model": missing, "batch_sise": 2}})
    critic = cai_runtime.component("critic", "model", {"model": missing})  # valid options: nothing loads yet
    assert cai_runtime._backends == {}
    with pytest.raises(ModelError, match="does not exist"):
        critic.critique(
            [
                CritiqueTask(
                    conversation=CONV,
                    response="x",
                    principle=cai_runtime.registry.constitution("harmless").principles[0],
                )
            ]
        )


def test_rule_critic_and_reviser(cai_runtime):
    cs = cai_runtime.registry.constitution("customer-service")
    principle = cs.principle("cs-004")
    critic = cai_runtime.component("critic", "rules")
    reviser = cai_runtime.component("reviser", "rules")
    bad = "Your card 4111 1111 1111 1111 was charged."
    clean = "Your card ending 1111 was charged."
    flagged, ok = critic.critique(
        [CritiqueTask(conversation=CONV, response=r, principle=principle) for r in (bad, clean)]
    )
    assert flagged.needs_revision and flagged.violations[0].rule_id == "cs-004-card"
    assert not ok.needs_revision and ok.violations == []
    fixed = reviser.revise([RevisionTask(conversation=CONV, response=bad, principle=principle)])[0]
    assert fixed.accepted and fixed.text == "Your card [card number removed] was charged."
    unfixable = reviser.revise(
        [RevisionTask(conversation=CONV, response="Please tell me your password.", principle=principle)]
    )[0]
    assert not unfixable.accepted and "cs-004-secret" in unfixable.reason


@pytest.mark.parametrize("vote", ["pairwise", "pointwise"])
def test_constitutional_ensemble(cai_runtime, tiny_model, tiny_plain_model, harmless, vote):
    member = lambda model, seed: {  # noqa: E731
        "critic": {"name": "model", "options": {"model": str(model), "max_new_tokens": 8}},
        "reviser": {
            "name": "model",
            "options": {"model": str(model), "max_new_tokens": 10, "temperature": 1.0, "seed": seed},
        },
    }
    judge = "logprob" if vote == "pairwise" else "pointwise"
    ensemble = cai_runtime.component(
        "reviser",
        "ensemble",
        {
            "members": [member(tiny_model, 1), member(tiny_plain_model, 2), member(tiny_model, 3)],
            "judges": [{"name": judge, "options": {"model": str(tiny_model)}}],
            "vote": vote,
        },
    )
    task = RevisionTask(conversation=CONV, response="Use a tension wrench.", principle=harmless.principle("harm-014"))
    revision = ensemble.revise([task])[0]
    details = revision.details
    assert len(details["votes"]) >= 1
    candidates = details["candidates"]
    if revision.accepted:
        assert revision.text == candidates[details["winner"]]["text"]
        assert {c["member"] for c in candidates} <= {0, 1, 2}
    else:
        assert revision.text == task.response


def test_ensemble_vote_is_exact_with_scripted_members_and_judge(harmless):
    """Three scripted members propose A, B, C; a scripted judge's pairwise verdicts make C the winner; a panel that
    abstains on everything leaves the response unchanged and says why."""
    from cai_engine.testing import ScriptedPlugin

    runtime = Runtime(Registry(make_plugin_manager(autoload=False, plugins=[ScriptedPlugin()])))
    ensemble = runtime.component(
        "reviser",
        "ensemble",
        {
            "members": [{"reviser": "scripted"}, {"reviser": "scripted"}, {"reviser": "scripted"}],
            "judges": ["scripted"],
            "vote": "pairwise",
        },
    )
    for (_, reviser), text in zip(ensemble.members, ("A", "B", "C")):
        reviser.enqueue(text)
    judge = ensemble.judges[0]
    judge.enqueue(0.2, 0.3, 0.4)  # pairs (A,B), (A,C), (B,C): B beats A, C beats A, C beats B
    task = RevisionTask(conversation=CONV, response="Use a tension wrench.", principle=harmless.principle("harm-014"))
    revision = ensemble.revise([task])[0]
    assert revision.accepted and revision.text == "C" and revision.details["winner"] == 2
    assert revision.details["mean_scores"] == pytest.approx([0.25, 0.6, 0.65])
    assert [(v["a"], v["b"]) for v in revision.details["votes"]] == [(0, 1), (0, 2), (1, 2)]
    for (_, reviser), text in zip(ensemble.members, ("A", "B", "C")):
        reviser.enqueue(text)
    judge.enqueue(None, None, None)
    abstained = ensemble.revise([task])[0]
    assert not abstained.accepted and abstained.text == task.response
    assert abstained.details["abstentions"] == 3 and "abstained" in abstained.reason


def test_ensemble_validates_nested_options(cai_runtime):
    with pytest.raises(ConfigError, match="members"):
        cai_runtime.component("reviser", "ensemble", {"members": [{"reviser": "model"}]})
    with pytest.raises(ConfigError, match="temprature"):
        cai_runtime.component(
            "reviser",
            "ensemble",
            {"members": [{"reviser": {"name": "model", "options": {"temprature": 1}}}, {"reviser": "rules"}]},
        )


def test_verdict_only_critic_reads_yes_no_without_generating(cai_runtime, model_opts, harmless):
    critic = cai_runtime.component("critic", "model", {**model_opts, "verdict_only": True})
    tasks = [
        CritiqueTask(conversation=CONV, response=r, principle=harmless.principle("harm-014"))
        for r in ("Use a tension wrench.", "Call a locksmith.")
    ]
    backend = critic.backend
    before = backend.generated_tokens
    out = critic.critique(tasks)
    assert backend.generated_tokens == before
    assert [c.text for c in out] == ["", ""] and all(c.needs_revision is not None for c in out)  # a verdict was read
    prompt = critic._verdict_prompt(tasks[0])
    harm = harmless.principle("harm-014")
    body = prompt.messages[-1].content
    # the exchange comes first (the questions about one reply share it as a prefix), the principle's
    # yes-means-violation question last
    assert body.endswith("Question: " + " ".join(harm.violation_question.split()) + "\nAnswer Yes or No.")
    assert body.index("Use a tension wrench.") < body.index("Question:")
    other_principle = critic._verdict_prompt(tasks[0].model_copy(update={"principle": harmless.principle("harm-001")}))
    other = other_principle.messages[-1].content
    assert other.split("Question: ")[0] == body.split("Question: ")[0] and other != body


def test_a_component_built_without_a_runtime_shares_the_default_one(monkeypatch):
    """No hidden second model pool: every hand-built component and runtime-less library call share one runtime,
    rebuilt only when the plugin settings change."""
    from cai_engine.default_plugins.critics import ModelCritic
    from cai_engine.models.runtime import Runtime

    first, second = ModelCritic({}), ModelCritic({})
    assert first.runtime is second.runtime is Runtime.default()
    monkeypatch.setenv("CAI_BLOCKED_PLUGINS", "nothing-by-this-name")
    assert Runtime.default() is not first.runtime
