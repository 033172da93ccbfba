"""The plugin API: hook specs, component base classes, the plugin manager and the component registry."""
