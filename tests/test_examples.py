"""The examples in examples/ run as documented."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_embed_example_runs(tmp_path):
    import importlib.metadata

    if "medical" not in {ep.name for ep in importlib.metadata.entry_points(group="cai_engine")}:
        pytest.skip("cai-medical is not installed")
    env = {k: v for k, v in os.environ.items() if k != "CAI_DISABLE_PLUGIN_AUTOLOAD"}
    # A copy of the example beside its policy, so its audit file (relative to the policy) lands in tmp_path.
    for name in ("embed.py", "clinic-policy.yaml"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    audit = tmp_path / "audit" / "clinic-guard.jsonl"
    done = subprocess.run(
        [sys.executable, str(tmp_path / "embed.py")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "med-003 [medical.phi]" in done.stdout and "Okafor" not in done.stdout.split("reply:")[2].split("\n")[0]
    assert "async: ['revised', 'revised', 'revised', 'none']" in done.stdout
    assert audit.read_text().count("\n") == 8
