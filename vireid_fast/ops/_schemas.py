"""Mirror of the op schemas declared in ``csrc/schemas.cpp`` (the source of truth).

Used only to define the ops in Python when the compiled extension is unavailable; ``tests/ops/test_framework.py``
checks that every entry equals the schema the extension registers.
"""

SCHEMAS: dict[str, str] = {
    "sinkhorn": "sinkhorn(Tensor cost, float lam, Tensor a, Tensor b, int max_iter, float tol) -> (Tensor, Tensor, Tensor)",
    "cmfp": "cmfp(Tensor features_v, Tensor features_r, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
