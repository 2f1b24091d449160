// k-reciprocal Jaccard distance (cluster-contrast compute_jaccard_distance semantics, shared/spec/jaccard.md) from a
// precomputed initial rank, in CSR form. Everything is sparse: V and its query expansion are CSR rows with sorted
// columns, the min-sum runs over an inverted index (column -> rows), and the output keeps only entries < 1.
// Memory: O(N * k1 * |V row|) for the inverted index and output, never N x N.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace vireid {
namespace {

// Rows [b, e) of a CSR matrix assembled from per-chunk pieces.
template <typename V>
struct Csr {
  std::vector<int64_t> ptr;
  std::vector<int32_t> col;
  std::vector<V> val;
};

// Runs `row_fn(i, cols, vals)` for every row in parallel (rows handed out in chunks) and assembles the CSR.
template <typename V = double, typename RowFn>
Csr<V> build_rows(int64_t n, RowFn row_fn) {
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<std::vector<int32_t>> ccol(chunks);
  std::vector<std::vector<V>> cval(chunks);
  std::vector<int64_t> counts(n, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<int32_t> cols;
    std::vector<V> vals;
    for (int64_t ch = cb; ch < ce; ++ch) {
      for (int64_t i = ch * kChunk; i < std::min(n, (ch + 1) * kChunk); ++i) {
        cols.clear();
        vals.clear();
        row_fn(i, cols, vals);
        counts[i] = static_cast<int64_t>(cols.size());
        ccol[ch].insert(ccol[ch].end(), cols.begin(), cols.end());
        cval[ch].insert(cval[ch].end(), vals.begin(), vals.end());
      }
    }
  });
  Csr<V> out;
  out.ptr.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) out.ptr[i + 1] = out.ptr[i] + counts[i];
  out.col.reserve(out.ptr[n]);
  out.val.reserve(out.ptr[n]);
  advise_huge_pages(out.col.data(), out.ptr[n] * sizeof(int32_t));
  advise_huge_pages(out.val.data(), out.ptr[n] * sizeof(V));
  out.col.resize(out.ptr[n]);
  out.val.resize(out.ptr[n]);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t start = out.ptr[ch * kChunk];
      std::copy(ccol[ch].begin(), ccol[ch].end(), out.col.begin() + start);
      std::copy(cval[ch].begin(), cval[ch].end(), out.val.begin() + start);
      std::vector<int32_t>().swap(ccol[ch]);
      std::vector<V>().swap(cval[ch]);
    }
  });
  return out;
}

