// Cross-Modality Feature Propagation (SALCR Eq. 28-29) on the CPU, without any dense (Nv+Nr)^2 matrix.
//
// The neighbours of each block (Svv, Svr, Srv, Srr) come from the exact kNN search (csrc/knn.cpp: tiled GEMM,
// bf16 candidates on CPUs with native bf16 dot products, exact re-score; the symmetric blocks compute each tile pair
// once). Scores are float32 roundings of the exact float64 dot products, so the kept set is well defined: per
// (row, block), every column whose score is >= the k-th largest score, ties included (the search asks for k + 1
// neighbours; a row whose (k+1)-th score still ties is rescanned exactly over the whole block). Weights: kept scores
// clamped at 0, divided by the block row's sum; a block row whose kept scores are all <= 0 contributes nothing (the
// reference divides 0 by 0 there). The output row is the L2-normalised weighted sum of kept rows (zero rows stay
// zero), and the affinity is returned in CSR form (entries with positive weight, columns sorted).
// float64 features: neighbours are selected on their float32 rounding; weights and propagation run in float64.
// Features whose float32 scores would overflow or vanish are first scaled by a power of two (CMFP is scale-invariant).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "common.h"
#include "knn.h"

namespace vireid {
namespace {

template <typename T>
VIREID_ALWAYS_INLINE void axpy_body(T* out, const T* x, T w, int64_t d) {
  for (int64_t t = 0; t < d; ++t) out[t] += w * x[t];
}
VIREID_MULTIVERSION(axpy)

// Bytes of input rows per propagation block: a quarter of the last-level cache (which neighbours may share), within
// [2, 8] MB (8 MB measured best on a 32 MB L3; 16 MB already spills).
int64_t cache_block_bytes() {
  int64_t llc = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
  llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  if (llc <= 0) llc = int64_t{16} << 20;
  return std::clamp<int64_t>(llc / 4, int64_t{2} << 20, int64_t{8} << 20);
}

// Kept neighbours of one (row, block): block-local columns and their weights (before normalisation).
template <typename T>
struct Kept {
  std::vector<int64_t> col;
  std::vector<T> val;
};

// Applies the kept-set rule to the kNN result of one block (queries q (R, d) against database b (Mb, d), float32
// copies qs/bs for exact rescans, original-precision rows qo/bo for the weights).
template <typename T>
void select_block(const at::Tensor& values, const at::Tensor& indices, int64_t k, const float* qs, const float* bs,
                  const T* qo, const T* bo, int64_t mb, int64_t d, Kept<T>* out) {
  const int64_t rows = values.size(0), kk = values.size(1);
  const float* vp = values.data_ptr<float>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> all;
    std::vector<std::pair<int64_t, float>> found;
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = vp + r * kk;
      const int64_t* j = ip + r * kk;
      const float t = v[k - 1];
      found.clear();
      if (kk < mb && v[kk - 1] >= t) {  // ties run past the k + 1 found: rescan the whole block row exactly
        all.resize(mb);
        for (int64_t c = 0; c < mb; ++c) all[c] = static_cast<float>(dot_exact<float>(qs + r * d, bs + c * d, d));
        for (int64_t c = 0; c < mb; ++c)
          if (all[c] >= t) found.emplace_back(c, all[c]);
      } else {
        for (int64_t e = 0; e < kk; ++e)
          if (v[e] >= t) found.emplace_back(j[e], v[e]);
        std::sort(found.begin(), found.end());
      }
      Kept<T>& kept = out[r];
      kept.col.resize(found.size());
      kept.val.resize(found.size());
      for (size_t e = 0; e < found.size(); ++e) {
        const int64_t c = found[e].first;
        kept.col[e] = c;
        if constexpr (std::is_same_v<T, float>) {
          kept.val[e] = found[e].second;
        } else {
          double acc = 0.0;
          for (int64_t u = 0; u < d; ++u) acc += qo[r * d + u] * bo[c * d + u];
          kept.val[e] = acc;
        }
      }
    }
  });
}

