// Cross-Modality Feature Propagation (SALCR Eq. 28-29) on the CPU, without any dense (Nv+Nr)^2 matrix.
//
// X = [Fv; Fr] (N x d, never materialised). The Gram matrix X X^T is symmetric, so it is computed once per unordered
// pair, one row panel at a time: panel p holds rows [I0, I1) (within one modality) against columns [I0, N) (one or two
// GEMMs, at most T x N values). Row i of the panel feeds the candidate lists of row i; columns j >= I1 feed row j's
// lists (read row-major against a small array of per-column thresholds).
//
// Each (row, block) keeps a candidate list of (value, column): every value >= `lo` is appended, where `lo` is the
// k-th largest value among the candidates so far (-inf until k candidates exist). When the list reaches its capacity
// it is pruned to the values >= its k-th largest, which never drops an entry >= the row's final k-th largest value,
// so ties at the threshold are all kept (the spec keeps every entry >= the k-th largest value, counted with
// multiplicity). At the end: threshold t = k-th largest, kept = values >= t, weights max(v, 0) / sum (each block on
// its own); a block whose kept values are all <= 0 contributes nothing (the reference divides 0 by 0 there).
// The output row is the L2-normalised weighted sum of kept rows of X (zero rows stay zero), and the affinity is
// returned in CSR form (entries with positive weight, columns sorted).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common.h"

namespace vireid {
namespace {

template <typename T>
struct Candidates {
  std::vector<T> val;
  std::vector<int64_t> col;
  T lo = -std::numeric_limits<T>::infinity();
  size_t cap = 0;

  // Prune once the list holds 2k entries (at least 64): amortised O(1) per push, and at most ~2k entries per list
  // (plus ties), so large k costs memory proportional to the output rather than a fixed reservation.
  void init(int64_t k) { cap = static_cast<size_t>(std::max<int64_t>(2 * k, 64)); }

  // The k-th largest value of `val` (k <= val.size()), counted with multiplicity.
  T kth_largest(int64_t k, std::vector<T>& scratch) const {
    scratch.assign(val.begin(), val.end());
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<T>());
    return scratch[k - 1];
  }

  void prune(int64_t k, std::vector<T>& scratch) {
    const T t = kth_largest(k, scratch);
    size_t w = 0;
    for (size_t e = 0; e < val.size(); ++e) {
      if (val[e] >= t) {
        val[w] = val[e];
        col[w] = col[e];
        ++w;
      }
    }
    val.resize(w);
    col.resize(w);
    lo = t;
    if (2 * w > cap) cap = 2 * w;  // heavy ties: grow instead of pruning every push
  }

