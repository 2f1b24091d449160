// The one place declaring the schemas of every vireid op. Kernels register themselves in their own files
// (TORCH_LIBRARY_IMPL); the Python package mirrors these strings for the no-extension fallback, and a test checks
// that the two agree.
#include <torch/library.h>

TORCH_LIBRARY(vireid, m) {
  // cost (B, N, K) float32/float64; a (B, N), b (B, K) float64 positive marginals of equal mass.
  // Returns plan (B, N, K) in cost's dtype, n_iter (B,) int64, err (B,) float64 (L1 row-marginal error).
  m.def("sinkhorn(Tensor cost, float lam, Tensor a, Tensor b, int max_iter, float tol) -> (Tensor, Tensor, Tensor)");
  // features_v (Nv, d), features_r (Nr, d) float32/float64, 1 <= k <= min(Nv, Nr). Returns the propagated, L2-normalised
  // features (Nv, d), (Nr, d) and the affinity G in CSR form: crow (Nv+Nr+1,) int64, col (nnz,) int64, val (nnz,).
  m.def("cmfp(Tensor features_v, Tensor features_r, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
