"""The training engine: epoch loop, hooks, checkpoints, distributed helpers."""
