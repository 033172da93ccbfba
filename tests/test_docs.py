"""The README and the docs site say what the code does: every `cai` command line in their shell examples exists with
the options it shows, every relative link and include resolves, and the generated reference pages cover every
command, public name and config model (the hooks page: tests/test_hookspecs.py). Fast and model-free; `make docs` builds the site itself with --strict,
which also checks the links between pages, their anchors and the nav."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

import cai_engine
from cai_engine.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
SHELLS = {"bash", "console", "sh", "shell", "shell-session", "zsh"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")


def load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.as_posix()


# ---------------------------------------------------------------------------------------------------------------
# Reading Markdown: fenced blocks, prose, links
# ---------------------------------------------------------------------------------------------------------------


def blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced code block, indented ones (in tabs, lists) too."""
    found: list[tuple[str, int, list[str]]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        language = (opening["info"].strip().split() or [""])[0].lstrip(".{").lower()
        body: list[str] = []
        start = index + 1
        index += 1
        closing = re.compile(rf"^ {{0,{indent + 3}}}{fence[0]}{{{len(fence)},}}\s*$")
        while index < len(lines) and not closing.match(lines[index]):
            line = lines[index]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            index += 1
        found.append((language, start + 1, body))
        index += 1
    return found


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, with the line structure kept (blank lines for code)."""
    lines = text.splitlines()
    fenced = {n for _, start, body in blocks(text) for n in range(start - 2, start + len(body) + 1)}
    kept = ["" if n in fenced else line for n, line in enumerate(lines)]
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", "\n".join(kept))


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
SNIPPET = re.compile(r"^\s*--8<--\s+\"([^\"]+)\"\s*$", re.MULTILINE)


def links(text: str) -> list[str]:
    """Targets of the inline, image and reference links in the prose."""
    body = prose(text)
    return [*LINK.findall(body), *REFERENCE.findall(body)]


# ---------------------------------------------------------------------------------------------------------------
# (a) `cai ...` command lines
# ---------------------------------------------------------------------------------------------------------------

SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*|<[^>]+>|\{[^}]+\})$")  # FILE, RUN, <name>, {a,b}, ...


def shell_commands(language: str, lines: list[str]) -> list[str]:
    """The simple commands in a shell block: continuations joined, prompts and output (console) dropped, pipelines,
    lists and command substitutions split into their commands."""
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        else:
            joined.append(line.strip())
    commands: list[str] = []
    for line in joined:
        if language in ("console", "shell-session"):
            if not line.startswith(("$ ", "% ")):
                continue  # output
            line = line[2:]
        elif line.startswith("$ "):
            line = line[2:]
        pending = [line]
        while pending:
            current = pending.pop()
            for inner in SUBSTITUTION.findall(current):
                pending.append(inner)
            current = SUBSTITUTION.sub("SUBSTITUTION", current)
            try:
                lexer = shlex.shlex(current, posix=True, punctuation_chars=";&|()<>")
                lexer.whitespace_split = True
                lexer.commenters = "#"
                tokens = list(lexer)
            except ValueError:  # an unbalanced quote: not a shell line
                continue
            words: list[str] = []
            for token in [*tokens, ";"]:
                if token and set(token) <= set(";&|()<>"):
                    if words:
                        commands.append(shlex.join(words))
                    words = []
                else:
                    words.append(token)
    return commands


def cai_arguments(command: str) -> list[str] | None:
    """The arguments of a `cai` invocation (after environment assignments, `.venv/bin/cai`, `python -m ...`)."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    if words[:1] in (["sudo"], ["time"], ["nice"], ["exec"]):
        words = words[1:]
    if len(words) >= 3 and words[1] == "-m" and words[2] in ("cai_engine", "cai_engine.cli"):
        return words[3:]
    if words and words[0].rsplit("/", 1)[-1] == "cai":
        return words[1:]
    return None


def option_names(command: click.Command) -> set[str]:
    with click.Context(command, info_name="cai") as ctx:
        params = command.get_params(ctx)
    return {name for p in params if isinstance(p, click.Option) for name in (*p.opts, *p.secondary_opts)}


@functools.cache
def trl_flags() -> frozenset[str]:
    """`cai train` also takes TRL's own settings as flags (`--learning_rate 1e-4`): every field of its config classes."""
    import dataclasses

    import trl

    classes = (trl.SFTConfig, trl.DPOConfig, trl.RewardConfig, trl.GRPOConfig, trl.ScriptArguments, trl.ModelConfig)
    return frozenset(f"--{field.name}" for cls in classes for field in dataclasses.fields(cls))


def problems_with(arguments: list[str]) -> list[str]:
    """What does not exist in `cai ARGUMENTS`: a command of the path, or an option of the command it reaches."""
    command: click.Command = cli
    path = ["cai"]
    problems = []
    for word in arguments:
        word = word.strip("[]")  # [--lora]: an optional flag, shown as such
        if not word or word == "--":
            break
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            known = option_names(command) | (trl_flags() if command.context_settings.get("allow_extra_args") else set())
            if (name.startswith("--") or len(name) == 2) and name not in known:
                problems.append(f"`{' '.join(path)}` has no option {name}")
            continue
        if isinstance(command, click.Group) and word not in ("SUBSTITUTION",):
            if PLACEHOLDER.match(word):
                break  # `cai COMMAND --help`: nothing to check beyond here
            sub = command.commands.get(word)
            if sub is None:
                problems.append(f"`{' '.join(path)}` has no command {word!r}")
                break
            command, path = sub, [*path, word]
    return problems


def cai_lines(page: Path) -> list[tuple[int, str]]:
    found = []
    for language, start, body in blocks(page.read_text(encoding="utf-8")):
        if language in SHELLS:
            for command in shell_commands(language, body):
                if cai_arguments(command) is not None:
                    found.append((start, command))
    return found


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_cai_command_line_exists(page):
    problems = [
        f"{rel(page)}, the block at line {line}: {command}: {problem}"
        for line, command in cai_lines(page)
        for problem in problems_with(cai_arguments(command) or [])
    ]
    assert not problems, "\n".join(problems)


def test_the_readme_shows_cai_commands():
    """The check above reads the README's examples (not an empty list because the block syntax changed)."""
    assert len(cai_lines(ROOT / "README.md")) >= 5


@pytest.mark.parametrize(
    ("block", "found"),
    [
        (["cai sl --limit 8 \\", "  --out runs/x  # a comment"], ["cai sl --limit 8 --out runs/x"]),
        (["$ cai models list | head -3", "smollm2  installed"], ["cai models list", "head -3"]),
        (["cai train sft --model $(cai models path smollm2) --out m && echo done"], None),
        (["CAI_TRACE_PLUGINS=1 cai plugins --all; ls"], ["CAI_TRACE_PLUGINS=1 cai plugins --all", "ls"]),
    ],
)
def test_shell_lines_are_split_into_commands(block, found):
    commands = shell_commands("console" if block[0].startswith("$") else "bash", block)
    if found is None:
        assert {"cai models path smollm2", "echo done"} <= set(commands)
        assert any(c.startswith("cai train sft --model SUBSTITUTION") for c in commands)
    else:
        assert commands == found


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cai constitutions validate FILE --strict", []),
        ("cai rl label --recipe revision --sl-run RUN --out OUT", []),
        ("cai train sft --dataset d --out o [--lora]", []),
        ("cai --version", []),
        ("cai COMMAND --help", []),
        ("cai constitutions lst", ["`cai constitutions` has no command 'lst'"]),
        ("cai sl --rouds 2", ["`cai sl` has no option --rouds"]),
        ("cai policy validate p.yaml --strict=yes", ["`cai policy validate` has no option --strict"]),
    ],
)
def test_a_wrong_command_or_option_is_found(line, expected):
    assert problems_with(cai_arguments(line) or []) == expected


