"""Hostile and broken inputs, each run through the real CLI in a subprocess with a CPU-time and memory budget.

Every case must end within its CPU-time budget and 500 MB with exit code 1 (or 0 and a warning, where the input is
legal), one line of error on stderr that names the file, no traceback, and no input or output file damaged.

The budgets are kernel limits on the child (RLIMIT_CPU, RLIMIT_AS), not wall-clock time: a loaded machine or a slow
CPU makes a case take longer but uses no more CPU seconds or memory, while a runaway case (an alias bomb expanded,
a pattern backtracking exponentially) exhausts any budget. The CPU budget is far above what the cases use (about a
second each where this was written) and far below what a runaway one would. A wall-clock timeout remains only to
stop a case that hangs without computing; it is not the budget.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

CPU_SECONDS = 30  # CPU time each case may use
MEGABYTES = 500  # peak resident memory each case may use
ADDRESS_SPACE = 3 << 30  # a runaway case gets MemoryError instead of taking the machine's memory
HANG_GUARD_SECONDS = 120  # wall clock; only for a case that waits forever

# Runs the CLI in-process and writes its own peak resident memory (kB) to the file named by the first argument.
# Linux's VmHWM belongs to the new address space; ru_maxrss would carry over the forking parent's size across exec.
LAUNCHER = textwrap.dedent("""
    import atexit, resource, sys
    report = sys.argv.pop(1)
    def _peak():
        try:
            with open("/proc/self/status") as status:
                peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(report, "w") as handle:
            handle.write(str(peak))
    atexit.register(_peak)
    from cai_engine.cli import cli
    cli(prog_name="cai")
