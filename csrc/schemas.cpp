// The one place declaring the schemas of every vireid op. Kernels register themselves in their own files
// (TORCH_LIBRARY_IMPL); the Python package mirrors these strings for the no-extension fallback, and a test checks
// that the two agree.
//
// Every public op vireid::<name> has a private twin vireid::_<name>_cpu with the same schema that holds the C++ CPU
// kernel. The public op's CPU kernel is registered from Python (vireid_fast/ops/_registry.py): it runs the op's
// validation layer (vireid_fast/ops/_checks.py) and then calls the twin, so every backend and the raw
// torch.ops.vireid.<name> raise the same ValueError/TypeError for the same bad input. The twins are internal: call
// the public op.
#include <torch/library.h>

TORCH_LIBRARY(vireid, m) {
  // cost (B, N, K) float32/float64; a (B, N), b (B, K) float64 positive marginals of equal mass.
  // Returns plan (B, N, K) in cost's dtype, n_iter (B,) int64, err (B,) float64 (L1 row-marginal error).
  m.def("sinkhorn(Tensor cost, float lam, Tensor a, Tensor b, int max_iter, float tol) -> (Tensor, Tensor, Tensor)");
  // Memory-bank contrastive loss (cluster-contrast ClusterMemory). inputs (B, D) float32/64/bf16/fp16 un-normalised,
  // targets (B,) int64, memory (C, D) float32 (float64 with float64 inputs), soft_targets None or (B, C).
  // Returns loss (), logits (B, C) = normalize(inputs) memory^T / temp, lse (B,), all in memory's dtype.
  // momentum and update are carried to the backward (which updates memory); the forward does not use them.
  m.def("memory_contrastive(Tensor inputs, Tensor targets, Tensor memory, Tensor? soft_targets, float temp, "
        "float momentum, str update) -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. inputs with memory as it is before the update, then the in-place update of memory;
  // update in {sequential, hard, mean, none}. Returns grad_inputs (B, D) in inputs' dtype.
  m.def("memory_contrastive_backward(Tensor grad_loss, Tensor inputs, Tensor targets, Tensor(a!) memory, "
        "Tensor? soft_targets, Tensor logits, Tensor lse, float temp, float momentum, str update) -> Tensor");
  // The update alone: normalized (B, D) L2-normalised rows in memory's dtype.
  m.def("memory_update(Tensor normalized, Tensor targets, Tensor(a!) memory, float momentum, str update) -> ()");
  // features_v (Nv, d), features_r (Nr, d) float32/float64, 1 <= k <= min(Nv, Nr). Returns the propagated, L2-normalised
  // features (Nv, d), (Nr, d) and the affinity G in CSR form: crow (Nv+Nr+1,) int64, col (nnz,) int64, val (nnz,).
  m.def("cmfp(Tensor features_v, Tensor features_r, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Clustering (csrc/knn.cpp, jaccard.cpp, dbscan.cpp). x (N, d), y (M, d) float32; metric "ip" | "l2"; precision
  // "fp32" | "bf16" (candidate search only: the result is the same). Returns values (N, k) float32, indices int64.
  m.def("knn(Tensor x, Tensor y, int k, str metric, str precision) -> (Tensor, Tensor)");
  // features (N, d) float32, initial_rank (N, k1) int64, rank_sim None or (N, k1) float32 = f_i . f_R[i][t] (reused
  // instead of recomputing), modality None or (N,) int64. Returns the CSR of the entries < 1 of the Jaccard
  // distance: crow (N + 1,) int64, col (nnz,) int64, values (nnz,) float32.
  m.def(
      "kreciprocal_jaccard(Tensor features, Tensor initial_rank, Tensor? rank_sim, int k2, Tensor? modality) -> "
      "(Tensor, Tensor, Tensor)");
  // dist (N, N) float32/float64 -> labels (N,) int64 (-1 = noise), sklearn's numbering.
  m.def("dbscan_dense(Tensor dist, float eps, int min_samples) -> Tensor");
  // CSR distance whose entries not stored equal fill -> labels (N,) int64.
  m.def("dbscan_csr(Tensor crow, Tensor col, Tensor values, float eps, int min_samples, float fill) -> Tensor");

  // The C++ CPU kernels (see above).
  m.def("_sinkhorn_cpu(Tensor cost, float lam, Tensor a, Tensor b, int max_iter, float tol) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("_memory_contrastive_cpu(Tensor inputs, Tensor targets, Tensor memory, Tensor? soft_targets, float temp, "
        "float momentum, str update) -> (Tensor, Tensor, Tensor)");
  m.def("_memory_contrastive_backward_cpu(Tensor grad_loss, Tensor inputs, Tensor targets, Tensor(a!) memory, "
        "Tensor? soft_targets, Tensor logits, Tensor lse, float temp, float momentum, str update) -> Tensor");
  m.def("_memory_update_cpu(Tensor normalized, Tensor targets, Tensor(a!) memory, float momentum, str update) -> ()");
  m.def("_cmfp_cpu(Tensor features_v, Tensor features_r, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_knn_cpu(Tensor x, Tensor y, int k, str metric, str precision) -> (Tensor, Tensor)");
  m.def(
      "_kreciprocal_jaccard_cpu(Tensor features, Tensor initial_rank, Tensor? rank_sim, int k2, Tensor? modality) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("_dbscan_dense_cpu(Tensor dist, float eps, int min_samples) -> Tensor");
  m.def("_dbscan_csr_cpu(Tensor crow, Tensor col, Tensor values, float eps, int min_samples, float fill) -> Tensor");
}
