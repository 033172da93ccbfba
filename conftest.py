"""Hermetic test runs, for tests/ and plugins/*/tests/ alike.

- Offline: no Hub, no dataset hub, no plugins installed in the environment unless a test loads them on purpose.
- Every cache a test run can fill (cai-engine's model conversions, Hugging Face, matplotlib, XDG) points at one
  temporary folder made for this run and removed after it; only the embedded default model's GGUF file is read from
  where `cai models install smollm2` put it (``~/.cache/cai-engine/gguf``), never written.
- Every test runs in its own empty working directory, so nothing a test writes with a relative path lands in the
  checkout, and nothing left in the checkout (``runs/demo`` after ``make demo``) changes what a test sees. Project
  files are reached through ``ROOT``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent

os.environ.setdefault("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_RUN_CACHE = Path(tempfile.mkdtemp(prefix="cai-tests-"))
atexit.register(shutil.rmtree, _RUN_CACHE, True)
for _name, _sub in [
    ("CAI_CACHE_DIR", "cai-engine"),
    ("HF_HOME", "huggingface"),
    ("XDG_CACHE_HOME", "xdg-cache"),
    ("MPLCONFIGDIR", "matplotlib"),
]:
    os.environ[_name] = str(_RUN_CACHE / _sub)

pytest_plugins = ["cai_engine.testing"]

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _hermetic(request, tmp_path, monkeypatch):
    """Each test in its own working directory. Tests of the real default model (marked `model`) share the run's
    cache, so its one-time conversion (~30 s) is paid once per run; every other test gets a cache of its own, and
    the classifiers the domain plugins ship beside their checks (which read the real default model) stay off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAI_CHECK_CLASSIFIER_DIR", raising=False)  # a developer's own heads never reach a test
    if request.node.get_closest_marker("model") is None:
        monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cai-cache"))
        monkeypatch.setenv("CAI_CHECK_CLASSIFIERS", "off")
