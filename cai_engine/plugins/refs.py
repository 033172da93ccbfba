"""Configuration models shared by runs, policies and composite components."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ComponentRef(BaseModel):
    """A component by registry name plus its options; a bare string is accepted as ``{name: ...}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The registry name, e.g. 'model', 'rules', 'logprob', 'medical.phi'.")
    options: dict[str, Any] = Field(default_factory=dict, description="The component's options.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def build(self, kind: str, runtime: Any):
        return runtime.component(kind, self.name, self.options)
