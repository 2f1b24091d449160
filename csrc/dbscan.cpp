// DBSCAN on a precomputed distance, label for label as sklearn.cluster.DBSCAN(metric='precomputed'):
// neighbourhood(i) = {j : dist[i, j] <= eps} (row i, i included only if dist[i, i] <= eps); core = |neighbourhood| >=
// min_samples; clusters are grown depth-first from each unlabelled core point in index order, and a point keeps the
// first label it gets (so a border point reachable from two clusters joins the lower-numbered one).
// Dense input: O(N^2) time, O(N) extra memory. CSR input (entries not stored equal `fill`): O(nnz) when eps < fill;
// when eps >= fill every pair not stored is a neighbour and the growth scans rows in O(N) each (still O(nnz) memory).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

namespace vireid {
namespace {

// sklearn's dbscan_inner, given neighbourhood counts and a neighbour visitor visit(p, fn(q)).
template <typename Visit>
at::Tensor grow_clusters(int64_t n, const std::vector<int64_t>& counts, int64_t min_samples, const at::Tensor& like,
                         Visit visit) {
  at::Tensor labels_t = at::full({n}, -1, like.options().dtype(at::kLong));
  int64_t* labels = labels_t.data_ptr<int64_t>();
  std::vector<int64_t> stack;
  int64_t next_label = 0;
  for (int64_t start = 0; start < n; ++start) {
    if (labels[start] != -1 || counts[start] < min_samples) continue;
    labels[start] = next_label;
    stack.push_back(start);
    while (!stack.empty()) {
      const int64_t p = stack.back();
      stack.pop_back();
      if (counts[p] < min_samples) continue;  // border point: labelled, not expanded
      visit(p, [&](int64_t q) {
        if (labels[q] == -1) {
          labels[q] = next_label;
          stack.push_back(q);
        }
      });
    }
    ++next_label;
  }
  return labels_t;
}

at::Tensor dbscan_dense_cpu(const at::Tensor& dist_in, double eps, int64_t min_samples) {
  TORCH_CHECK(dist_in.dim() == 2 && dist_in.size(0) == dist_in.size(1), "vireid::dbscan_dense: dist must be (N, N)");
  TORCH_CHECK(dist_in.scalar_type() == at::kFloat || dist_in.scalar_type() == at::kDouble,
              "vireid::dbscan_dense: dist must be float32 or float64");
  check_finite(dist_in, "dist");
  const at::Tensor dist = dist_in.contiguous();
  const int64_t n = dist.size(0);
  std::vector<int64_t> counts(n, 0);
  at::Tensor labels;
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "vireid_dbscan_dense", [&] {
    const scalar_t* dp = dist.data_ptr<scalar_t>();
    // Compare in the input's precision, like sklearn does on the array it is given.
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const scalar_t* row = dp + i * n;
        int64_t c = 0;
        for (int64_t j = 0; j < n; ++j) c += row[j] <= e;
        counts[i] = c;
      }
    });
    labels = grow_clusters(n, counts, min_samples, dist, [&](int64_t p, auto&& fn) {
      const scalar_t* row = dp + p * n;
      for (int64_t j = 0; j < n; ++j)
        if (row[j] <= e) fn(j);
    });
  });
  return labels;
}

at::Tensor dbscan_csr_cpu(const at::Tensor& crow_in, const at::Tensor& col_in, const at::Tensor& values_in, double eps,
                          int64_t min_samples, double fill) {
  TORCH_CHECK(crow_in.dim() == 1 && crow_in.size(0) >= 1 && crow_in.scalar_type() == at::kLong,
              "vireid::dbscan_csr: crow must be (N + 1,) int64");
  TORCH_CHECK(col_in.dim() == 1 && col_in.scalar_type() == at::kLong, "vireid::dbscan_csr: col must be int64");
  TORCH_CHECK(values_in.dim() == 1 && values_in.size(0) == col_in.size(0) &&
                  (values_in.scalar_type() == at::kFloat || values_in.scalar_type() == at::kDouble),
              "vireid::dbscan_csr: values must be float32/float64 with one value per column index");
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const at::Tensor values = values_in.to(at::kDouble).contiguous();
  const int64_t n = crow.size(0) - 1, nnz = col.size(0);
  const int64_t* rp = crow.data_ptr<int64_t>();
  const int64_t* cp = col.data_ptr<int64_t>();
  const double* vp = values.data_ptr<double>();
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[n] == nnz, "vireid::dbscan_csr: crow must start at 0 and end at nnz");
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK_VALUE(rp[i] <= rp[i + 1], "vireid::dbscan_csr: crow must be non-decreasing");
  if (nnz > 0) {
    TORCH_CHECK_VALUE(col.min().item<int64_t>() >= 0 && col.max().item<int64_t>() < n,
                "vireid::dbscan_csr: column indices must be in [0, N)");
  }
  {
    // Duplicate entries would count a neighbour twice; sklearn's dense matrix cannot hold them.
    std::vector<int64_t> seen_in_row(n, -1);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) {
        TORCH_CHECK_VALUE(seen_in_row[cp[p]] != i, "dbscan: dist has duplicate entries in row ", i, " (column ", cp[p],
                          "); coalesce the sparse matrix first");
        seen_in_row[cp[p]] = i;
      }
    }
  }
  check_finite(values_in, "dist's CSR values");
  TORCH_CHECK_VALUE(!std::isnan(fill), "fill must be a finite number, got nan; pass a real value");
  // Compare in float32 when the values are float32 (as sklearn on the float32 dense matrix).
  const bool f32 = values_in.scalar_type() == at::kFloat;
  const double e = f32 ? static_cast<double>(static_cast<float>(eps)) : eps;
  const double fill_v = f32 ? static_cast<double>(static_cast<float>(fill)) : fill;
  std::vector<int64_t> counts(n, 0);
  if (fill_v > e) {
    at::parallel_for(0, n, 256, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        int64_t c = 0;
        for (int64_t p = rp[i]; p < rp[i + 1]; ++p) c += vp[p] <= e;
        counts[i] = c;
      }
    });
    return grow_clusters(n, counts, min_samples, crow, [&](int64_t p, auto&& fn) {
      for (int64_t q = rp[p]; q < rp[p + 1]; ++q)
        if (vp[q] <= e) fn(cp[q]);
    });
  }
  // eps >= fill: every pair not stored is a neighbour; only stored entries > eps are not.
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t end) {
    for (int64_t i = b; i < end; ++i) {
      int64_t far = 0;
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) far += vp[p] > e;
      counts[i] = n - far;
    }
  });
  std::vector<char> is_far(n, 0);
  return grow_clusters(n, counts, min_samples, crow, [&](int64_t p, auto&& fn) {
    for (int64_t q = rp[p]; q < rp[p + 1]; ++q)
      if (vp[q] > e) is_far[cp[q]] = 1;
    for (int64_t j = 0; j < n; ++j)
      if (!is_far[j]) fn(j);
    for (int64_t q = rp[p]; q < rp[p + 1]; ++q) is_far[cp[q]] = 0;
  });
}

}  // namespace
}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) {
  m.impl("_dbscan_dense_cpu", &vireid::dbscan_dense_cpu);
  m.impl("_dbscan_csr_cpu", &vireid::dbscan_csr_cpu);
}