// recip(i, k): members j of R[i][:k+1] (in order) with i in R[j][:k+1]; row-major (N, width) with counts.
void reciprocal_sets(const int64_t* rank, int64_t n, int64_t k1, int64_t k, std::vector<int32_t>& sets,
                     std::vector<int32_t>& counts) {
  const int64_t width = std::min(k + 1, k1);
  sets.assign(n * width, 0);
  counts.assign(n, 0);
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int32_t c = 0;
      for (int64_t t = 0; t < width; ++t) {
        const int64_t j = rank[i * k1 + t];
        const int64_t* back = rank + j * k1;
        for (int64_t s = 0; s < width; ++s) {
          if (back[s] == i) {
            sets[i * width + c++] = static_cast<int32_t>(j);
            break;
          }
        }
      }
      counts[i] = c;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kreciprocal_jaccard_cpu(const at::Tensor& features_in,
                                                                       const at::Tensor& rank_in,
                                                                       const c10::optional<at::Tensor>& rank_sim_in,
                                                                       int64_t k2,
                                                                       const c10::optional<at::Tensor>& modality_in) {
  TORCH_CHECK(features_in.dim() == 2 && features_in.scalar_type() == at::kFloat,
              "vireid::kreciprocal_jaccard: features must be (N, d) float32");
  TORCH_CHECK(rank_in.dim() == 2 && rank_in.scalar_type() == at::kLong,
              "vireid::kreciprocal_jaccard: initial_rank must be (N, k1) int64");
  const int64_t n = features_in.size(0), d = features_in.size(1), k1 = rank_in.size(1);
  TORCH_CHECK(rank_in.size(0) == n, "vireid::kreciprocal_jaccard: initial_rank must have one row per feature");
  TORCH_CHECK(n > 0 && k1 >= 1 && k1 <= n, "vireid::kreciprocal_jaccard: need 1 <= k1 <= N");
  TORCH_CHECK(k2 >= 1 && k2 <= k1, "vireid::kreciprocal_jaccard: need 1 <= k2 <= k1");
  TORCH_CHECK(n < (int64_t(1) << 31), "vireid::kreciprocal_jaccard: at most 2^31 - 1 rows");
  check_finite(features_in, "features");
  const at::Tensor features = features_in.contiguous();
  const at::Tensor rank_t = rank_in.contiguous();
  const float* f = features.data_ptr<float>();
  const int64_t* rank = rank_t.data_ptr<int64_t>();
  TORCH_CHECK(rank_t.min().item<int64_t>() >= 0 && rank_t.max().item<int64_t>() < n,
              "vireid::kreciprocal_jaccard: initial_rank entries must be in [0, N)");
  const int64_t* modality = nullptr;
  at::Tensor modality_t;
  if (modality_in.has_value()) {
    modality_t = modality_in->contiguous();
    TORCH_CHECK(modality_t.dim() == 1 && modality_t.size(0) == n && modality_t.scalar_type() == at::kLong,
                "vireid::kreciprocal_jaccard: modality must be (N,) int64");
    modality = modality_t.data_ptr<int64_t>();
  }

  const float* rank_sim = nullptr;
  at::Tensor rank_sim_t;
  if (rank_sim_in.has_value()) {
    rank_sim_t = rank_sim_in->contiguous();
    TORCH_CHECK(rank_sim_t.sizes() == rank_t.sizes() && rank_sim_t.scalar_type() == at::kFloat,
                "vireid::kreciprocal_jaccard: rank_sim must be (N, k1) float32 like initial_rank");
    rank_sim = rank_sim_t.data_ptr<float>();
  }

  // Step 2: k-reciprocal sets for k1 and round_half_even(k1 / 2).
  const int64_t kh = static_cast<int64_t>(std::nearbyint(static_cast<double>(k1) / 2.0));
  std::vector<int32_t> a_sets, a_cnt, h_sets, h_cnt;
  reciprocal_sets(rank, n, k1, k1, a_sets, a_cnt);
  reciprocal_sets(rank, n, k1, kh, h_sets, h_cnt);
  const int64_t a_w = std::min(k1 + 1, k1), h_w = std::min(kh + 1, k1);

  // Steps 3-4: expansion and softmax encoding, one sorted sparse row of V per feature.
  const int max_threads = at::get_num_threads();
  std::vector<std::vector<char>> marks(max_threads, std::vector<char>(n, 0));
  std::vector<std::vector<int32_t>> slots(max_threads, std::vector<int32_t>(rank_sim ? n : 0, 0));
  const Csr<double> v = build_rows(n, [&](int64_t i, std::vector<int32_t>& cols, std::vector<double>& vals) {
    std::vector<char>& mark = marks[at::get_thread_num()];
    const int32_t* a_i = a_sets.data() + i * a_w;
    const int32_t na = a_cnt[i];
    for (int32_t t = 0; t < na; ++t) mark[a_i[t]] = 1;
    // mark: 1 = in A_i, 2 = added by the expansion (so the union stays duplicate-free without a sort of all).
    cols.assign(a_i, a_i + na);
    for (int32_t t = 0; t < na; ++t) {
      const int32_t c = a_i[t];
      const int32_t* h_c = h_sets.data() + c * h_w;
      const int32_t nh = h_cnt[c];
      int32_t common = 0;
      for (int32_t s = 0; s < nh; ++s) common += mark[h_c[s]] == 1;
      if (static_cast<double>(common) > 2.0 / 3.0 * static_cast<double>(nh)) {
        for (int32_t s = 0; s < nh; ++s) {
          if (!mark[h_c[s]]) {
            mark[h_c[s]] = 2;
            cols.push_back(h_c[s]);
          }
        }
      }
    }
    for (int32_t j : cols) mark[j] = 0;
    std::sort(cols.begin(), cols.end());
    // softmax over j of -(2 - 2 f_i.f_j), shifted by its maximum; f_i.f_j comes from rank_sim for j in R[i].
    vals.resize(cols.size());
    std::vector<int32_t>& where = slots[at::get_thread_num()];
    if (rank_sim)
      for (int64_t t = 0; t < k1; ++t) where[rank[i * k1 + t]] = static_cast<int32_t>(t + 1);
    double mx = -std::numeric_limits<double>::infinity();
    for (size_t t = 0; t < cols.size(); ++t) {
      const int32_t slot = rank_sim ? where[cols[t]] : 0;
      // A product beyond float32's range arrives as +-Inf in rank_sim: recomputed in float64, where it is finite.
      const double known = slot ? static_cast<double>(rank_sim[i * k1 + slot - 1]) : 0.0;
      const double sim = slot && std::isfinite(known)
                             ? known
                             : dot_exact<float>(f + i * d, f + static_cast<int64_t>(cols[t]) * d, d);
      vals[t] = -(2.0 - 2.0 * sim);
      mx = std::max(mx, vals[t]);
    }
    if (rank_sim)
      for (int64_t t = 0; t < k1; ++t) where[rank[i * k1 + t]] = 0;
    double total = 0.0;
    for (double& x : vals) {
      x = std::exp(x - mx);
      total += x;
    }
    for (double& x : vals) x /= total;
  });

  // Step 5: query expansion, the mean of V over R[i][:k2] (per modality, then across modalities, if given).
  std::vector<std::vector<double>> accs(max_threads, std::vector<double>(n, 0.0));
  std::vector<std::vector<int32_t>> touch_lists(max_threads);
  std::vector<std::vector<int64_t>> start_lists(max_threads);
  const Csr<double> vq_storage = k2 == 1 ? Csr<double>() : build_rows(n, [&](int64_t i, std::vector<int32_t>& cols,
                                                              std::vector<double>& vals) {
    std::vector<double>& acc = accs[at::get_thread_num()];
    std::vector<char>& mark = marks[at::get_thread_num()];
    const int64_t* nb = rank + i * k1;
    double weight[64];
    std::vector<double> weight_big;
    double* w = weight;
    if (k2 > 64) {
      weight_big.resize(k2);
      w = weight_big.data();
    }
    if (modality == nullptr) {
      for (int64_t t = 0; t < k2; ++t) w[t] = 1.0 / static_cast<double>(k2);
    } else {
      int64_t per[2] = {0, 0};
      for (int64_t t = 0; t < k2; ++t) per[modality[nb[t]] != 0]++;
      const int groups = (per[0] > 0) + (per[1] > 0);
      for (int64_t t = 0; t < k2; ++t)
        w[t] = 1.0 / (static_cast<double>(groups) * static_cast<double>(per[modality[nb[t]] != 0]));
    }
    for (int64_t t = 0; t < k2; ++t) {
      const int64_t j = nb[t];
      for (int64_t p = v.ptr[j]; p < v.ptr[j + 1]; ++p) {
        const int32_t c = v.col[p];
        if (!mark[c]) {
          mark[c] = 1;
          cols.push_back(c);
        }
        acc[c] += w[t] * v.val[p];
      }
    }
    std::sort(cols.begin(), cols.end());
    vals.resize(cols.size());
    for (size_t t = 0; t < cols.size(); ++t) {
      vals[t] = acc[cols[t]];
      acc[cols[t]] = 0.0;
      mark[cols[t]] = 0;
    }
  });
  const Csr<double>& vq = k2 == 1 ? v : vq_storage;

  // Inverted index: for each column c, the rows having V[row, c] > 0, with the value.
  std::vector<int64_t> inv_ptr(n + 1, 0);
  for (int32_t c : vq.col) inv_ptr[c + 1]++;
  for (int64_t c = 0; c < n; ++c) inv_ptr[c + 1] += inv_ptr[c];
  std::vector<int32_t> inv_row(inv_ptr[n]);
  std::vector<double> inv_val(inv_ptr[n]);
  {
    std::vector<int64_t> fill(inv_ptr.begin(), inv_ptr.end() - 1);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t p = vq.ptr[r]; p < vq.ptr[r + 1]; ++p) {
        const int64_t q = fill[vq.col[p]]++;
        inv_row[q] = static_cast<int32_t>(r);
        inv_val[q] = vq.val[p];
      }
    }
  }

  // Step 6: s_ij = sum_c min(V_ic, V_jc) over the columns of row i, ascending, so s_ij == s_ji bit for bit: each
  // pair is computed once, for j >= i (the upper triangle U; inverted-index lists are ascending, so a binary search
  // skips the rows below i), and mirrored. Distance 1 - s / (2 - s) clamped at 0; only float32 values < 1 are stored.
  // A row reaching more than (n - i) / kScanFraction pairs runs branch-free and is emitted by a scan of acc (pairs
  // always add a positive min, so acc[j] > 0 marks them; the scan is ascending for free); sparser rows keep a list
  // of touched rows and sort it.
  constexpr int64_t kScanFraction = 64;
  const Csr<float> upper = build_rows<float>(n, [&](int64_t i, std::vector<int32_t>& cols, std::vector<float>& vals) {
    std::vector<double>& acc = accs[at::get_thread_num()];
    std::vector<int32_t>& touched = touch_lists[at::get_thread_num()];
    std::vector<int64_t>& starts = start_lists[at::get_thread_num()];
    const int64_t p0 = vq.ptr[i], p1 = vq.ptr[i + 1];
    starts.resize(p1 - p0);
    int64_t pairs = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = vq.col[p];
      const int32_t* first = inv_row.data() + inv_ptr[c];
      const int32_t* last = inv_row.data() + inv_ptr[c + 1];
      starts[p - p0] = std::lower_bound(first, last, static_cast<int32_t>(i)) - inv_row.data();
      pairs += inv_ptr[c + 1] - starts[p - p0];
    }
    auto emit = [&](int32_t j) {
      const double s = acc[j];
      acc[j] = 0.0;
      const float dist = static_cast<float>(std::max(0.0, 1.0 - s / (2.0 - s)));
      if (dist < 1.0f) {
        cols.push_back(j);
        vals.push_back(dist);
      }
    };
    if (pairs * kScanFraction > n - i) {
      for (int64_t p = p0; p < p1; ++p) {
        const double vi = vq.val[p];
        const int64_t end = inv_ptr[vq.col[p] + 1];
        for (int64_t q = starts[p - p0]; q < end; ++q) acc[inv_row[q]] += std::min(vi, inv_val[q]);
      }
      for (int64_t j = i; j < n; ++j)
        if (acc[j] != 0.0) emit(static_cast<int32_t>(j));
    } else {
      touched.clear();
      for (int64_t p = p0; p < p1; ++p) {
        const double vi = vq.val[p];
        const int64_t end = inv_ptr[vq.col[p] + 1];
        for (int64_t q = starts[p - p0]; q < end; ++q) {
          const int32_t j = inv_row[q];
          if (acc[j] == 0.0) touched.push_back(j);
          acc[j] += std::min(vi, inv_val[q]);
        }
      }
      std::sort(touched.begin(), touched.end());
      for (int32_t j : touched) emit(j);
    }
  });

  // Full rows: row i = (entries (r, i) of U with r < i, ascending r) followed by U's row i (columns >= i).
  std::vector<int64_t> lower_count(n, 0);
  for (int64_t p = 0; p < upper.ptr[n]; ++p) lower_count[upper.col[p]]++;
  at::Tensor crow = at::empty({n + 1}, rank_t.options());
  int64_t* crowp = crow.data_ptr<int64_t>();
  crowp[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t diag = upper.ptr[i + 1] > upper.ptr[i] && upper.col[upper.ptr[i]] == i;
    lower_count[i] -= diag;  // the diagonal entry is U's, not a mirrored one
    crowp[i + 1] = crowp[i] + lower_count[i] + (upper.ptr[i + 1] - upper.ptr[i]);
  }
  const int64_t nnz = crowp[n];
  at::Tensor col = at::empty({nnz}, rank_t.options());
  at::Tensor values = at::empty({nnz}, features.options());
  int64_t* colp = col.data_ptr<int64_t>();
  float* valp = values.data_ptr<float>();
  advise_huge_pages(colp, nnz * sizeof(int64_t));
  advise_huge_pages(valp, nnz * sizeof(float));
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int64_t out = crowp[i] + lower_count[i];
      for (int64_t p = upper.ptr[i]; p < upper.ptr[i + 1]; ++p, ++out) {
        colp[out] = upper.col[p];
        valp[out] = upper.val[p];
      }
    }
  });
  // Mirrored entries (r, c > r) go to row c at its next free slot; scanning r in ascending order keeps each row's
  // columns sorted. Threads own disjoint ranges of destination rows and each scans all of U.
  at::parallel_for(0, n, n / std::max(1, at::get_num_threads()) + 1, [&](int64_t c0, int64_t c1) {
    std::vector<int64_t> fill(crowp + c0, crowp + c1);
    for (int64_t r = 0; r < c1; ++r) {
      for (int64_t p = upper.ptr[r]; p < upper.ptr[r + 1]; ++p) {
        const int64_t c = upper.col[p];
        if (c <= r || c < c0 || c >= c1) continue;
        const int64_t q = fill[c - c0]++;
        colp[q] = r;
        valp[q] = upper.val[p];
      }
    }
  });
  return {crow, col, values};
}

}  // namespace
}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) { m.impl("_kreciprocal_jaccard_cpu", &vireid::kreciprocal_jaccard_cpu); }
