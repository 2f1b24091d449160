"""Helpers for reading the golden files of tests/golden (the community code's outputs, see tests/golden/README.md)."""

import numpy as np


def golden_dense(g, k1: int, k2: int) -> np.ndarray:
    """The dense (N, N) Jaccard distance of jaccard.npz for (k1, k2): stored triplets, every other entry 1.0."""
    n = g["features"].shape[0]
    dense = np.ones((n, n), dtype=np.float32)
    p = f"k1_{k1}_k2_{k2}"
    dense[g[p + "_rows"], g[p + "_cols"]] = g[p + "_vals"]
    return dense