// Largest |component| of a feature matrix; a ValueError names the argument when it holds NaN or Inf.
template <typename T>
double max_abs_finite(const at::Tensor& f, const char* name) {
  const T* p = f.data_ptr<T>();
  const int64_t n = f.numel();
  std::vector<double> part(std::max<int64_t>(1, at::get_num_threads()), 0.0);
  std::vector<char> bad(part.size(), 0);
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    double m = 0.0;
    bool nonfinite = false;
    for (int64_t u = b; u < e; ++u) {
      const double v = std::fabs(static_cast<double>(p[u]));
      nonfinite |= !(v <= std::numeric_limits<double>::max());  // NaN fails every comparison
      m = std::max(m, v);
    }
    const int t = at::get_thread_num();
    part[t] = std::max(part[t], m);
    bad[t] |= nonfinite;
  });
  TORCH_CHECK_VALUE(std::none_of(bad.begin(), bad.end(), [](char c) { return c != 0; }), "vireid::cmfp: ", name,
                    " contains NaN or Inf; clean it (e.g. torch.nan_to_num) before calling");
  return *std::max_element(part.begin(), part.end());
}

// CMFP does not change when all features are multiplied by one positive number (the weights are ratios within a
// block row and every output row is L2-normalised). Features whose float32 scores could overflow (d * max|f|^2 above
// 2^100) or vanish (below 2^-100) are scaled by a power of two so that max|f| lies in [1, 2): exact up to components
// that fall below the smallest normal number, and the result is the one of unbounded exponent range.
// Returns the scaled features and the exponent e of the scale 2^e (0: not scaled).
template <typename T>
std::tuple<at::Tensor, at::Tensor, int> scaled_for_float32_scores(const at::Tensor& fv, const at::Tensor& fr) {
  const double m = std::max(max_abs_finite<T>(fv, "features_v"), max_abs_finite<T>(fr, "features_r"));
  const double top = m * m * static_cast<double>(fv.size(1));  // inf when it overflows: then too it scales
  if (m == 0.0 || (top <= std::ldexp(1.0, 100) && top >= std::ldexp(1.0, -100))) return {fv, fr, 0};
  const int e = -std::ilogb(m);
  auto scale = [e](const at::Tensor& f) {
    at::Tensor out = at::empty_like(f);
    const T* src = f.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, f.numel(), 1 << 16, [&](int64_t b, int64_t u1) {
      for (int64_t u = b; u < u1; ++u) dst[u] = static_cast<T>(std::ldexp(static_cast<double>(src[u]), e));
    });
    return out;
  };
  return {scale(fv), scale(fr), e};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cmfp_impl(const at::Tensor& fv_in,
                                                                                 const at::Tensor& fr_in, int64_t k) {
  const auto scaled = scaled_for_float32_scores<T>(fv_in, fr_in);
  const at::Tensor& fv = std::get<0>(scaled);
  const at::Tensor& fr = std::get<1>(scaled);
  // F.normalize's eps (1e-12) applies to the unscaled row norm: in scaled units it is 1e-12 * 2^e.
  const double norm_eps = std::ldexp(1e-12, std::get<2>(scaled));
  const int64_t nv = fv.size(0), nr = fr.size(0), d = fv.size(1);
  const int64_t n = nv + nr;
  const T* fvp = fv.data_ptr<T>();
  const T* frp = fr.data_ptr<T>();
  auto row_ptr = [&](int64_t j) { return j < nv ? fvp + j * d : frp + (j - nv) * d; };
  const at::Tensor sv = fv.scalar_type() == at::kFloat ? fv : fv.to(at::kFloat).contiguous();
  const at::Tensor sr = fr.scalar_type() == at::kFloat ? fr : fr.to(at::kFloat).contiguous();
  const float* svp = sv.data_ptr<float>();
  const float* srp = sr.data_ptr<float>();
  const bool bf16 = knn_bf16_worthwhile(n, n, d);

  // kept[b][i]: row i of the assembled matrix against block column b (0: visible, 1: infrared).
  std::vector<Kept<T>> kept_v(n), kept_r(n);
  {
    const int64_t kv = std::min(nv, k + 1), kr = std::min(nr, k + 1);
    auto run = [&](const at::Tensor& q, const float* qs, const T* qo, const at::Tensor& b, const float* bs,
                   const T* bo, int64_t kk, Kept<T>* dst) {
      const auto [values, indices] = knn_exact(q, b, kk, false, bf16);
      select_block<T>(values, indices, k, qs, bs, qo, bo, b.size(0), d, dst);
    };
    run(sv, svp, fvp, sv, svp, fvp, kv, kept_v.data());
    if (kv == k + 1 && kr == k + 1) {
      // Svr and Srv are transposes: one sweep of the visible x infrared tiles serves both.
      const auto [v_vr, i_vr, v_rv, i_rv] = knn_exact_both(sv, sr, k + 1, false, bf16);
      select_block<T>(v_vr, i_vr, k, svp, srp, fvp, frp, nr, d, kept_r.data());
      select_block<T>(v_rv, i_rv, k, srp, svp, frp, fvp, nv, d, kept_v.data() + nv);
    } else {  // k = min(Nv, Nr): the smaller block keeps every column
      run(sv, svp, fvp, sr, srp, frp, kr, kept_r.data());
      run(sr, srp, frp, sv, svp, fvp, kv, kept_v.data() + nv);
    }
    run(sr, srp, frp, sr, srp, frp, kr, kept_r.data() + nv);
  }

  // Positive kept entries, per-block row normalisation.
  std::vector<int64_t> counts(n + 1, 0);
  std::vector<double> sums(2 * n, 0.0);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      int64_t cnt = 0;
      for (int64_t b = 0; b < 2; ++b) {
        Kept<T>& c = b == 0 ? kept_v[i] : kept_r[i];
        size_t w = 0;
        double s = 0.0;
        for (size_t e = 0; e < c.val.size(); ++e) {
          if (c.val[e] > T(0)) {
            c.col[w] = c.col[e];
            c.val[w] = c.val[e];
            s += static_cast<double>(c.val[e]);
            ++w;
          }
        }
        c.col.resize(w);
        c.val.resize(w);
        sums[2 * i + b] = s;
        cnt += static_cast<int64_t>(w);
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
  // CSR of the normalised weights (columns in [V; R] numbering, sorted: visible block first).
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      int64_t e = counts[i];
      for (int64_t b = 0; b < 2; ++b) {
        Kept<T>& c = b == 0 ? kept_v[i] : kept_r[i];
        const int64_t offset = b == 0 ? 0 : nv;
        const double sum = sums[2 * i + b];  // only used when the list is non-empty (sum > 0)
        const T inv = static_cast<T>(1.0 / sum);
        // A sum of subnormal similarities has no finite reciprocal in T: divide instead (same weights, no inf * 0).
        const bool divide = !std::isfinite(static_cast<double>(inv));
        for (size_t u = 0; u < c.val.size(); ++u, ++e) {
          cp[e] = offset + c.col[u];
          vp[e] = divide ? static_cast<T>(static_cast<double>(c.val[u]) / sum) : c.val[u] * inv;
        }
        std::vector<T>().swap(c.val);
        std::vector<int64_t>().swap(c.col);
      }
    }
  });
  auto out_row = [&](int64_t i) { return i < nv ? ovp + i * d : orp + (i - nv) * d; };
  // Propagation gathers about 2k neighbour rows (k per block) per output row from all over the features (a row's
  // neighbours beyond its own identity are scattered), which is DRAM-bound when done row by row. Instead the input
  // rows are taken in blocks that stay in the last-level cache, and every output row adds its entries from the
  // current block (its CSR columns are sorted, so a cursor per row walks them): inputs are read from memory once and
  // the outputs, streamed once per block, are read sequentially. At 6,000 + 6,000 x 2048: 0.12 s instead of 0.32 s.
  const int64_t block_rows = std::max<int64_t>(64, cache_block_bytes() / (d * static_cast<int64_t>(sizeof(T))));
  std::vector<int64_t> cursor(counts.begin(), counts.end() - 1);
  for (int64_t c0 = 0; c0 < n; c0 += block_rows) {
    const int64_t c1 = std::min(n, c0 + block_rows);
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* o = out_row(i);
        int64_t e = cursor[i];
        const int64_t end = counts[i + 1];
        for (; e < end && cp[e] < c1; ++e) axpy<T>(o, row_ptr(cp[e]), vp[e], d);
        cursor[i] = e;
      }
    });
  }
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* o = out_row(i);
      double ss = 0.0;
      for (int64_t t = 0; t < d; ++t) ss += static_cast<double>(o[t]) * static_cast<double>(o[t]);
      const T scale = static_cast<T>(1.0 / std::max(std::sqrt(ss), norm_eps));
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
  check_finite(features_v, "features_v");
  check_finite(features_r, "features_r");
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(features_v.scalar_type(), "vireid_cmfp", [&] {
    result = cmfp_impl<scalar_t>(features_v.contiguous(), features_r.contiguous(), k);
  });
  return result;
}

}  // namespace
}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) { m.impl("_cmfp_cpu", &vireid::cmfp_cpu); }
