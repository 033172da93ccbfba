"""The guard as a security boundary: what it reads (regular files only, bounded while read, linear to load), how it
reads guard input (once, from a file or a pipe), and what a stopped or killed run leaves behind (nothing half-written,
a failed-run audit record, output and audit synced to disk). No model is loaded anywhere here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cai_engine import ConfigError
from cai_engine.cli import cli
from cai_engine.constitution.load import lint, load_constitution, read_constitution_file
from cai_engine.constitution.model import Constitution
from cai_engine.errors import ConstitutionError
from cai_engine.files.inputs import read_text
from cai_engine.files.jsonl import iter_jsonl
from cai_engine.guard.engine import Engine
from cai_engine.guard.policy import load_policy

fcntl = pytest.importorskip("fcntl")  # POSIX: FIFOs, devices, locks and signals

PRINCIPLE = {
    "critique_request": "Point out anything harmful in the reply.",
    "revision_request": "Rewrite the reply without the harmful part.",
    "comparison": "Which reply is less harmful?",
}
ROWS = [
    {"id": "card", "prompt": "Why was I charged twice?", "response": "Your card 4111 1111 1111 1111 was charged."},
    {"id": "secret", "prompt": "I'm locked out.", "response": "Please tell me your password so I can check."},
    {"id": "fine", "prompt": "Hi", "response": "Hello! How can I help?"},
]


@pytest.fixture
def watchdog():
    """Fail a test that blocks (a FIFO opened for reading waits for a writer) instead of hanging the run."""

    def expired(signum, frame):
        raise TimeoutError("blocked for 20 s: the file was waited on instead of refused")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def policy_data(tmp_path: Path, **extra) -> dict:
    data = {
        "name": "gate",
        "constitutions": ["customer-service"],
        "model": "none",
        "guard": {"action": "revise", "max_rounds": 1, "on_failure": "refuse"},
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    data.update(extra)
    return data


def write_policy(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_data(tmp_path, **extra)))
    return path


def write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


# -- 1. files: regular files only, bounded while read, linear to load --------------------------------------------------


def _special(tmp_path: Path, kind: str, name: str) -> Path:
    path = tmp_path / name
    if kind == "symlink to a device":  # /dev/null: harmless if read; /dev/zero is in test_hostile_inputs, in a budget
        path.symlink_to("/dev/null")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("symlink to a device", "is a character device (through the symlink"),
        ("fifo", "is a FIFO (named pipe), not a regular file"),
        ("directory", "is a directory"),
    ],
)
def test_policies_and_constitutions_are_read_only_from_regular_files(tmp_path, watchdog, kind, needle):
    policy = _special(tmp_path, kind, "policy.yaml")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_policy(policy)
    constitution = _special(tmp_path, kind, "constitution.yaml")
    with pytest.raises(ConstitutionError, match=re.escape(needle)):
        read_constitution_file(constitution)
    parent = _special(tmp_path, kind, "parent.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"name": "child", "version": "1", "extends": ["./parent.yaml"]}))
    with pytest.raises(ConstitutionError, match="cannot load parent './parent.yaml'") as caught:
        load_constitution(child)
    assert needle in str(caught.value) and parent.name in str(caught.value)


def test_the_byte_limit_holds_while_reading(tmp_path, monkeypatch):
    """A file that reports a small size but never ends (it grows, or a device hides behind it) is read only up to
    the limit, never whole."""
    import cai_engine.files.inputs as inputs

    class Endless:
        asked = 0

        def read(self, n=-1):
            assert n > 0, "an unbounded read"
            Endless.asked += n
            return b"x" * n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    small = os.stat_result((0o100644, 1, 1, 1, 0, 0, 10, 0, 0, 0))  # a regular file of 10 bytes, as fstat said
    monkeypatch.setattr(inputs, "open_document", lambda path, wanted="": (Endless(), small))
    monkeypatch.setenv("CAI_LIMIT_DOCUMENT_BYTES", "1000")
    with pytest.raises(ConstitutionError, match="over the limit of 1,000 bytes"):
        read_text(tmp_path / "growing.yaml")
    assert Endless.asked == 1001


def test_guard_input_is_never_a_device(tmp_path):
    with pytest.raises(ConfigError, match="/dev/zero: is a character device"):
        list(iter_jsonl("/dev/zero"))
    with pytest.raises(ConfigError, match="is a directory"):
        list(iter_jsonl(tmp_path))


def _constitution(path: Path, name: str, extends: list[str]) -> None:
    path.write_text(
        yaml.safe_dump({"name": name, "version": "1", "extends": extends, "principles": [dict(PRINCIPLE, id=name)]})
    )


def test_an_extends_cycle_through_symlinks_is_named(tmp_path):
    _constitution(tmp_path / "a.yaml", "a", ["./b.yaml"])
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    with pytest.raises(ConstitutionError, match=r"forms a cycle: a \(.*a.yaml\) -> a \(.*b.yaml -> a.yaml\)"):
        load_constitution(tmp_path / "a.yaml")

    # Two files with different names, closed through a symlinked folder: the same file by identity.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to("..")
    _constitution(tmp_path / "x.yaml", "x", ["./y.yaml"])
    _constitution(tmp_path / "y.yaml", "y", ["./sub/up/x.yaml"])
    with pytest.raises(ConstitutionError, match=r"forms a cycle: x .* -> y .* -> x .*the same file as x"):
        load_constitution(tmp_path / "x.yaml")

    # A symlink that points at itself through another: a clear error naming the loop, not a RuntimeError.
    (tmp_path / "c.yaml").symlink_to("d.yaml")
    (tmp_path / "d.yaml").symlink_to("c.yaml")
    _constitution(tmp_path / "e.yaml", "e", ["./c.yaml"])
    with pytest.raises(ConstitutionError, match=r"symlink loop \(.*c.yaml -> d.yaml -> c.yaml\)"):
        load_constitution(tmp_path / "e.yaml")


def test_one_parent_reached_by_two_paths_is_read_once(tmp_path, monkeypatch):
    import cai_engine.constitution.load as constitutions

    _constitution(tmp_path / "base.yaml", "base", [])
    (tmp_path / "alias.yaml").symlink_to("base.yaml")
    _constitution(tmp_path / "top.yaml", "top", ["./base.yaml", "./alias.yaml", "./sub/../base.yaml"])
    (tmp_path / "sub").mkdir()
    reads = []
    original = constitutions.read_constitution_file
    monkeypatch.setattr(constitutions, "read_constitution_file", lambda p: reads.append(p) or original(p))
    resolved = constitutions.load_constitution(tmp_path / "top.yaml")
    assert [p.id for p in resolved.principles] == ["base", "top"]
    assert len(reads) == 2  # top.yaml, then base.yaml once


def _many_principles(count: int, **principle) -> list[dict]:
    return [{"id": f"p-{i:06d}", "title": "t", **principle} for i in range(count)]


def test_a_policy_of_100k_principles_fails_fast(tmp_path):
    """Today's 3.5 MB policy of 100,000 principles took 15 CPU-s and 740 MB to fail lint; counted before anything
    is validated, it fails at once and says which limit to raise."""
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"name": "huge", "constitutions": ["harmless"], "add": _many_principles(100_000)}))
    assert path.stat().st_size > 3_000_000
    began = time.process_time()
    with pytest.raises(ConfigError, match=r"add: 100,000 principles, over the limit of 10,000; .*CAI_LIMIT_PRINCIPLES"):
        load_policy(path)
    assert time.process_time() - began < 6.0  # 0.9 CPU-s measured; 15-19 CPU-s before the count came first
    constitution = tmp_path / "huge-constitution.json"
    constitution.write_text(json.dumps({"name": "huge", "version": "1", "principles": _many_principles(100_000)}))
    with pytest.raises(ConstitutionError, match="principles: 100,000 principles, over the limit"):
        read_constitution_file(constitution)


def test_the_rule_limit_and_the_merged_limits(tmp_path, monkeypatch):
    rules = [{"id": f"r-{i}", "kind": "forbid", "pattern": "x", "message": "m"} for i in range(10_001)]
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps({"name": "rules", "constitutions": ["harmless"], "add": [{"id": "p-1", "rules": rules}]})
    )
    with pytest.raises(ConfigError, match=r"10,001 rules, over the limit of 10,000; .*CAI_LIMIT_RULES"):
        load_policy(path)
    # Each file within the limit, the merged whole over it.
    monkeypatch.setenv("CAI_LIMIT_PRINCIPLES", "18")
    data = {"name": "merged", "constitutions": ["harmless"], "add": _many_principles(2, **PRINCIPLE)}
    with pytest.raises(ConfigError, match="with what it extends merged in, it has 19 principles, over the limit of 18"):
        Engine.from_policy(data)
    monkeypatch.setenv("CAI_LIMIT_PRINCIPLES", "19")
    assert len(Engine.from_policy(data).constitution.principles) == 19


def test_lint_is_linear_in_the_number_of_principles():
    """conflicts_with on each of 5,000 principles compared every pair (25 million comparisons, ~7 CPU-s)."""
    principles = [dict(PRINCIPLE, id=f"p-{i:05d}", conflicts_with=["p-00000"]) for i in range(5_000)]
    constitution = Constitution.model_validate({"name": "wide", "version": "1", "principles": principles})
    began = time.process_time()
    issues = lint(constitution)
    assert time.process_time() - began < 1.5
    assert len(issues) == 5_000 and issues[0].message == "'p-00000' matches no other principle's id or tag"
    assert all("conflicts with 'p-00000' and both have authority 50" in i.message for i in issues[1:])


def test_a_policy_of_3000_rules_compiles_each_pattern_once(cai_runtime, monkeypatch):
    """The shared pattern cache holds 1,024; a guard over 3,000 rules must not recompile them on every response."""
    import cai_engine.constitution.model as schema

    add = [
        {
            "id": f"s-{p}",
            "phases": ["runtime"],
            "rules": [
                {"id": f"r-{p}-{i}", "kind": "forbid", "pattern": rf"\bcode{p}x{i}\b", "message": "m", "fix": "[x]"}
                for i in range(300)
            ],
        }
        for p in range(10)
    ]
    engine = Engine.from_policy(
        {"name": "wide", "constitutions": ["harmless"], "model": "none", "add": add}, runtime=cai_runtime
    )
    conversation = [{"role": "user", "content": "hi"}]
    engine.guard(conversation, "An ordinary reply.")
    compiled = []
    original = schema.compile_pattern
    monkeypatch.setattr(schema, "compile_pattern", lambda *a, **k: compiled.append(a) or original(*a, **k))
    assert engine.guard(conversation, "Another ordinary reply, code3x7 included.").action == "revised"
    assert compiled == []


# -- 2. pipes: guard input is read once ------------------------------------------------------------------------------


def _cai(args: list[str], cwd: Path, stdin: bytes | None = None, shell: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAI_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONWARNINGS": "ignore"}
    command: list[str] | str = [sys.executable, "-m", "cai_engine.cli", *args]
    if shell:
        command = f"{sys.executable} -m cai_engine.cli " + " ".join(args)
        command = ["bash", "-c", command]
    return subprocess.run(command, input=stdin, capture_output=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("how", ["dash", "dev-stdin", "process-substitution"])
def test_guard_reads_a_pipe_once_and_the_gate_fires(tmp_path, how):
    """A pipe was read twice (once to check, once to guard): 0 rows guarded, an empty --out, exit 0, and
    --fail-on refuse never fired."""
    policy = write_policy(tmp_path)
    rows = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    common = ["guard", "--policy", str(policy), "--out", str(out), "--fail-on", "refuse"]
    if how == "process-substitution":
        done = _cai([*common, "--input", f"<(cat {rows})"], tmp_path, shell=True)
    else:
        done = _cai([*common, "--input", "-" if how == "dash" else "/dev/stdin"], tmp_path, stdin=rows.read_bytes())
    assert done.returncode == 3, done.stderr.decode()
    assert b"at least one response was refused" in done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["action"]) for r in results] == [("card", "revised"), ("secret", "refused"), ("fine", "none")]
    run = audit(tmp_path)[-1]
    assert run["kind"] == "guard_run" and run["status"] == "completed" and run["items"] == run["guarded"] == 3


def test_an_empty_pipe_is_an_error_not_a_pass(tmp_path, cli_runner):
    policy = write_policy(tmp_path)
    out = tmp_path / "out.jsonl"
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", "-", "--out", str(out)], input="")
    assert result.exit_code == 1 and "<stdin>: contains no conversations" in result.output
    assert not out.exists()
    result = cli_runner.invoke(
        cli, ["guard", "--policy", str(policy), "--input", "-"], input=(tmp_path / "x").name + "\n"
    )
    assert result.exit_code == 1 and "<stdin>:1: invalid JSON" in result.output


def test_stdin_is_streamed_in_process(tmp_path, cli_runner):
    policy = write_policy(tmp_path)
    rows = "".join(json.dumps(r) + "\n" for r in ROWS)
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", "-"], input=rows)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["id"] for r in lines] == ["card", "secret", "fine"]


# -- 3. crashes and durability ---------------------------------------------------------------------------------------


def test_sigterm_mid_run_removes_the_partial_and_audits_the_failure(tmp_path, cli_runner, monkeypatch):
    policy = write_policy(tmp_path)
    rows = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    original = Engine.guard_batch
    calls = []

    def guard_batch(self, items):
        calls.append(len(items))
        if len(calls) == 2:  # the first batch is written to the .partial; then the process is told to stop
            assert [p.name for p in tmp_path.glob(".out.jsonl.*.partial")]
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, items)

    monkeypatch.setattr(Engine, "guard_batch", guard_batch)

    def unhandled(signum, frame):  # what would otherwise kill the test run itself
        raise AssertionError("cai guard did not handle SIGTERM")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = cli_runner.invoke(
            cli, ["guard", "--policy", str(policy), "--input", str(rows), "--out", str(out), "--batch-size", "1"]
        )
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the handler is put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "stopped by SIGTERM" in result.output and "is as it was" in result.output
    assert out.read_text() == "previous results\n"
    assert not list(tmp_path.glob(".out.jsonl.*.partial"))
    run = audit(tmp_path)[-1]
    assert run["kind"] == "guard_run" and run["status"] == "failed" and run["error"] == "stopped by SIGTERM"
    assert run["guarded"] == 1 and not run["output_written"]


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from cai_engine.guard.files import _sink
    with _sink(sys.argv[1], print) as write:
        write('{"id": "half"}')
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_run_leaves_a_partial_that_the_next_run_removes(tmp_path, cli_runner):
    out = tmp_path / "out.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    stale = list(tmp_path.glob(".out.jsonl.*.partial"))
    assert len(stale) == 1 and not out.exists()
    live = tmp_path / ".out.jsonl.live.partial"  # another run is writing this one right now: it must survive
    with open(live, "w") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        policy = write_policy(tmp_path)
        rows = write_rows(tmp_path / "in.jsonl")
        result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", str(rows), "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert not stale[0].exists() and live.exists()
    assert len(out.read_text().splitlines()) == 3


def test_output_and_audit_are_synced_to_disk(tmp_path, cli_runner, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to name what was synced")
    monkeypatch.setattr(os, "fsync", fsync)
    policy = write_policy(tmp_path)
    rows = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", str(rows), "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = str(tmp_path.resolve())
    assert any(Path(p).name.startswith(".out.jsonl.") and p.endswith(".partial") for p in synced)  # before the rename
    assert folder in synced  # the rename itself
    assert str((tmp_path / "audit.jsonl").resolve()) in synced  # at the end of the run
    assert audit(tmp_path)[-1]["status"] == "completed"


def test_the_rule_set_finds_what_searching_each_rule_finds(cai_runtime):
    """One RE2 set over every rule says which patterns occur; the violations must be the ones searching each rule in
    each view finds: forbid and require, case, number-like patterns across separators, respellings, `when`."""
    from cai_engine.checks.rules import RuleIndex
    from cai_engine.constitution.model import Message

    def rule(i, kind, pattern, **extra):
        return {"id": f"q-{i}", "kind": kind, "pattern": pattern, "message": "m", **extra}

    rules = [rule(i, "forbid", rf"\bword{i}\b") for i in range(20)] + [
        rule(20, "forbid", r"\bsecret\b", ignore_case=True),
        rule(21, "forbid", r"\bSecret\b", ignore_case=False),
        rule(22, "forbid", r"\b\d{4} \d{4} \d{4} \d{4}\b"),
        rule(23, "require", r"(?i)see a doctor"),
        rule(24, "require", r"(?i)not financial advice", when=r"(?i)\bstocks?\b"),
        rule(25, "forbid", r"\bguaranteed\b", when=r"(?i)returns?"),
        rule(26, "require", r"ref 2024"),  # digits, but not a number-like pattern: no separator is dropped for it
    ]
    add = [{"id": "q-p", "phases": ["runtime"], "rules": rules}]
    texts = [
        "An ordinary reply.",
        "word3 and WORD4 and word19.",
        "The s\u200becret is out; Secret too.",  # a zero-width space inside the word
        "Card 4111-1111-1111-1111 or 4111 1111 1111 1111, see a doctor.",
        "Buy stocks, returns guaranteed.",
        "Buy stocks. Not financial advice.",
        "\uff53\uff45\uff43\uff52\uff45\uff54 in full-width letters",
        "Your ref 2,024 is noted.",
    ]
    conversation = [Message(role="user", content="hi")]

    def found(min_rules):
        RuleIndex.MIN_RULES = min_rules
        engine = Engine.from_policy(
            {"name": "q", "constitutions": ["harmless"], "model": "none", "add": add}, runtime=cai_runtime
        )
        index = engine.components.rule_index
        assert (index is not None and index.present("x") is not None) == (min_rules < 100)
        return [
            sorted(
                (v.principle_id, v.rule_id, v.evidence)
                for v in engine.components.deterministic_violations(conversation, text)
            )
            for text in texts
        ]

    default = RuleIndex.MIN_RULES
    try:
        indexed, searched = found(1), found(10**9)
    finally:
        RuleIndex.MIN_RULES = default
    assert indexed == searched
    assert sum(map(len, searched)) >= 10  # the cases do find things, in several kinds


# -- 4. every failed run after the policy loaded is audited (#32) -----------------------------------------------------


def _failed_run(tmp_path: Path) -> dict:
    records = audit(tmp_path)
    assert [r["kind"] for r in records] == ["guard_run"]  # nothing was guarded: the run's own record only
    run = records[0]
    assert run["status"] == "failed" and not run["output_written"] and run["guarded"] == 0
    return run


def test_an_empty_input_is_audited_as_a_failed_run(tmp_path, cli_runner):
    policy = write_policy(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", "-", "--out", str(out)], input="\n")
    assert result.exit_code == 1 and "<stdin>: contains no conversations" in result.output
    assert out.read_text() == "previous results\n" and not list(tmp_path.glob("*.partial"))
    run = _failed_run(tmp_path)
    assert run["stage"] == "reading" and run["read"] == 0 and run["items"] is None
    assert run["error"] == "<stdin>: contains no conversations" and run["input"] == "<stdin>"


def test_a_bad_row_is_audited_with_the_rows_read_before_it(tmp_path, cli_runner):
    policy = write_policy(tmp_path)
    rows = write_rows(tmp_path / "in.jsonl", [*ROWS, {"prompt": "hi", "response": 5}, ROWS[0]])
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", str(rows)])
    assert result.exit_code == 1 and "in.jsonl:4" in result.output
    assert not [line for line in result.output.splitlines() if line.startswith("{")]  # nothing guarded
    run = _failed_run(tmp_path)
    assert run["stage"] == "reading" and run["read"] == 3 and "in.jsonl:4: the response must be text" in run["error"]


def test_an_unusable_out_is_audited_before_the_input_is_read(tmp_path, cli_runner):
    policy = write_policy(tmp_path)
    rows = write_rows(tmp_path / "in.jsonl")
    out = tmp_path / "missing" / "out.jsonl"
    result = cli_runner.invoke(cli, ["guard", "--policy", str(policy), "--input", str(rows), "--out", str(out)])
    assert result.exit_code == 1 and "does not exist" in result.output
    run = _failed_run(tmp_path)
    assert run["stage"] == "setup" and run["read"] == 0 and run["output"] == str(out)
    assert "does not exist" in run["error"]


def test_sigterm_while_a_pipe_is_still_being_read_is_audited(tmp_path):
    """The writer keeps the pipe open, so `cai guard` is blocked reading it when it is told to stop."""
    import termios

    policy = write_policy(tmp_path)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    env = {**os.environ, "CAI_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "cai_engine.cli", "guard", "--policy", str(policy), "--input", str(fifo)]
    child = subprocess.Popen(
        [*command, "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    writer = None
    try:
        deadline = time.monotonic() + 90
        while writer is None:  # the FIFO has a reader once the policy is loaded and the input opened
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline, "cai guard never opened its input"
                time.sleep(0.05)
        os.write(writer, b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[:2]))
        unread = bytearray(4)
        while True:  # wait until the child has taken both rows out of the pipe
            fcntl.ioctl(writer, termios.FIONREAD, unread)
            if int.from_bytes(unread, sys.byteorder) == 0:
                break
            assert time.monotonic() < deadline, "cai guard did not read its input"
            time.sleep(0.05)
        time.sleep(1.0)  # it checks them and blocks reading the next
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if writer is not None:
            os.close(writer)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"stopped by SIGTERM" in err and b"is as it was" in err and b"Traceback" not in err
    assert out.read_text() == "previous results\n" and not list(tmp_path.glob(".out.jsonl.*.partial"))
    run = _failed_run(tmp_path)
    assert run["stage"] == "reading" and run["error"] == "stopped by SIGTERM" and run["read"] == 2
