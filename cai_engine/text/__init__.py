"""Text the engine reads and writes without a model: Unicode folding, prompt layouts, refusal markers."""
