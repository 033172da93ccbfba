from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_engine import ConstitutionError, load_constitution
from cai_engine.constitution.load import lint
from cai_engine.constitution.model import Constitution

BASE = """name: base
version: "1"
principles:
  - id: a
    critique_request: critique a
    revision_request: revise a
    comparison: compare a
  - id: b
    critique_request: critique b
    revision_request: revise b
    comparison: compare b
examples:
  - conversation: [{role: user, content: hi}]
    response: hello
    critique: fine
    revision: hello
    needs_revision: false
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


BROKEN = [
    ("empty.yaml", "", None, "empty"),
    ("blank.yaml", "  \n\n", None, "empty"),
    (
        "syntax.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    critique_request: [oops\n',
        "line 6",
        "invalid YAML",
    ),
    ("bad.json", '{"name": "x", "version": 1,}', "line 1", "invalid JSON"),
    ("missing.yaml", "name: x\nprinciples: []\n", "version", "required field is missing"),
    (
        "wrongtype.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    weight: heavy\n',
        ":5: principles[0].weight",
        "valid number",
    ),
    (
        "unknown.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    critque_request: c\n',
        ":5: principles[0].critque_request",
        "unknown key",
    ),
    ("dup.yaml", BASE.replace("id: b", "id: a"), ":8: principles[1].id", "duplicate principle id 'a'"),
    ("dupkey.yaml", "name: x\nname: y\n", "line 2", "duplicate key 'name'"),
    ("latin1.yaml", b'name: x\nversion: "1"\ndescription: caf\xe9\n', "line 3", "not UTF-8"),
    ("list.yaml", "[1, 2]\n", None, "top level must be a mapping"),
    (
        "parent.yaml",
        'name: x\nversion: "1"\nextends: nosuch.yaml\nprinciples: []\n',
        ":3: extends[0]",
        "cannot load parent",
    ),
    (
        "noreq.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    comparison: q\n',
        "critique_request",
        "is missing",
    ),
    ("nocomp.yaml", 'name: x\nversion: "1"\nprinciples:\n  - id: a\n    phases: [rl]\n', "comparison", "rl phase"),
    (
        "emptyreq.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - {id: a, critique_request: " ", revision_request: r, comparison: q}\n',
        "critique_request",
        "is empty",
    ),
    ("nopr.yaml", 'name: x\nversion: "1"\nprinciples: []\n', "principles", "no principles"),
    (
        "badregex.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    phases: [runtime]\n    rules:\n'
        '      - {id: r, kind: forbid, pattern: "(x", message: m}\n',
        ":7: principles[0].rules[0].pattern",
        "regular expression",
    ),
    (
        "badfix.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    phases: [runtime]\n    rules:\n'
        '      - {id: r, kind: require, pattern: "consult", fix: "see a doctor", message: m}\n',
        "rules[0].fix",
        "never satisfy",
    ),
    (
        "badid.yaml",
        'name: x\nversion: "1"\nprinciples:\n  - {id: "Bad Id", critique_request: c, revision_request: r, '
        "comparison: q}\n",
        "principles[0].id",
        "pattern",
    ),
    ("notes.txt", "name: x\n", None, "unsupported file type"),
]


@pytest.mark.parametrize(("name", "text", "where", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_constitutions_name_file_and_place(tmp_path, name, text, where, message):
    path = write(tmp_path, name, text)
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    text_of_error = str(info.value)
    assert str(path) in text_of_error
    assert message in text_of_error
    if where:
        assert where in text_of_error
    assert "\n" not in text_of_error


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConstitutionError, match="file not found"):
        load_constitution(tmp_path / "nope.yaml")
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(ConstitutionError, match="is a directory"):
        load_constitution(folder)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "c1.yaml", 'name: c1\nversion: "1"\nextends: c2.yaml\nprinciples: []\n')
    write(tmp_path, "c2.yaml", 'name: c2\nversion: "1"\nextends: [c1.yaml]\nprinciples: []\n')
    with pytest.raises(ConstitutionError, match=r"cycle: c1 .* -> c2 .* -> c1"):
        load_constitution(tmp_path / "c1.yaml")


def test_self_extension_is_a_cycle(tmp_path):
    write(tmp_path, "me.yaml", 'name: me\nversion: "1"\nextends: me.yaml\nprinciples: []\n')
    with pytest.raises(ConstitutionError, match="cycle"):
        load_constitution(tmp_path / "me.yaml")


def test_extends_overrides_by_id_appends_and_removes(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.json",
        json.dumps(
            {
                "name": "child",
                "version": "2",
                "extends": "base.yaml",
                "remove": ["a"],
                "stance": "helpfulness-first",
                "principles": [
                    {
                        "id": "b",
                        "critique_request": "new b",
                        "revision_request": "r",
                        "comparison": "q",
                        "authority": 90,
                    },
                    {"id": "c", "critique_request": "c", "revision_request": "r", "comparison": "q"},
                ],
            }
        ),
    )
    resolved = load_constitution(child)
    assert [p.id for p in resolved.principles] == ["b", "c"]
    assert resolved.principle("b").critique_request == "new b"
    assert resolved.principle("b").authority == 90
    assert resolved.stance.value == "helpfulness-first"
    assert len(resolved.examples) == 1  # inherited
    assert resolved.extends == [] and resolved.remove == []


def test_override_keeps_parent_position_and_stance_is_inherited(tmp_path):
    write(tmp_path, "base.yaml", BASE.replace('version: "1"', 'version: "1"\nstance: harmlessness-first'))
    child = write(
        tmp_path,
        "child.yaml",
        'name: child\nversion: "1"\nextends: base.yaml\nprinciples:\n'
        "  - {id: a, critique_request: x, revision_request: y, comparison: z}\n",
    )
    resolved = load_constitution(child)
    assert [p.id for p in resolved.principles] == ["a", "b"]
    assert resolved.principle("a").critique_request == "x"
    assert resolved.stance.value == "harmlessness-first"


def test_remove_of_unknown_id_is_an_error(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", 'name: child\nversion: "1"\nextends: base.yaml\nremove: [zzz]\n')
    with pytest.raises(ConstitutionError, match=r"remove\[0\].*'zzz'"):
        load_constitution(child)


def test_extends_by_registered_name(cai_registry, tmp_path):
    child = write(tmp_path, "child.yaml", 'name: child\nversion: "1"\nextends: harmless\nremove: [harm-007]\n')
    resolved = cai_registry.constitution(child)
    harmless = cai_registry.constitution("harmless")
    assert len(resolved.principles) == len(harmless.principles) - 1


def test_unknown_parent_name_lists_known(cai_registry, tmp_path):
    child = write(tmp_path, "child.yaml", 'name: child\nversion: "1"\nextends: nosuch\n')
    with pytest.raises(
        ConstitutionError, match="unknown parent constitution 'nosuch'; known constitutions: .*harmless"
    ):
        cai_registry.constitution(child)


def test_lint_flags_unsettled_conflicts_and_no_change_examples():
    c = Constitution.model_validate(
        {
            "name": "x",
            "version": "1",
            "principles": [
                {
                    "id": "a",
                    "critique_request": "c",
                    "revision_request": "r",
                    "comparison": "q",
                    "tags": ["caution"],
                    "authority": 50,
                },
                {
                    "id": "b",
                    "critique_request": "c",
                    "revision_request": "r",
                    "comparison": "q",
                    "authority": 50,
                    "conflicts_with": ["caution", "nothing"],
                    "examples": [
                        {
                            "conversation": [{"role": "user", "content": "u"}],
                            "response": "r",
                            "critique": "c",
                            "revision": "v",
                        }
                    ],
                },
            ],
        }
    )
    issues = [str(i) for i in lint(c)]
    assert any("conflicts with 'a' and both have authority 50" in i for i in issues)
    assert any("'nothing' matches no other principle" in i for i in issues)
    assert any("no change needed" in i for i in issues)
    assert all(i.startswith("warning") for i in issues)


def test_lint_is_quiet_when_authority_settles_conflict():
    c = Constitution.model_validate(
        {
            "name": "x",
            "version": "1",
            "principles": [
                {
                    "id": "a",
                    "critique_request": "c",
                    "revision_request": "r",
                    "comparison": "q",
                    "tags": ["caution"],
                    "authority": 70,
                },
                {
                    "id": "b",
                    "critique_request": "c",
                    "revision_request": "r",
                    "comparison": "q",
                    "authority": 60,
                    "conflicts_with": ["caution"],
                },
            ],
        }
    )
    assert lint(c) == []


def test_content_hash_changes_with_content_not_schema_pointer(tmp_path):
    a = load_constitution(write(tmp_path, "a.yaml", BASE))
    b = load_constitution(write(tmp_path, "b.yaml", "$schema: ../x.json\n" + BASE))
    c = load_constitution(write(tmp_path, "c.yaml", BASE.replace("critique a", "critique A")))
    assert a.content_hash() == b.content_hash() != c.content_hash()
    assert a.content_hash().startswith("sha256:")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['echo hacked']\nversion: '1'\n")
    with pytest.raises(ConstitutionError, match="invalid YAML"):
        load_constitution(path)


def test_shipped_constitutions_load_and_lint_clean(cai_registry):
    names = cai_registry.constitution_names()
    assert {"harmless", "helpful-first", "harmless-first", "customer-service", "creative-writing"} <= set(names)
    assert cai_registry.broken == []
    for name in names:
        constitution = cai_registry.constitution(name)
        assert [i for i in lint(constitution) if i.level == "error"] == []


def test_default_constitution_covers_the_paper_themes(cai_registry):
    harmless = cai_registry.constitution("harmless")
    assert 14 <= len(harmless.for_phase("sl")) <= 18
    assert 14 <= len(harmless.for_phase("rl")) <= 18
    assert all(p.comparison for p in harmless.for_phase("rl"))
    # counterweights against preachy, evasive or accusatory answers
    counter = [
        p
        for p in harmless.principles
        if any(w in (p.comparison or "").lower() for w in ("preachy", "accusing", "scolding", "condescending"))
    ]
    assert len(counter) >= 3
    assert any(not e.needs_revision for e in harmless.examples)
