from __future__ import annotations

import os

# Tests never see plugins installed in the environment unless a test loads them on purpose.
os.environ.setdefault("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["cai_engine.testing"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_model_cache(request, tmp_path, monkeypatch):
    # GGUF conversions in tests go to a throwaway cache. Tests of the real default model (marked `model`) use the
    # user's cache, so its one-time conversion (~30 s) is paid once per machine rather than once per test.
    if request.node.get_closest_marker("model") is None:
        monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cai-cache"))


def require_default_model() -> None:
    """Skip the calling test module when the embedded default model is not installed (cai models install smollm2)."""
    from cai_engine.backends.model_files import default_model_file

    try:
        default_model_file()
    except Exception as exc:  # pragma: no cover - only without the default model
        pytest.skip(str(exc))
