// Exact k nearest neighbours (csrc/knn.cpp), for the ops built on them (CMFP).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace vireid {

// Exact top-k of every row of x (N, d) among the rows of y (M, d), both float32: values (N, k) float32 (inner
// products, or squared distances when l2), indices (N, k) int64, best first, equal keys to the lower index. Passing
// the same tensor as x and y runs the symmetric search (each tile pair once). bf16 only changes the candidate GEMM.
std::tuple<at::Tensor, at::Tensor> knn_exact(const at::Tensor& x, const at::Tensor& y, int64_t k, bool l2, bool bf16);

// Both directions of a cross search at the cost of one: the exact top-k of every row of a among the rows of b, and of
// every row of b among the rows of a (k <= min of the two). Returns (values_a, indices_a, values_b, indices_b).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_exact_both(const at::Tensor& a, const at::Tensor& b,
                                                                          int64_t k, bool l2, bool bf16);

// Whether the bf16 candidate search pays off for an (n x m x d) search on this CPU.
bool knn_bf16_worthwhile(int64_t n, int64_t m, int64_t d);

}  // namespace vireid
