// Batched entropic optimal transport, log-domain Sinkhorn on the CPU.
//
// Potentials f (rows) and g (columns) are kept in float64; the plan is P_ij = exp(f_i + g_j - lam * C_ij).
// One iteration = a column update (g) followed by a row pass that measures the row-marginal error of the current
// plan and, unless converged, updates f.
//
// Stabilised by absorption (Schmitzer 2019): the plan buffer holds the absorbed kernel W_ij = exp(f_i + g_j - lam C_ij)
// and iterations scale it in the linear domain, P = diag(u) W diag(v), with u, v near 1 — two multiply-add passes per
// iteration and no exp. Whenever a scaling leaves [1e-8, 1e8] or a sum is not safely positive, the scalings are
// absorbed into f, g (log-domain, exact) and W is recomputed; a column whose kernel underflowed is first updated with an
// exact max-shifted log-sum-exp over C. The iterates are those of log-domain Sinkhorn; the plan buffer is the only
// N x K memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace vireid {
namespace {

constexpr int64_t kRowBlock = 64;

// Exact log-domain row update for rows [r0, r1): f_i = log a_i - lse_i, lse_i = log sum_j exp(g_j - lam C_ij),
// max-shifted.
template <typename T>
VIREID_ALWAYS_INLINE void row_pass_body(const T* C, int64_t K, int64_t r0, int64_t r1, T lam, const T* g_t,
                                        const double* a, double* f, T* buf) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* c = C + i * K;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < K; ++j) {
      const T t = g_t[j] - lam * c[j];
      buf[j] = t;
      mx = t > mx ? t : mx;
    }
    T s = 0;
    for (int64_t j = 0; j < K; ++j) s += exp_vec(buf[j] - mx);
    const double lse = static_cast<double>(mx) + std::log(static_cast<double>(s));
    f[i] = std::log(a[i]) - lse;
  }
}
VIREID_MULTIVERSION(row_pass)

// Column sums of exp(f_i + gb_j - lam C_ij) for rows [r0, r1), accumulated into acc (double, K).
template <typename T>
VIREID_ALWAYS_INLINE void col_sum_body(const T* C, int64_t K, int64_t r0, int64_t r1, T lam, const T* f_t,
                                       const T* gb_t, double* acc, T* buf) {
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    for (int64_t j = 0; j < K; ++j) buf[j] = 0;
    for (int64_t i = b0; i < b1; ++i) {
      const T* c = C + i * K;
      const T fi = f_t[i];
      for (int64_t j = 0; j < K; ++j) buf[j] += exp_vec(fi + gb_t[j] - lam * c[j]);
    }
    for (int64_t j = 0; j < K; ++j) acc[j] += static_cast<double>(buf[j]);
  }
}
VIREID_MULTIVERSION(col_sum)

template <typename T>
VIREID_ALWAYS_INLINE void col_max_body(const T* C, int64_t K, int64_t r0, int64_t r1, T lam, const T* f_t, T* mx) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* c = C + i * K;
    const T fi = f_t[i];
    for (int64_t j = 0; j < K; ++j) {
      const T t = fi - lam * c[j];
      mx[j] = t > mx[j] ? t : mx[j];
    }
  }
}
VIREID_MULTIVERSION(col_max)


// Absorbed kernel for rows [r0, r1): W_ij = exp(f_i + g_j - lam C_ij), exponent formed in float64.
template <typename T>
VIREID_ALWAYS_INLINE void absorb_body(const T* C, T* W, int64_t K, int64_t r0, int64_t r1, double lam, const double* f,
                                      const double* g) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* c = C + i * K;
    T* w = W + i * K;
    const double fi = f[i];
    for (int64_t j = 0; j < K; ++j) w[j] = static_cast<T>(exp_vec(fi + g[j] - lam * static_cast<double>(c[j])));
  }
}
VIREID_MULTIVERSION(absorb)

// Column sums of u_i W_ij over rows [r0, r1), accumulated into acc (double, K) in blocks of kRowBlock rows.
template <typename T>
VIREID_ALWAYS_INLINE void scale_cols_body(const T* W, int64_t K, int64_t r0, int64_t r1, const T* u_t, double* acc,
                                          T* buf) {
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    for (int64_t j = 0; j < K; ++j) buf[j] = 0;
    for (int64_t i = b0; i < b1; ++i) {
      const T* w = W + i * K;
      const T ui = u_t[i];
      for (int64_t j = 0; j < K; ++j) buf[j] += ui * w[j];
    }
    for (int64_t j = 0; j < K; ++j) acc[j] += static_cast<double>(buf[j]);
  }
}
VIREID_MULTIVERSION(scale_cols)

