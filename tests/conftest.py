from __future__ import annotations

import os

# Tests never see plugins installed in the environment unless a test loads them on purpose.
os.environ.setdefault("CAI_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["cai_engine.testing"]