# ---------------------------------------------------------------------------------------------------------------
# (b) links, images and includes
# ---------------------------------------------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a README heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"`|\*\*?|__?|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading, or its explicit `{#id}`."""
    from markdown.extensions.toc import slugify

    explicit = re.search(r"\{[^}]*#([\w-]+)[^}]*\}\s*$", heading)
    if explicit:
        return explicit.group(1)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return slugify(re.sub(r"[`*_]", "", text), "-")


def anchors(page: Path) -> set[str] | None:
    """The anchors of a page's headings; None where part of the page is generated while the site builds."""
    text = page.read_text(encoding="utf-8")
    if page.is_relative_to(DOCS) and re.search(r"^\s*(::: |--8<--|<!-- (fields|cai-commands))", text, re.MULTILINE):
        return None
    slug = github_slug if page.name == "README.md" or not page.is_relative_to(DOCS) else mkdocs_slug
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(text), re.MULTILINE):
        anchor, number = slug(heading), 1
        while anchor in found:  # repeated headings get -1, -2, ... (GitHub) or _1, _2 (MkDocs)
            anchor = f"{slug(heading)}{'-' if slug is github_slug else '_'}{number}"
            number += 1
        found.add(anchor)
    return found


def broken(page: Path) -> list[str]:
    problems = []
    text = page.read_text(encoding="utf-8")
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{rel(page)}: {target}: no such file")
        elif anchor and file.suffix == ".md" and (known := anchors(file)) is not None and anchor not in known:
            problems.append(f"{rel(page)}: {target}: no heading with the anchor #{anchor}")
    for include in SNIPPET.findall(text):
        if not (ROOT / include).is_file():
            problems.append(f"{rel(page)}: --8<-- {include!r}: no such file (snippets read from the repository root)")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    problems = broken(page)
    assert not problems, "\n".join(problems)


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n[ok](other.md#two-words) [self](#title) ![img](missing.png) [gone](other.md#nope)\n"
        "`[not a link](nowhere.md)`\n\n```md\n[in code](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken(page) == [
        f"{rel(page)}: missing.png: no such file",
        f"{rel(page)}: other.md#nope: no heading with the anchor #nope",
    ]