template <typename T>
VIREID_ALWAYS_INLINE void finalize_body(T* W, int64_t K, int64_t r0, int64_t r1, const double* u, const T* v_t) {
  for (int64_t i = r0; i < r1; ++i) {
    T* w = W + i * K;
    const T ui = static_cast<T>(u[i]);
    for (int64_t j = 0; j < K; ++j) w[j] *= ui * v_t[j];
  }
}
VIREID_MULTIVERSION(finalize)

// First row update from g = 0, fused: per row m_i = min_j C_ij, W_ij = exp(lam (m_i - C_ij)) (so f_i = lam m_i),
// u_i = a_i / sum_j W_ij; column sums of u_i W_ij accumulate into acc (double, K) for the first column update.
template <typename T>
VIREID_ALWAYS_INLINE void init_body(const T* C, T* W, int64_t K, int64_t r0, int64_t r1, T lam, const double* a,
                                    double* f, double* u, double* acc, T* buf) {
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    for (int64_t j = 0; j < K; ++j) buf[j] = 0;
    for (int64_t i = b0; i < b1; ++i) {
      const T* c = C + i * K;
      T* w = W + i * K;
      T m = c[0];
      for (int64_t j = 1; j < K; ++j) m = c[j] < m ? c[j] : m;
      T s = 0;
      for (int64_t j = 0; j < K; ++j) {
        w[j] = exp_vec(lam * (m - c[j]));
        s += w[j];
      }
      f[i] = static_cast<double>(lam) * static_cast<double>(m);
      u[i] = a[i] / static_cast<double>(s);
      const T ui = static_cast<T>(u[i]);
      for (int64_t j = 0; j < K; ++j) buf[j] += ui * w[j];
    }
    for (int64_t j = 0; j < K; ++j) acc[j] += static_cast<double>(buf[j]);
  }
}
VIREID_MULTIVERSION(init)

// One fused sweep over W: r_i = sum_j W_ij v_j, the row error sum_i |u_i r_i - a_i| (returned), u_new_i = a_i / r_i,
// and the column sums of u_new_i W_ij for the next column update: one read of W per iteration.
template <typename T>
VIREID_ALWAYS_INLINE double sweep_body(const T* W, int64_t K, int64_t r0, int64_t r1, const T* v_t, const double* u,
                                       const double* a, double* u_new, double* acc, T* buf) {
  double err = 0.0;
  for (int64_t b0 = r0; b0 < r1; b0 += kRowBlock) {
    const int64_t b1 = std::min(r1, b0 + kRowBlock);
    for (int64_t j = 0; j < K; ++j) buf[j] = 0;
    for (int64_t i = b0; i < b1; ++i) {
      const T* w = W + i * K;
      T s = 0;
      for (int64_t j = 0; j < K; ++j) s += w[j] * v_t[j];
      const double r = static_cast<double>(s);
      err += std::fabs(u[i] * r - a[i]);
      u_new[i] = a[i] / r;
      const T ui = static_cast<T>(u_new[i]);
      for (int64_t j = 0; j < K; ++j) buf[j] += ui * w[j];
    }
    for (int64_t j = 0; j < K; ++j) acc[j] += static_cast<double>(buf[j]);
  }
  return err;
}
VIREID_MULTIVERSION(sweep)

struct Partition {
  int64_t n, parts;
  int64_t begin(int64_t p) const { return n * p / parts; }
  int64_t end(int64_t p) const { return n * (p + 1) / parts; }
};

