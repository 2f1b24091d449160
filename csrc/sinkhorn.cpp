// Batched entropic optimal transport, log-domain Sinkhorn on the CPU.
//
// Potentials f (rows) and g (columns) are kept in float64; the plan is P_ij = exp(f_i + g_j - lam * C_ij).
// One iteration = a column update (g) followed by a row pass that measures the row-marginal error of the current
// plan and, unless converged, updates f. The column update is a single streaming pass over C shifted by the previous
// potentials (the column sums are then close to b_j and cannot overflow); columns whose shifted sum leaves a safe
// range are redone with an exact max-shifted two-pass log-sum-exp. No N x K temporary beyond the plan is allocated.
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

// Row pass for rows [r0, r1): lse_i = log sum_j exp(g_j - lam C_ij). Writes the updated potential to f_new and
// returns the partial L1 error sum_i |exp(f_i + lse_i) - a_i| of the plan as it stands (before the update).
template <typename T>
VIREID_ALWAYS_INLINE double row_pass_body(const T* C, int64_t K, int64_t r0, int64_t r1, T lam, const T* g_t,
                                          const double* a, const double* f, double* f_new, T* buf) {
  double err = 0.0;
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
    err += std::fabs(std::exp(f[i] + lse) - a[i]);
    f_new[i] = std::log(a[i]) - lse;
  }
  return err;
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

template <typename T>
VIREID_ALWAYS_INLINE void plan_body(const T* C, T* P, int64_t K, int64_t r0, int64_t r1, T lam, const T* f_t,
                                    const T* g_t) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* c = C + i * K;
    T* p = P + i * K;
    const T fi = f_t[i];
    for (int64_t j = 0; j < K; ++j) p[j] = exp_vec(fi + g_t[j] - lam * c[j]);
  }
}
VIREID_MULTIVERSION(plan)

struct Partition {
  int64_t n, parts;
  int64_t begin(int64_t p) const { return n * p / parts; }
  int64_t end(int64_t p) const { return n * (p + 1) / parts; }
};

template <typename T>
void solve_one(const T* C, T* P, int64_t N, int64_t K, double lam_d, const double* a, const double* b, int64_t max_iter,
               double tol, int64_t* n_iter_out, double* err_out) {
  const T lam = static_cast<T>(lam_d);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + kRowBlock - 1) / kRowBlock));
  const Partition part{N, parts};
  std::vector<double> f(N, 0.0), f_new(N), g(K, 0.0), log_b(K);
  for (int64_t j = 0; j < K; ++j) log_b[j] = std::log(b[j]);
  std::vector<T> f_t(N), g_t(K, T(0)), gb_t(K);
  std::vector<double> partial(parts * K), part_err(parts);
  std::vector<T> scratch(parts * K);
  std::vector<T> col_mx(parts * K);

  auto row_pass_all = [&]() {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        part_err[p] = row_pass<T>(C, K, part.begin(p), part.end(p), lam, g_t.data(), a, f.data(), f_new.data(),
                                  scratch.data() + p * K);
    });
    double e = 0.0;
    for (int64_t p = 0; p < parts; ++p) e += part_err[p];
    return e;
  };
  auto accept_f = [&]() {
    f.swap(f_new);
    for (int64_t i = 0; i < N; ++i) f_t[i] = static_cast<T>(f[i]);
  };
  // Exact column update: g_j = log b_j - LSE_i(f_i - lam C_ij), max-shifted.
  auto col_exact = [&]() {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        T* mx = col_mx.data() + p * K;
        std::fill(mx, mx + K, -std::numeric_limits<T>::infinity());
        col_max<T>(C, K, part.begin(p), part.end(p), lam, f_t.data(), mx);
      }
    });
    for (int64_t j = 0; j < K; ++j) {
      T m = col_mx[j];
      for (int64_t p = 1; p < parts; ++p) m = std::max(m, col_mx[p * K + j]);
      gb_t[j] = -m;  // the shifted sum is then in [1, N]
    }
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double* acc = partial.data() + p * K;
        std::fill(acc, acc + K, 0.0);
        col_sum<T>(C, K, part.begin(p), part.end(p), lam, f_t.data(), gb_t.data(), acc, scratch.data() + p * K);
      }
    });
    for (int64_t j = 0; j < K; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < parts; ++p) s += partial[p * K + j];
      g[j] = log_b[j] + static_cast<double>(gb_t[j]) - std::log(s);
      g_t[j] = static_cast<T>(g[j]);
    }
  };
  // Streaming column update shifted by the previous g: s_j = sum_i P_ij / b_j, g_j -= log s_j.
  auto col_update = [&]() {
    for (int64_t j = 0; j < K; ++j) gb_t[j] = static_cast<T>(g[j] - log_b[j]);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double* acc = partial.data() + p * K;
        std::fill(acc, acc + K, 0.0);
        col_sum<T>(C, K, part.begin(p), part.end(p), lam, f_t.data(), gb_t.data(), acc, scratch.data() + p * K);
      }
    });
    bool unsafe = false;
    std::vector<double> s(K);
    for (int64_t j = 0; j < K; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < parts; ++p) acc += partial[p * K + j];
      s[j] = acc;
      // Outside this range the shifted terms may have lost precision to under/overflow of T.
      if (!(acc > 1e-20 && acc < 1e20)) unsafe = true;
    }
    if (unsafe) return col_exact();
    for (int64_t j = 0; j < K; ++j) {
      g[j] -= std::log(s[j]);
      g_t[j] = static_cast<T>(g[j]);
    }
  };

  // Start from g = 0 with an exact row update, then iterate.
  row_pass_all();
  accept_f();
  int64_t it = 0;
  double err = std::numeric_limits<double>::infinity();
  while (it < max_iter) {
    ++it;
    col_update();
    // The row pass measures the error of the plan as it stands; on the converged or last iteration its f update is
    // dropped, so that the returned plan has exact column marginals.
    err = row_pass_all();
    if (err <= tol || it == max_iter) break;
    accept_f();
  }
  *n_iter_out = it;
  *err_out = err;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) plan<T>(C, P, K, part.begin(p), part.end(p), lam, f_t.data(), g_t.data());
  });
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
  TORCH_CHECK(lam > 0, "vireid::sinkhorn: lam must be > 0");
  const at::Tensor c = cost.contiguous();
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

TORCH_LIBRARY_IMPL(vireid, CPU, m) { m.impl("sinkhorn", &vireid::sinkhorn_cpu); }
