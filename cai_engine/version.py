"""The version of cai-engine (read by the build from here)."""

__version__ = "0.5.0"
