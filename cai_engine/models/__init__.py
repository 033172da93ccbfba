"""Models: the runtime that loads and shares them, model options, the catalogue, and the built-in backends."""
