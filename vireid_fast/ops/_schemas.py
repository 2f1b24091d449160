"""Mirror of the op schemas declared in ``csrc/schemas.cpp`` (the source of truth).

Used only to define the ops in Python when the compiled extension is unavailable; ``tests/ops/test_framework.py``
checks that every entry equals the schema the extension registers.
"""

SCHEMAS: dict[str, str] = {
    "sinkhorn": (
        "sinkhorn(Tensor cost, float lam, Tensor a, Tensor b, int max_iter, float tol) -> (Tensor, Tensor, Tensor)"
    ),
    "memory_contrastive": "memory_contrastive(Tensor inputs, Tensor targets, Tensor memory, Tensor? soft_targets, "
                          "float temp, float momentum, str update) -> (Tensor, Tensor, Tensor)",
    "memory_contrastive_backward": "memory_contrastive_backward(Tensor grad_loss, Tensor inputs, Tensor targets, "
                                   "Tensor(a!) memory, Tensor? soft_targets, Tensor logits, Tensor lse, float temp, "
                                   "float momentum, str update) -> Tensor",
    "memory_update": "memory_update(Tensor normalized, Tensor targets, Tensor(a!) memory, float momentum, "
                     "str update) -> ()",
    "cmfp": "cmfp(Tensor features_v, Tensor features_r, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "knn": "knn(Tensor x, Tensor y, int k, str metric, str precision) -> (Tensor, Tensor)",
    "kreciprocal_jaccard": ("kreciprocal_jaccard(Tensor features, Tensor initial_rank, Tensor? rank_sim, int k2, "
                            "Tensor? modality) -> (Tensor, Tensor, Tensor)"),
    "dbscan_dense": "dbscan_dense(Tensor dist, float eps, int min_samples) -> Tensor",
    "dbscan_csr": ("dbscan_csr(Tensor crow, Tensor col, Tensor values, float eps, int min_samples, float fill) -> "
                   "Tensor"),
}
