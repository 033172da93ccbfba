"""Models: the runtime that loads and shares them (each backend claims the references it serves), model options,
the catalogue and how to install its models, and where a model reference's files are."""