def test_slugs_follow_github_and_mkdocs():
    assert github_slug("Security and limits") == "security-and-limits"
    assert github_slug("`cai serve`: a guard server") == "cai-serve-a-guard-server"
    assert mkdocs_slug("Embedding the guard") == "embedding-the-guard"
    assert mkdocs_slug("cai rl label { #cai-rl-label data-toc-label='label' }") == "cai-rl-label"


# ---------------------------------------------------------------------------------------------------------------
# (c) the generated reference covers the code
# ---------------------------------------------------------------------------------------------------------------


def test_every_top_level_command_has_a_page():
    """docs/reference/cli/<command>.md renders that command with mkdocs-click, one page per command, no stale page."""
    pages = {p.stem for p in (DOCS / "reference" / "cli").glob("*.md")} - {"index"}
    assert pages == set(cli.commands)
    for name in cli.commands:
        text = (DOCS / "reference" / "cli" / f"{name}.md").read_text(encoding="utf-8")
        assert "::: mkdocs-click" in text and f":command: {name.replace('-', '_')}\n" in text, name
        assert f":prog_name: cai {name}\n" in text, name
    mkdocs_yml = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert all(f"reference/cli/{name}.md" in mkdocs_yml for name in cli.commands)


def test_the_cli_pages_resolve_commands_by_name():
    cli_docs = load_tool("cli_docs")
    assert cli_docs.rl is cli.commands["rl"] and cli_docs.eval is cli.commands["eval"]
    assert not getattr(cli_docs.root, "commands", None) and cli_docs.root.help == cli.help
    with pytest.raises(AttributeError):
        cli_docs.nope  # noqa: B018


def test_every_public_name_is_on_the_api_page():
    text = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: cai_engine\.(\w+)\s*$", text, re.MULTILINE))
    assert documented == set(cai_engine.__all__)


FIELDS = re.compile(r"^\s*<!-- fields: ([\w.]+)(?: \d)? -->$", re.MULTILINE)


def config_pages() -> list[Path]:
    return sorted(p for p in (DOCS / "reference" / "config").glob("*.md") if p.stem != "index")


@pytest.mark.parametrize("page", config_pages(), ids=rel)
def test_config_pages_have_fields_and_a_complete_example(page):
    pytest.importorskip("markdown")  # the hooks build on Python-Markdown (the docs extra)
    hooks = load_tool("mkdocs_hooks")
    text = page.read_text(encoding="utf-8")
    models = FIELDS.findall(text)
    assert models, f"{rel(page)} has no <!-- fields: ... --> table"
    for dotted in models:
        tables = hooks.fields_tables(hooks.load_model(dotted), 3)
        assert tables.count("| Field | Type | Default | Description |") >= 1
    assert SNIPPET.findall(text), f"{rel(page)} includes no example file"


def test_the_field_tables_follow_the_models():
    pytest.importorskip("markdown")
    hooks = load_tool("mkdocs_hooks")
    tables = hooks.fields_tables(hooks.load_model("cai_engine.pipeline.PipelineConfig"), 3)
    assert "| `feedback_model` | str \\| dict[str, any] \\| null | `null` |" in tables
    assert "| `sl` | [SLConfig](#slconfig) | its defaults |" in tables
    assert "### `SLConfig`" in tables and "### `LabelConfig`" in tables and tables.count("### `ComponentRef`") == 1
    policy = hooks.fields_tables(hooks.load_model("cai_engine.guard.policy.Policy"), 3)
    assert "| `$schema` |" in policy and "| `constitutions` | list[str] | required |" in policy
    with pytest.raises(ValueError, match="not a pydantic model"):
        hooks.load_model("cai_engine.pipeline.run_pipeline")