""")


def _budget() -> None:
    """Run in the child between fork and exec: the kernel stops it at the CPU-time and address-space budgets."""
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 5))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


class Outcome:
    def __init__(self, proc: subprocess.CompletedProcess, peak_kb: int | None, cpu: float = 0.0) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.peak_mb = (peak_kb or 0) / 1024
        self.cpu = cpu  # CPU seconds the case used

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cai(tmp_path: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Outcome:
    report = tmp_path / f".peak-{os.getpid()}-{len(list(tmp_path.glob('.peak-*')))}"
    full_env = {**os.environ, "CAI_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    used_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(report), *args],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_SECONDS,
            env=full_env,
            cwd=cwd or tmp_path,
            preexec_fn=_budget,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cai {' '.join(args)} hangs: still running after {HANG_GUARD_SECONDS} s of wall clock")
    used_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (used_after.ru_utime - used_before.ru_utime) + (used_after.ru_stime - used_before.ru_stime)
    assert proc.returncode not in (-signal.SIGXCPU, -signal.SIGKILL), (
        f"cai {' '.join(args)} was stopped at its budget of {CPU_SECONDS} s of CPU time ({cpu:.1f} s used)"
    )
    assert cpu <= CPU_SECONDS, f"cai {' '.join(args)} used {cpu:.1f} s of CPU time"
    peak = int(report.read_text()) if report.exists() else None
    outcome = Outcome(proc, peak, cpu)
    assert "Traceback" not in outcome.err, outcome.err
    assert peak is not None, f"no memory report (killed?): {outcome.err}"
    assert outcome.peak_mb < MEGABYTES, f"peak memory {outcome.peak_mb:.0f} MB"
    return outcome


def fails_cleanly(outcome: Outcome, *needles: str) -> str:
    """Exit 1 and one error line containing every needle (validate commands add their 'N of M failed' tally)."""
    assert outcome.code == 1, (outcome.code, outcome.out, outcome.err)
    lines = [
        line
        for line in outcome.error_lines()
        if not line.startswith("warning:") and " file(s) failed validation" not in line
    ]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- documents that would hang or exhaust memory --------------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join(f"*a{level - 1}" for _ in range(width))
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


CONSTITUTION = {
    "name": "tiny",
    "version": "1.0.0",
    "principles": [
        {
            "id": "t-001",
            "critique_request": "Point out anything harmful in the reply.",
            "revision_request": "Rewrite the reply without the harmful part.",
            "comparison": "Which reply is less harmful?",
        }
    ],
}


def rules_policy(**extra) -> dict:
    policy = {"name": "hostile", "constitutions": ["harmless"], "guard": {"model_critics": False, "action": "flag"}}
    policy.update(extra)
    return policy


def test_yaml_alias_bomb_is_refused_for_constitutions_and_policies(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: bomb\nversion: 1.0.0\n" + alias_bomb() + "principles: []\n")
    fails_cleanly(cai(tmp_path, "constitutions", "validate", str(bomb)), "bomb.yaml", "alias")
    policy = tmp_path / "bomb-policy.yaml"
    policy.write_text("name: bomb\nconstitutions: [harmless]\n" + alias_bomb())
    fails_cleanly(cai(tmp_path, "policy", "validate", str(policy)), "bomb-policy.yaml", "alias")


def test_a_few_aliases_still_work(tmp_path):
    policy = tmp_path / "anchors.yaml"
    policy.write_text("name: anchors\nconstitutions: [harmless]\nguard: &g {model_critics: false, action: flag}\n")
    outcome = cai(tmp_path, "policy", "validate", str(policy))
    assert outcome.code == 0, outcome.err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_nesting_is_refused(tmp_path, suffix):
    deep = tmp_path / f"deep{suffix}"
    depth = 20_000
    deep.write_text('{"name": "deep", "version": "1.0.0", "principles": ' + "[" * depth + "]" * depth + "}")
    fails_cleanly(cai(tmp_path, "constitutions", "validate", str(deep)), deep.name, "nested ")


def test_deep_nesting_through_aliases_is_refused(tmp_path):
    lines = ["l0: &l0 [x]"] + [f"l{i}: &l{i} [*l{i - 1}]" for i in range(1, 3000)]
    deep = tmp_path / "alias-deep.yaml"
    deep.write_text("name: x\nconstitutions: [harmless]\n" + "\n".join(lines) + "\n")
    fails_cleanly(cai(tmp_path, "policy", "validate", str(deep)), "alias-deep.yaml", "deeper than")


def test_an_oversized_policy_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("w") as handle:
        handle.write("name: big\nconstitutions: [harmless]\ndescription: >\n")
        line = "  " + "x" * 98 + "\n"
        for _ in range(60_000):  # 6 MB
            handle.write(line)
    line = fails_cleanly(cai(tmp_path, "policy", "validate", str(big)), "big.yaml", "over the limit")
    assert "CAI_LIMIT_DOCUMENT_BYTES" in line
    # ... and the deployer can raise the limit.
    raised = cai(tmp_path, "policy", "validate", str(big), env={"CAI_LIMIT_DOCUMENT_BYTES": str(8 << 20)})
    assert raised.code == 0, raised.err


def test_a_large_valid_constitution_validates_within_the_budgets(tmp_path):
    principles = [
        {
            "id": f"p-{i:05d}",
            "critique_request": f"Does the reply break rule {i}? " + "Explain. " * 20,
            "revision_request": "Rewrite the reply so that it does not. " * 10,
            "comparison": "Which reply follows the rule better?",
        }
        for i in range(4500)
    ]
    big = tmp_path / "large.yaml"
    big.write_text(yaml.safe_dump({"name": "large", "version": "1.0.0", "principles": principles}, width=200))
    assert big.stat().st_size > 3_000_000
    outcome = cai(tmp_path, "constitutions", "validate", str(big))
    assert outcome.code == 0, outcome.err


def test_special_files_named_like_documents_fail_cleanly(tmp_path):
    """A symlink to /dev/zero named policy.yaml ended in a MemoryError; a FIFO named *.yaml hung until killed."""
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(dict(CONSTITUTION, name="child", extends=["./fifo.yaml"])))
    for name, needle in (("zero.yaml", "character device"), ("fifo.yaml", "FIFO")):
        fails_cleanly(cai(tmp_path, "policy", "validate", name), name, needle, "not a regular file")
        fails_cleanly(cai(tmp_path, "constitutions", "validate", name), name, needle)
        fails_cleanly(cai(tmp_path, "guard", "--policy", name, "--input", "in.jsonl"), name, needle)
    fails_cleanly(cai(tmp_path, "constitutions", "validate", "child.yaml"), "cannot load parent './fifo.yaml'", "FIFO")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy()))
    fails_cleanly(cai(tmp_path, "guard", "--policy", str(policy), "--input", "/dev/zero"), "/dev/zero", "device")


def test_a_policy_of_100k_principles_fails_within_a_second(tmp_path):
    """3.5 MB of inline principles took 15 CPU-s and 740 MB to fail lint; the count is checked before validation."""
    principles = [{"id": f"p-{i:06d}", "title": "tt"} for i in range(100_000)]
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"name": "huge", "constitutions": ["harmless"], "add": principles}))
    outcome = cai(tmp_path, "policy", "validate", str(huge))
    fails_cleanly(outcome, "huge.json", "100,000 principles", "CAI_LIMIT_PRINCIPLES")
    assert outcome.cpu < 5 and outcome.peak_mb < 250, (outcome.cpu, outcome.peak_mb)


def _extends_chain(tmp_path: Path, levels: int) -> Path:
    tmp_path.mkdir()
    for level in range(levels):
        data = dict(CONSTITUTION, name=f"level-{level}")
        data["principles"] = [dict(CONSTITUTION["principles"][0], id=f"t-{level:03d}")]
        if level + 1 < levels:
            data["extends"] = [f"./level-{level + 1}.yaml", f"./level-{level + 1}.yaml"]  # twice per level
        (tmp_path / f"level-{level}.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "level-0.yaml"


def test_extends_that_doubles_each_level_is_linear_and_bounded(tmp_path):
    ok = _extends_chain(tmp_path / "ok", 12)
    outcome = cai(tmp_path, "constitutions", "validate", str(ok))
    assert outcome.code == 0, outcome.err  # 2**12 paths, each parent resolved once
    deep = _extends_chain(tmp_path / "deep", 22)
    fails_cleanly(cai(tmp_path, "constitutions", "validate", str(deep)), "levels deep", "CAI_LIMIT_EXTENDS_DEPTH")


# -- patterns -----------------------------------------------------------------------------------------------------


def _redos_policy(tmp_path: Path, **rule) -> Path:
    principle = {
        "id": "redos-001",
        "title": "No runs of a",
        "phases": ["runtime"],
        "rules": [{"id": "r1", "kind": "forbid", "pattern": "(a+)+$", "message": "runs of a", **rule}],
    }
    policy = tmp_path / "redos.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(add=[principle], audit={"path": "audit.jsonl"})))
    return policy


def test_catastrophic_pattern_cannot_hang_the_guard(tmp_path):
    policy = _redos_policy(tmp_path)
    conversations = tmp_path / "in.jsonl"
    conversations.write_text(
        json.dumps({"prompt": "say a", "response": "a" * 40 + "b"})
        + "\n"
        + json.dumps({"prompt": "say a", "response": "b" + "a" * 5000})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    outcome = cai(tmp_path, "guard", "--policy", str(policy), "--input", str(conversations), "--out", str(out))
    assert outcome.code == 0, outcome.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["action"] for r in rows] == ["none", "flagged"]


def test_catastrophic_fix_text_cannot_hang_lint(tmp_path):
    policy = _redos_policy(tmp_path, fix="a" * 60 + "b")
    outcome = cai(tmp_path, "policy", "validate", str(policy))
    assert outcome.code == 0, outcome.err


def test_unsupported_pattern_features_are_named(tmp_path):
    policy = _redos_policy(tmp_path, pattern="secret(?=key)")
    fails_cleanly(cai(tmp_path, "policy", "validate", str(policy)), "redos.yaml", "RE2", "lookaround")


# -- guard runs that would lose or corrupt output ---------------------------------------------------------------------


def _guard_input(tmp_path: Path, rows: int = 21, bad_at: int | None = None, bad: str = "") -> Path:
    path = tmp_path / "in.jsonl"
    lines = []
    for i in range(1, rows + 1):
        lines.append(bad if i == bad_at else json.dumps({"id": f"r{i}", "prompt": "hi", "response": f"Hello {i}."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_bad_row_fails_the_run_before_any_work_and_keeps_the_old_output(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(audit={"path": "audit/log.jsonl"})))
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    source = _guard_input(tmp_path, bad_at=17, bad='{"messages": [{"role": "user", "content": "hi"}]}')
    before = source.read_bytes()
    fails_cleanly(
        cai(tmp_path, "guard", "--policy", str(policy), "--input", str(source), "--out", str(out)), "in.jsonl:17"
    )
    assert out.read_text() == "previous results\n"
    assert source.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # nothing was guarded, but the failed run is audited: what it read, where it stopped, and why (#32)
    records = [json.loads(line) for line in (tmp_path / "audit" / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["guard_run"]
    run = records[0]
    assert run["status"] == "failed" and run["stage"] == "reading" and "in.jsonl:17" in run["error"]
    assert run["read"] == 16 and run["items"] is None and run["guarded"] == 0 and not run["output_written"]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"messages": ["hi", {"role": "assistant", "content": "x"}]}', "message 0 must be an object"),
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "role 'robot'"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "has no 'content'"),
        ('{"prompt": "hi", "response": 5}', "must be text"),
        ('{"prompt": "hi", "response": "x", "id": [1]}', "'id' must be text"),
        ("not json at all", "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"prompt": "hi", "response": "x"', "invalid JSON"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, bad, needle):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy()))
    source = _guard_input(tmp_path, rows=3, bad_at=2, bad=bad)
    fails_cleanly(cai(tmp_path, "guard", "--policy", str(policy), "--input", str(source)), "in.jsonl:2", needle)


def test_output_equal_to_input_is_refused(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy()))
    source = _guard_input(tmp_path, rows=3)
    before = source.read_bytes()
    fails_cleanly(
        cai(tmp_path, "guard", "--policy", str(policy), "--input", str(source), "--out", str(source)),
        "destroy the input",
    )
    assert source.read_bytes() == before
    fails_cleanly(
        cai(tmp_path, "guard", "--policy", str(policy), "--input", str(source), "--out", "./in.jsonl"),
        "destroy the input",
    )
    assert source.read_bytes() == before


@pytest.mark.parametrize("size", ["-1", "0"])
def test_batch_size_below_one_is_an_error(tmp_path, size):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy()))
    source = _guard_input(tmp_path, rows=3)
    outcome = cai(tmp_path, "guard", "--policy", str(policy), "--input", str(source), "--batch-size", size)
    assert outcome.code != 0 and "batch-size" in outcome.err and not outcome.out


def test_output_in_a_missing_folder_is_refused_before_work(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy()))
    source = _guard_input(tmp_path, rows=3)
    fails_cleanly(
        cai(
            tmp_path,
            "guard",
            "--policy",
            str(policy),
            "--input",
            str(source),
            "--out",
            str(tmp_path / "nope" / "out.jsonl"),
        ),
        "does not exist",
    )


def test_a_successful_run_replaces_the_output_and_audits_completion(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(audit={"path": "audit.jsonl"})))
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    source = _guard_input(tmp_path, rows=21)
    outcome = cai(
        tmp_path, "guard", "--policy", str(policy), "--input", str(source), "--out", str(out), "--batch-size", "4"
    )
    assert outcome.code == 0, outcome.err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"r{i}" for i in range(1, 22)]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["kind"] == "guard_run" and audit[-1]["status"] == "completed" and audit[-1]["guarded"] == 21


# -- policies and constitutions that fail late today ------------------------------------------------------------------


def test_refusal_template_with_an_unknown_placeholder(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(guard={"model_critics": False, "refusal": "Sorry {user}"})))
    fails_cleanly(cai(tmp_path, "policy", "validate", str(policy)), "guard.refusal", "{user}")


@pytest.mark.parametrize("audit_path, needle", [("folder", "is a folder"), ("afile/log.jsonl", "is a file")])
def test_unusable_audit_paths(tmp_path, audit_path, needle):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(audit={"path": audit_path})))
    outcome = cai(tmp_path, "policy", "validate", str(policy))
    assert outcome.code == 1 and needle in outcome.err, outcome.err


def test_validate_creates_no_audit_folders(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(audit={"path": "logs/deep/audit.jsonl"})))
    assert cai(tmp_path, "policy", "validate", str(policy)).code == 0
    assert not (tmp_path / "logs").exists()


def test_duplicate_keys_in_json_are_refused(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text('{"name": "dup", "constitutions": ["harmless"], "name": "other"}')
    fails_cleanly(cai(tmp_path, "policy", "validate", str(policy)), "policy.json", "duplicate key 'name'")
    constitution = tmp_path / "c.json"
    constitution.write_text(json.dumps(CONSTITUTION)[:-1] + ', "version": "2.0.0"}')
    fails_cleanly(cai(tmp_path, "constitutions", "validate", str(constitution)), "c.json", "duplicate key")


def test_a_disable_tag_that_matches_nothing_is_refused(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(rules_policy(disable_tags=["vilence"])))
    fails_cleanly(cai(tmp_path, "policy", "validate", str(policy)), "disable_tags", "'vilence'")


def test_a_model_that_does_not_exist_fails_validation(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            dict(rules_policy(), model=str(tmp_path / "no-such-model"), guard={"model_critics": True, "action": "flag"})
        )
    )
    fails_cleanly(cai(tmp_path, "policy", "validate", str(policy)), "critic", "does not exist")


def test_export_on_the_wrong_kind_of_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "sl", "fingerprint": {}}))
    (run / "records.jsonl").write_text('{"key": "a", "kind": "red-team"}\n')
    fails_cleanly(
        cai(tmp_path, "export", "sft", str(run), "--out", str(tmp_path / "ds")), "records.jsonl:1", "lacks 'id'"
    )
    (run / "records.jsonl").write_text('{"hello": 1}\n')
    fails_cleanly(
        cai(tmp_path, "export", "sft", str(run), "--out", str(tmp_path / "ds")), "records.jsonl:1", "lacks 'key'"
    )
    fails_cleanly(
        cai(tmp_path, "export", "preferences", str(run), "--out", str(tmp_path / "ds")), "not a preference-labelling"
    )
    assert not (tmp_path / "ds").exists()


def test_csv_with_an_unclosed_quote_names_the_line(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt,id\n"hello, there",1\n"unclosed,2\nnext,3\nlast,4\n')
    fails_cleanly(cai(tmp_path, "sl", "--prompts", str(prompts), "--out", str(tmp_path / "run")), "prompts.csv:3")
    prompts.write_text("prompt,id\nhello,1\nthis one, has a comma,2\n")
    fails_cleanly(
        cai(tmp_path, "sl", "--prompts", str(prompts), "--out", str(tmp_path / "run")), "prompts.csv:3", "3 fields"
    )


# -- plugins ------------------------------------------------------------------------------------------------------------


def _fake_distribution(site: Path, body: str) -> None:
    (site / "typo_plugin.py").write_text(body)
    info = site / "typo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cai_engine]\ntypo = typo_plugin\n")


@pytest.mark.parametrize(
    "body, needle",
    [
        (
            "from cai_engine import hookimpl\n\n@hookimpl\ndef cai_register_critic(register):\n    pass\n",
            "cai_register_critic",
        ),
        ("import module_that_is_not_there\n", "module_that_is_not_there"),
    ],
)
def test_a_broken_plugin_does_not_break_help_or_the_plugin_list(tmp_path, body, needle):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, body)
    env = {"PYTHONPATH": str(site), "CAI_DISABLE_PLUGIN_AUTOLOAD": ""}
    helped = cai(tmp_path, "--help", env=env)
    assert helped.code == 0 and "Commands:" in helped.out
    assert any("plugin 'typo' is left out" in line and needle in line for line in helped.error_lines())
    listed = cai(tmp_path, "plugins", env=env)
    assert listed.code == 0, listed.err
    row = next(r for r in json.loads(listed.out) if r["name"] == "typo")
    assert row["broken"] is True and needle in row["errors"][0]


def test_an_unknown_blocked_plugin_name_is_warned_about(tmp_path):
    outcome = cai(tmp_path, "plugins", env={"CAI_BLOCKED_PLUGINS": "medicall"})
    assert outcome.code == 0
    assert any("CAI_BLOCKED_PLUGINS names 'medicall'" in line for line in outcome.error_lines())


# -- the output layer, where a subprocess cannot fake the failure ------------------------------------------------------


def test_a_full_disk_leaves_the_previous_output(tmp_path, monkeypatch):
    import errno

    from cai_engine.errors import CaiError
    from cai_engine.files.outputs import write_atomic

    target = tmp_path / "out.json"
    target.write_text("old")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CaiError, match="No space left on device; nothing was changed"):
        write_atomic(target, "new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_model_folders_must_hold_safetensors(tmp_path):
    from cai_engine.errors import ModelError
    from cai_engine.models.files import resolve_model_folder

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle you want to load")
    with pytest.raises(ModelError, match="safetensors only"):
        resolve_model_folder(str(folder))
