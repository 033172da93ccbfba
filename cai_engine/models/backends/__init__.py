"""Backend implementations (registered by cai_engine.default_plugins.backends)."""
