"""Mirror of the op schemas declared in ``csrc/schemas.cpp`` (the source of truth).

Used only to define the ops in Python when the compiled extension is unavailable; ``tests/ops/test_framework.py``
checks that every entry equals the schema the extension registers.
"""

SCHEMAS: dict[str, str] = {
    "sinkhorn": "sinkhorn(Tensor cost, float lam, Tensor a, Tensor b, int max_iter, float tol) -> (Tensor, Tensor, Tensor)",
    "knn": "knn(Tensor x, Tensor y, int k, str metric, str precision) -> (Tensor, Tensor)",
    "kreciprocal_jaccard": ("kreciprocal_jaccard(Tensor features, Tensor initial_rank, Tensor? rank_sim, int k2, "
                            "Tensor? modality) -> (Tensor, Tensor, Tensor)"),
    "dbscan_dense": "dbscan_dense(Tensor dist, float eps, int min_samples) -> Tensor",
    "dbscan_csr": ("dbscan_csr(Tensor crow, Tensor col, Tensor values, float eps, int min_samples, float fill) -> "
                   "Tensor"),
}
