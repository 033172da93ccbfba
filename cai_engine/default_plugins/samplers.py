"""Built-in samplers."""

from __future__ import annotations

from pydantic import Field

from cai_engine import ModelComponent, ModelOptions, Sampler, hookimpl
from cai_engine.text.layouts import TURN_MARKERS


class ModelSampler(ModelComponent, Sampler):
    """Samples assistant replies from a model; ``n`` samples per conversation in one batch."""

    name = "model"

    class Options(ModelOptions):
        temperature: float = Field(0.7, ge=0, le=2, description="The paper samples at 1.0; small models ramble.")
        max_new_tokens: int = Field(160, ge=1, le=4096, description="Upper bound on a reply's tokens.")

    def sample(self, conversations, n=1):
        prompts = [conv for conv in conversations for _ in range(n)]
        stops = () if self.chat else TURN_MARKERS
        texts = self.backend.generate(prompts, self.settings(stop=stops))
        texts = [t.strip() for t in texts]
        return [texts[i * n : (i + 1) * n] for i in range(len(conversations))]


@hookimpl
def cai_register_samplers(register):
    register(ModelSampler)
