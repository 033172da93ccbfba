"""Evaluation: harmlessness and helpfulness of models on held-out prompts, reports, and check benchmarks."""
