"""Deterministic checks: a constitution's rules, and building blocks plugins use for their own checks."""
