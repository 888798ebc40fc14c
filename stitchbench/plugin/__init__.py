"""The plugin system: hook specifications (`hookspecs`), the base classes of what plugins
register (`types`), the plugin manager that loads and validates them (`manager`) and the
workspace's ``registry/plugins.toml`` (`registration`). Imports neither torch nor MLflow."""
