"""experiments: the `interp` CLI, TOML experiment configs and notebooks (imports every package)."""

__all__: list[str] = []
