from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from cai_engine.constitution.model import constitution_json_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "constitution.schema.json"


def test_committed_schema_is_fresh():
    committed = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert committed == constitution_json_schema(), (
        "schemas/constitution.schema.json is stale; regenerate it with: "
        "cai constitutions schema -o schemas/constitution.schema.json"
    )


def constitution_files():
    files = sorted((ROOT / "constitutions").glob("*.yaml"))
    files += sorted(ROOT.glob("plugins/*/cai_*/constitutions/*.yaml"))
    return files


@pytest.mark.parametrize("path", constitution_files(), ids=lambda p: p.name)
def test_shipped_files_validate_with_jsonschema_alone(path):
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(data)
    assert data["$schema"].endswith("constitution.schema.json")


def test_jsonschema_rejects_what_the_model_rejects():
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    bad = {"name": "x", "version": "1", "principles": [{"id": "a", "colour": "red"}]}
    assert list(validator.iter_errors(bad))
    assert list(validator.iter_errors({"name": "Bad Name", "version": "1"}))
