"""Publishing to the Hugging Face Hub: a checkpoint or an export folder uploaded as one commit.

``huggingface_hub`` (installed with the ``train`` extra) does the work; the token comes from ``HF_TOKEN`` or
``huggingface-cli login``, as for every Hugging Face tool. Nothing here runs unless a user asks for it
(``--push-to-hub REPO``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from cai_engine.errors import CaiError

# What a checkpoint folder holds that the Hub copy does not need: TRL's intermediate checkpoints, temporary files.
IGNORED = ["trainer/**", "*.tmp", "*.lock"]


def _api() -> Any:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise CaiError(
            "pushing to the Hub needs huggingface_hub; install it with pip install 'cai-engine[train]'"
        ) from None
    return HfApi()


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    repo_type: Literal["model", "dataset"] = "model",
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it as one commit; returns the repository's URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaiError(f"{folder}: nothing to push (not a folder)")
    if "/" not in repo_id:
        raise CaiError(f"--push-to-hub {repo_id!r}: name the repository as owner/name")
    api = _api()
    try:
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type=repo_type,
            commit_message=commit_message or f"Upload {folder.name} with cai-engine",
            ignore_patterns=IGNORED,
        )
    except CaiError:
        raise
    except Exception as exc:  # HTTP, auth and offline-mode errors all become one line
        raise CaiError(f"could not push {folder} to {repo_id}: {type(exc).__name__}: {exc}") from None
    return str(url)