  void push(T v, int64_t j, int64_t k, std::vector<T>& scratch) {
    val.push_back(v);
    col.push_back(j);
    if (val.size() >= cap) prune(k, scratch);
  }
};

// Feed values v[0..n) (columns col0 + t) to a candidate list; chunks whose maximum is below `lo` are skipped.
template <typename T>
void scan(const T* v, int64_t n, int64_t col0, Candidates<T>& c, int64_t k, std::vector<T>& scratch) {
  constexpr int64_t kChunk = 16;
  int64_t t = 0;
  for (; t + kChunk <= n; t += kChunk) {
    T m = v[t];
    for (int64_t u = 1; u < kChunk; ++u) m = v[t + u] > m ? v[t + u] : m;
    if (m < c.lo) continue;
    for (int64_t u = 0; u < kChunk; ++u)
      if (v[t + u] >= c.lo) c.push(v[t + u], col0 + t + u, k, scratch);
  }
  for (; t < n; ++t)
    if (v[t] >= c.lo) c.push(v[t], col0 + t, k, scratch);
}

template <typename T>
VIREID_ALWAYS_INLINE void axpy_body(T* out, const T* x, T w, int64_t d) {
  for (int64_t t = 0; t < d; ++t) out[t] += w * x[t];
}
VIREID_MULTIVERSION(axpy)

// One column segment of a panel: values (rows x width, contiguous) at assembled columns [col0, col0 + width).
template <typename T>
struct Segment {
  const T* data;
  int64_t width, col0;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmfp_impl(const at::Tensor& fv,
                                                                                 const at::Tensor& fr, int64_t k) {
  const int64_t nv = fv.size(0), nr = fr.size(0), d = fv.size(1);
  const int64_t n = nv + nr;
  const T* fvp = fv.data_ptr<T>();
  const T* frp = fr.data_ptr<T>();
  auto row_ptr = [&](int64_t j) { return j < nv ? fvp + j * d : frp + (j - nv) * d; };

  std::vector<Candidates<T>> lists(2 * n);  // lists[2 i + b]: row i against block b (0: visible, 1: infrared)
  for (auto& c : lists) c.init(k);

  // Panel height: enough rows for an efficient GEMM, at most ~64 MB of panel. Panels never straddle the modality
  // boundary, so every panel row belongs to one feature tensor (no concatenated copy of the inputs is made).
  const int64_t budget = (int64_t{64} << 20) / static_cast<int64_t>(sizeof(T));
  const int64_t panel_rows = std::clamp<int64_t>(budget / std::max<int64_t>(n, 1), 128, 1024);
  at::Tensor seg_v = at::empty({0}, fv.options()), seg_r = at::empty({0}, fv.options());
  constexpr int64_t kColChunk = 64;

  for (int64_t i0 = 0; i0 < n;) {
    const int64_t i1 = i0 < nv ? std::min(nv, i0 + panel_rows) : std::min(n, i0 + panel_rows);
    const int64_t rows = i1 - i0;
    const int64_t panel_block = i0 < nv ? 0 : 1;
    const at::Tensor lhs = i0 < nv ? fv.narrow(0, i0, rows) : fr.narrow(0, i0 - nv, rows);
    std::vector<Segment<T>> segs;
    if (i0 < nv) {
      seg_v.resize_({rows, nv - i0});
      gemm_nt_out(seg_v, lhs, fv.narrow(0, i0, nv - i0));
      segs.push_back({seg_v.data_ptr<T>(), nv - i0, i0});
      seg_r.resize_({rows, nr});
      gemm_nt_out(seg_r, lhs, fr);
      segs.push_back({seg_r.data_ptr<T>(), nr, nv});
    } else {
      seg_r.resize_({rows, n - i0});
      gemm_nt_out(seg_r, lhs, fr.narrow(0, i0 - nv, n - i0));
      segs.push_back({seg_r.data_ptr<T>(), n - i0, i0});
    }
    // Rows of the panel: columns [i0, n) of rows [i0, i1); each segment lies in one block.
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      std::vector<T> scratch;
      for (int64_t r = r0; r < r1; ++r)
        for (const auto& sg : segs)
          scan(sg.data + r * sg.width, sg.width, sg.col0, lists[2 * (i0 + r) + (sg.col0 < nv ? 0 : 1)], k, scratch);
    });
    // Columns j >= i1 of the panel are rows j's values at columns [i0, i1) (symmetry), all in panel_block.
    for (const auto& sg : segs) {
      const int64_t first = std::max(i1, sg.col0), last = sg.col0 + sg.width;
      if (first >= last) continue;
      const int64_t chunks = (last - first + kColChunk - 1) / kColChunk;
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<T> scratch;
        T lo[kColChunk];
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t j0 = first + c * kColChunk, j1 = std::min(last, j0 + kColChunk);
          const int64_t cw = j1 - j0;
          Candidates<T>* col_lists[kColChunk];
          for (int64_t u = 0; u < cw; ++u) {
            col_lists[u] = &lists[2 * (j0 + u) + panel_block];
            lo[u] = col_lists[u]->lo;
          }
          // Row-major read of the panel (no transposed copy): compare a row's cw values with the cw thresholds.
          for (int64_t r = 0; r < rows; ++r) {
            const T* src = sg.data + r * sg.width + (j0 - sg.col0);
            bool any = false;
            for (int64_t u = 0; u < cw; ++u) any |= src[u] >= lo[u];
            if (!any) continue;
            for (int64_t u = 0; u < cw; ++u) {
              if (src[u] >= lo[u]) {
                col_lists[u]->push(src[u], i0 + r, k, scratch);
                lo[u] = col_lists[u]->lo;
              }
            }
          }
        }
      });
    }
    i0 = i1;
  }
  seg_v = at::Tensor();
  seg_r = at::Tensor();

  // Final threshold per list, positive kept entries, per-block row normalisation.
  std::vector<int64_t> counts(n + 1, 0);
  std::vector<double> sums(2 * n, 0.0);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    std::vector<T> scratch;
    std::vector<int64_t> perm;
    for (int64_t i = r0; i < r1; ++i) {
      int64_t cnt = 0;
      for (int64_t b = 0; b < 2; ++b) {
        Candidates<T>& c = lists[2 * i + b];
        const T t = c.kth_largest(k, scratch);
        // keep positives >= t, sorted by column
        perm.clear();
        for (size_t e = 0; e < c.val.size(); ++e)
          if (c.val[e] >= t && c.val[e] > T(0)) perm.push_back(static_cast<int64_t>(e));
        std::sort(perm.begin(), perm.end(), [&](int64_t a, int64_t bb) { return c.col[a] < c.col[bb]; });
        std::vector<T> v(perm.size());
        std::vector<int64_t> j(perm.size());
        double s = 0.0;
        for (size_t e = 0; e < perm.size(); ++e) {
          v[e] = c.val[perm[e]];
          j[e] = c.col[perm[e]];
          s += static_cast<double>(v[e]);
        }
        sums[2 * i + b] = s;
        c.val.swap(v);
        c.col.swap(j);
        cnt += static_cast<int64_t>(c.val.size());
      }
      counts[i + 1] = cnt;
    }
  });
  std::partial_sum(counts.begin(), counts.end(), counts.begin());
  const int64_t nnz = counts[n];
  at::Tensor crow = at::empty({n + 1}, fv.options().dtype(at::kLong));
  at::Tensor cols = at::empty({nnz}, fv.options().dtype(at::kLong));
  at::Tensor vals = at::empty({nnz}, fv.options());
  std::copy(counts.begin(), counts.end(), crow.data_ptr<int64_t>());
  at::Tensor out_v = at::zeros({nv, d}, fv.options()), out_r = at::zeros({nr, d}, fv.options());
  int64_t* cp = cols.data_ptr<int64_t>();
  T* vp = vals.data_ptr<T>();
  T* ovp = out_v.data_ptr<T>();
  T* orp = out_r.data_ptr<T>();
  // Propagation is a gather of neighbour rows (memory-bound). Rows are visited grouped by their smallest visible
  // neighbour, so rows of one identity, which share most neighbours, run back to back and find them in cache.
  std::vector<int64_t> visit(n);
  {
    std::vector<int64_t> key(n);
    for (int64_t i = 0; i < n; ++i) key[i] = lists[2 * i].col.empty() ? n : lists[2 * i].col[0];
    std::iota(visit.begin(), visit.end(), int64_t{0});
    std::stable_sort(visit.begin(), visit.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  }
  at::parallel_for(0, n, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i = visit[p];
      int64_t e = counts[i];
      T* o = i < nv ? ovp + i * d : orp + (i - nv) * d;
      for (int64_t b = 0; b < 2; ++b) {
        Candidates<T>& c = lists[2 * i + b];
        const T inv = static_cast<T>(1.0 / sums[2 * i + b]);  // only used when the list is non-empty (sum > 0)
        for (size_t u = 0; u < c.val.size(); ++u, ++e) {
          const T w = c.val[u] * inv;
          cp[e] = c.col[u];
          vp[e] = w;
          axpy<T>(o, row_ptr(c.col[u]), w, d);
        }
        std::vector<T>().swap(c.val);
        std::vector<int64_t>().swap(c.col);
      }
      double ss = 0.0;
      for (int64_t t = 0; t < d; ++t) ss += static_cast<double>(o[t]) * static_cast<double>(o[t]);
      const T scale = static_cast<T>(1.0 / std::max(std::sqrt(ss), 1e-12));
      for (int64_t t = 0; t < d; ++t) o[t] *= scale;
    }
  });
  return {out_v, out_r, crow, cols, vals};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmfp_cpu(const at::Tensor& features_v,
                                                                                const at::Tensor& features_r,
                                                                                int64_t k) {
  TORCH_CHECK(features_v.dim() == 2 && features_r.dim() == 2, "vireid::cmfp: features must be 2-D (N, d), got ",
              features_v.sizes(), " and ", features_r.sizes());
  TORCH_CHECK(features_v.scalar_type() == features_r.scalar_type(), "vireid::cmfp: features must share a dtype");
  TORCH_CHECK(features_v.scalar_type() == at::kFloat || features_v.scalar_type() == at::kDouble,
              "vireid::cmfp: features must be float32 or float64");
  TORCH_CHECK(features_v.size(1) == features_r.size(1), "vireid::cmfp: features must share the dimension d");
  TORCH_CHECK(features_v.size(0) > 0 && features_r.size(0) > 0 && features_v.size(1) > 0,
              "vireid::cmfp: features must be non-empty");
  TORCH_CHECK(k >= 1 && k <= std::min(features_v.size(0), features_r.size(0)),
              "vireid::cmfp: k must be in [1, min(N_v, N_r)], got ", k);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(features_v.scalar_type(), "vireid_cmfp", [&] {
    result = cmfp_impl<scalar_t>(features_v.contiguous(), features_r.contiguous(), k);
  });
  return result;
}

}  // namespace
}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) { m.impl("cmfp", &vireid::cmfp_cpu); }
