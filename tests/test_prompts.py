from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_engine import load_prompts
from cai_engine.prompts.sets import PromptError, load_prompt_file


def test_builtin_sets(cai_registry):
    red = load_prompts("builtin:red-team", cai_registry)
    helpful = load_prompts("builtin:helpful", cai_registry)
    assert len(red) >= 150 and len(helpful) >= 150
    assert len({p.category for p in red}) >= 10
    assert len({p.id for p in red}) == len(red)
    assert load_prompts("builtin:red-team", cai_registry, limit=3) == red[:3]


def test_jsonl_with_field_and_multi_turn(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"q": "single?"},
        {
            "q": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and now?"},
            ]
        },
        {"q": [{"role": "user", "content": "done"}, {"role": "assistant", "content": "reply"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    items = load_prompt_file(path, field="q")
    assert [len(i.conversation) for i in items] == [1, 3, 1]
    assert items[2].conversation[-1].content == "done"  # a finished exchange becomes its prompt
    assert items[0].id.startswith("p-")
    with pytest.raises(PromptError, match=r"p.jsonl:1: no field 'prompt2'; fields here: q"):
        load_prompt_file(path, field="prompt2")


def test_csv_and_text(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("id,question,category\na,How?,x\nb,Why?,y\n", encoding="utf-8")
    items = load_prompt_file(csv_file, field="question")
    assert [(i.id, i.text, i.category) for i in items] == [("a", "How?", "x"), ("b", "Why?", "y")]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\none\n", encoding="utf-8")
    assert [i.text for i in load_prompt_file(txt)] == ["one", "two"]


def test_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"instruction": "Do a thing."}, {"instruction": "Do another."}]).save_to_disk(
        str(tmp_path / "ds")
    )
    assert [i.text for i in load_prompt_file(tmp_path / "ds")] == ["Do a thing.", "Do another."]
    datasets.Dataset.from_list([{"prompt": "From parquet."}]).to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompt_file(tmp_path / "p.parquet")[0].text == "From parquet."


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "contains no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad.jsonl:2: invalid JSON"),
        ("latin.txt", b"caf\xe9\n", "not UTF-8"),
        ("nofield.jsonl", '{"body": "x"}\n', "none of the usual prompt fields"),
        ("array.jsonl", "[1, 2]\n", "must be a JSON object"),
        ("blank.jsonl", '{"prompt": "  "}\n', "is empty"),
        ("ends.jsonl", '{"messages": [{"role": "system", "content": "s"}]}\n', "must end with a user turn"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptError, match=message):
        load_prompt_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptError, match="no such file"):
        load_prompt_file(tmp_path / "nope.jsonl")


def test_no_shipped_training_prompt_is_a_heldout_prompt(cai_registry):
    from cai_engine.prompts.sets import heldout_fingerprints, load_prompts, normalise_prompt

    heldout = heldout_fingerprints(cai_registry)
    assert len(heldout) >= 160
    for name in cai_registry.prompt_set_names():
        if cai_registry.prompt_set(name).heldout:
            continue
        for item in load_prompts(f"builtin:{name}", cai_registry):
            assert normalise_prompt(item.text) not in heldout, (name, item.id, heldout.get(normalise_prompt(item.text)))


def test_a_copy_of_a_heldout_prompt_is_refused_by_content(cai_runtime, tmp_path):
    from cai_engine import ConfigError
    from cai_engine.phase1.revise import SLConfig, SLRun
    from cai_engine.prompts.sets import load_prompts

    first = load_prompts("builtin:heldout", cai_runtime.registry)[0]
    copy = tmp_path / "mine.jsonl"
    copy.write_text(json.dumps({"id": "x", "prompt": "  " + first.text.upper() + "!! "}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is the held-out evaluation prompt heldout:"):
        SLRun(SLConfig(prompts=str(copy), helpful_prompts=None), tmp_path / "run", cai_runtime)
    SLRun(SLConfig(prompts=str(copy), helpful_prompts=None, allow_heldout=True), tmp_path / "ok", cai_runtime)


def test_a_plugin_prefix_is_checked_not_ignored(cai_runtime):
    from cai_engine import PromptSet, UnknownComponentError, hookimpl
    from cai_engine.plugins.manager import make_plugin_manager
    from cai_engine.plugins.registry import Registry

    class Clinic:
        @hookimpl
        def cai_register_prompt_sets(self, register):
            register(PromptSet(name="clinic-set", path=Path(__file__)))

    registry = Registry(make_plugin_manager(autoload=False, plugins=[Clinic()]))
    owner = registry._prompt_sets["clinic-set"].plugin
    assert registry.prompt_set(f"{owner}:clinic-set").name == "clinic-set"
    assert registry.prompt_set("builtin:red-team").name == "red-team" and registry.prompt_set("red-team")
    with pytest.raises(UnknownComponentError, match="medical:red-team"):
        registry.prompt_set("medical:red-team")  # the built-in red-team set is not the medical plugin's