@pytest.mark.parametrize(
    ("example", "model"),
    [
        ("examples/sl.yaml", "cai_engine.phase1.revise.SLConfig"),
        ("examples/rl-label.yaml", "cai_engine.phase2.labels.LabelConfig"),
        ("examples/pipeline.yaml", "cai_engine.pipeline.PipelineConfig"),
        ("examples/teacher-student.yaml", "cai_engine.pipeline.PipelineConfig"),
        ("examples/teacher-student-engage.yaml", "cai_engine.pipeline.PipelineConfig"),
        ("examples/decisions.yaml", "cai_engine.pipeline.PipelineConfig"),
    ],
)
def test_the_config_examples_are_valid(example, model):
    pytest.importorskip("markdown")
    hooks = load_tool("mkdocs_hooks")
    hooks.load_model(model).model_validate(yaml.safe_load((ROOT / example).read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    ("example", "trainer"),
    [("train-sft.yaml", "SFT"), ("train-decisions.yaml", "SFT"), ("train-decisions-dpo.yaml", "DPO")],
)
def test_the_training_examples_are_valid(example, trainer):
    import dataclasses

    import trl

    from cai_engine.default_plugins import trainers

    data = yaml.safe_load((ROOT / "examples" / example).read_text(encoding="utf-8"))
    assert data.pop("dataset") and data.pop("out")
    options = getattr(trainers, trainer).Options.model_validate(data)
    config = getattr(trl, getattr(trainers, trainer).trl_config_class)
    assert set(options.trl) <= {f.name for f in dataclasses.fields(config)}  # every TRL setting is one TRL knows


def test_the_decisions_pipeline_trains_as_the_training_example_does():
    """examples/decisions.yaml is the run of `cai export decisions` + examples/train-decisions.yaml, through cai run."""
    from cai_engine.default_plugins.trainers import SFT
    from cai_engine.pipeline import PipelineConfig

    pipeline = yaml.safe_load((ROOT / "examples" / "decisions.yaml").read_text(encoding="utf-8"))
    training = yaml.safe_load((ROOT / "examples" / "train-decisions.yaml").read_text(encoding="utf-8"))
    sft = SFT.Options.model_validate(pipeline["sft"])
    alone = SFT.Options.model_validate({k: v for k, v in training.items() if k not in ("dataset", "out")})
    assert (sft.decision_weight, sft.decision_tokens) == (alone.decision_weight, alone.decision_tokens)
    assert {k: v for k, v in sft.trl.items() if k != "seed"} == {k: v for k, v in alone.trl.items() if k != "seed"}
    decisions = PipelineConfig.model_validate(pipeline).decisions
    assert decisions is not None and decisions.harmless_weight == 2.5 and "sft" in pipeline["stages"]


def test_the_trl_style_training_example_reads_as_the_same_run():
    """examples/train-sft-trl.yaml (TRL's flat names) resolves to the same settings as examples/train-sft.yaml."""
    from cai_engine.cli.train import resolve_train_settings
    from cai_engine.default_plugins.trainers import SFT

    def resolve(name):
        data = yaml.safe_load((ROOT / "examples" / name).read_text(encoding="utf-8"))
        return resolve_train_settings("sft", SFT, data, name, {}, {}, [])

    (ours, our_options), (trls, trl_options) = resolve("train-sft.yaml"), resolve("train-sft-trl.yaml")
    assert {k: str(v) for k, v in ours.items() if v} == {k: str(v) for k, v in trls.items() if v}
    assert our_options == trl_options


def test_the_changelog_page_includes_the_changelog():
    assert SNIPPET.findall((DOCS / "changelog.md").read_text(encoding="utf-8")) == ["CHANGELOG.md"]


def test_rst_in_docstrings_reads_as_markdown():
    """tools/griffe_rst.py, which the API and hooks pages use: roles, version notes and literal-block colons."""
    pytest.importorskip("griffe")
    convert = load_tool("griffe_rst").convert
    doc = (
        "Register :class:`cai_engine.Backend` subclasses, see :func:`~cai_engine.plugins.manager.make_plugin_manager`"
        "::\n\n    register(MyBackend)\n\n:param register: raises ``TypeError``.\n\n.. versionadded:: 0.1\n"
    )
    assert convert(doc) == (
        "Register `cai_engine.Backend` subclasses, see `make_plugin_manager`:\n\n    register(MyBackend)\n\n"
        "*Added in version 0.1.*\n\n:param register: raises ``TypeError``.\n"
    )