template <typename T>
void solve_one(const T* C, T* W, int64_t N, int64_t K, double lam_d, const double* a, const double* b, int64_t max_iter,
               double tol, int64_t* n_iter_out, double* err_out) {
  const T lam = static_cast<T>(lam_d);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + kRowBlock - 1) / kRowBlock));
  const Partition part{N, parts};
  auto for_parts = [&](auto&& fn) {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) fn(p, part.begin(p), part.end(p));
    });
  };
  constexpr double kLow = 1e-8, kHigh = 1e8;  // scalings outside are absorbed into the potentials
  std::vector<double> f(N, 0.0), g(K, 0.0), log_b(K), u(N, 1.0), u_new(N), v(K, 1.0), v_new(K);
  for (int64_t j = 0; j < K; ++j) log_b[j] = std::log(b[j]);
  std::vector<T> f_t(N), g_t(K, T(0)), gb_t(K), u_t(N, T(1)), v_t(K, T(1));
  std::vector<double> partial(parts * K), part_err(parts);
  std::vector<T> scratch(parts * K), col_mx(parts * K);

  auto sync = [&](const std::vector<double>& src, std::vector<T>& dst) {
    for (size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<T>(src[i]);
  };
  // W = exp(f + g - lam C) from the current potentials.
  auto rebuild_kernel = [&]() {
    for_parts([&](int64_t, int64_t r0, int64_t r1) { absorb<T>(C, W, K, r0, r1, lam_d, f.data(), g.data()); });
  };
  // Fold the scalings into the potentials and rebuild W.
  auto absorb_all = [&]() {
    for (int64_t i = 0; i < N; ++i) f[i] += std::log(u[i]), u[i] = 1.0, u_t[i] = T(1);
    for (int64_t j = 0; j < K; ++j) g[j] += std::log(v[j]), v[j] = 1.0, v_t[j] = T(1);
    rebuild_kernel();
  };
  // Exact log-domain row update f_i = log a_i - LSE_j(g_j - lam C_ij) (v must be absorbed).
  auto row_update_log = [&]() {
    sync(g, g_t);
    for_parts([&](int64_t p, int64_t r0, int64_t r1) {
      row_pass<T>(C, K, r0, r1, lam, g_t.data(), a, f.data(), scratch.data() + p * K);
    });
  };
  // Exact log-domain column update g_j = log b_j - LSE_i(f_i - lam C_ij), max-shifted (u must be absorbed).
  auto col_update_log = [&]() {
    sync(f, f_t);
    for_parts([&](int64_t p, int64_t r0, int64_t r1) {
      T* mx = col_mx.data() + p * K;
      std::fill(mx, mx + K, -std::numeric_limits<T>::infinity());
      col_max<T>(C, K, r0, r1, lam, f_t.data(), mx);
    });
    for (int64_t j = 0; j < K; ++j) {
      T m = col_mx[j];
      for (int64_t p = 1; p < parts; ++p) m = std::max(m, col_mx[p * K + j]);
      gb_t[j] = -m;  // the shifted sum is then in [1, N]
    }
    for_parts([&](int64_t p, int64_t r0, int64_t r1) {
      double* acc = partial.data() + p * K;
      std::fill(acc, acc + K, 0.0);
      col_sum<T>(C, K, r0, r1, lam, f_t.data(), gb_t.data(), acc, scratch.data() + p * K);
    });
    for (int64_t j = 0; j < K; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < parts; ++p) s += partial[p * K + j];
      g[j] = log_b[j] + static_cast<double>(gb_t[j]) - std::log(s);
    }
  };
  auto col_sums = [&]() {
    for_parts([&](int64_t p, int64_t r0, int64_t r1) {
      double* acc = partial.data() + p * K;
      std::fill(acc, acc + K, 0.0);
      scale_cols<T>(W, K, r0, r1, u_t.data(), acc, scratch.data() + p * K);
    });
  };
  // Column update from the column sums in `partial` (computed with the current u).
  auto col_update = [&]() {
    bool safe = true;
    for (int64_t j = 0; j < K; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < parts; ++p) s += partial[p * K + j];
      v_new[j] = b[j] / s;
      safe = safe && v_new[j] >= kLow && v_new[j] <= kHigh;  // false for NaN, 0 and inf too
    }
    if (safe) {
      v.swap(v_new);
      sync(v, v_t);
      return;
    }
    // A column of W underflowed or drifted far: the same update, exactly, in the log domain.
    absorb_all();
    col_update_log();
    rebuild_kernel();
  };
  // Measures the row error of P = diag(u) W diag(v) and prepares u_new with its column sums (in `partial`).
  auto sweep_rows = [&]() {
    for_parts([&](int64_t p, int64_t r0, int64_t r1) {
      double* acc = partial.data() + p * K;
      std::fill(acc, acc + K, 0.0);
      part_err[p] = sweep<T>(W, K, r0, r1, v_t.data(), u.data(), a, u_new.data(), acc, scratch.data() + p * K);
    });
    double e = 0.0;
    for (int64_t p = 0; p < parts; ++p) e += part_err[p];
    return e;
  };
  auto row_update = [&]() {
    bool safe = true;
    for (int64_t i = 0; i < N && safe; ++i) safe = u_new[i] >= kLow && u_new[i] <= kHigh;
    if (safe) {
      u.swap(u_new);
      sync(u, u_t);
      return;  // the sweep already left the column sums for this u in `partial`
    }
    for (int64_t j = 0; j < K; ++j) g[j] += std::log(v[j]), v[j] = 1.0, v_t[j] = T(1);
    for (int64_t i = 0; i < N; ++i) u[i] = 1.0, u_t[i] = T(1);
    row_update_log();
    rebuild_kernel();
    col_sums();
  };

  // The first row update (from g = 0) fused with the column sums the first column update needs.
  for_parts([&](int64_t p, int64_t r0, int64_t r1) {
    double* acc = partial.data() + p * K;
    std::fill(acc, acc + K, 0.0);
    init<T>(C, W, K, r0, r1, lam, a, f.data(), u.data(), acc, scratch.data() + p * K);
  });
  sync(u, u_t);
  int64_t it = 0;
  double err = std::numeric_limits<double>::infinity();
  while (it < max_iter) {
    ++it;
    col_update();
    err = sweep_rows();
    if (!std::isfinite(err)) {
      // Some row of W underflowed: measure exactly after absorbing (the sweep leaves u untouched).
      absorb_all();
      err = sweep_rows();
    }
    if (err <= tol || it == max_iter) break;
    row_update();
  }
  *n_iter_out = it;
  *err_out = err;
  for_parts([&](int64_t p, int64_t r0, int64_t r1) { finalize<T>(W, K, r0, r1, u.data(), v_t.data()); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& cost, double lam, const at::Tensor& a,
                                                            const at::Tensor& b, int64_t max_iter, double tol) {
  TORCH_CHECK(cost.dim() == 3, "vireid::sinkhorn: cost must be (B, N, K), got ", cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "vireid::sinkhorn: cost must be float32 or float64");
  const int64_t B = cost.size(0), N = cost.size(1), K = cost.size(2);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == N && a.scalar_type() == at::kDouble,
              "vireid::sinkhorn: a must be float64 (B, N)");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == B && b.size(1) == K && b.scalar_type() == at::kDouble,
              "vireid::sinkhorn: b must be float64 (B, K)");
  TORCH_CHECK(N > 0 && K > 0, "vireid::sinkhorn: cost must be non-empty");
  TORCH_CHECK_VALUE(lam > 0 && std::isfinite(lam), "lam must be a finite number > 0, got ", lam);
  TORCH_CHECK_VALUE(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  check_finite(cost, "cost");
  // Each cost row shifted by its minimum, as the reference and the Triton kernel do: the plan and the iterates are
  // unchanged (f absorbs the shift), and the potentials stay small where lam * cost is huge. Unshifted, a float32 cost
  // with entries ~1e29 and lam = 50 drove the float-typed buffers to inf - inf = NaN.
  const at::Tensor c = (cost - std::get<0>(cost.min(2, /*keepdim=*/true))).contiguous();
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor plan_out = at::empty_like(c);
  at::Tensor n_iter = at::empty({B}, cost.options().dtype(at::kLong));
  at::Tensor err = at::empty({B}, cost.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "vireid_sinkhorn", [&] {
    for (int64_t bi = 0; bi < B; ++bi) {
      solve_one<scalar_t>(c.data_ptr<scalar_t>() + bi * N * K, plan_out.data_ptr<scalar_t>() + bi * N * K, N, K, lam,
                          ac.data_ptr<double>() + bi * N, bc.data_ptr<double>() + bi * K, max_iter, tol,
                          n_iter.data_ptr<int64_t>() + bi, err.data_ptr<double>() + bi);
    }
  });
  return {plan_out, n_iter, err};
}

}  // namespace
}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) { m.impl("_sinkhorn_cpu", &vireid::sinkhorn_cpu); }
