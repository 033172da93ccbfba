"""The built-in plugins: samplers, critics, revisers, judges, trainers, backends, the catalogue's models, the shipped
constitutions and prompt sets, registered through the same hooks as third-party plugins and importing only the
public API, as a third-party plugin does."""
