"""Names and sizes the sweep YAML is checked against, importable without torch (so a bad YAML is
refused before torch, Ray or MLflow load)."""

NUM_TIMESTEPS = 1000
