// Memory-bank contrastive loss (cluster-contrast ClusterMemory) on the CPU.
//
// Forward: x = normalize(inputs) (rows), logits = x memory^T / temp by one ATen GEMM, then a fused epilogue per row
// (scale, max, log-sum-exp, cross-entropy against the label or a soft target). Backward: a fused epilogue turns the
// saved logits into grad_logits = (softmax - target) * grad_loss / (B temp), one GEMM gives grad_x = grad_logits memory
// (memory as it is now, before this call's update), then the normalisation Jacobian per row. Finally the memory update,
// parallel over the distinct labels of the batch, each label's members walked in batch order so that repeated labels
// reproduce the community's sequential loop exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"

namespace vireid {
namespace {

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's eps

// Rows per parallel task so that each task touches at least ~64K elements (~20 us of work). The row loops run
// between the two GEMMs, whose worker threads are still spinning then, so a parallel region costs a few
// microseconds: at B=256, D=2048 splitting them over the threads saves ~0.2 ms of a ~3.5 ms step.
int64_t row_grain(int64_t row_elements) {
  constexpr int64_t kElementsPerTask = int64_t(1) << 16;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, row_elements));
}

enum class UpdateMode { kSequential, kHard, kMean, kNone };

UpdateMode parse_update(c10::string_view update) {
  if (update == "sequential") return UpdateMode::kSequential;
  if (update == "hard") return UpdateMode::kHard;
  if (update == "mean") return UpdateMode::kMean;
  if (update == "none") return UpdateMode::kNone;
  TORCH_CHECK(false, "vireid::memory_contrastive: update must be sequential, hard, mean or none, got '",
              std::string(update), "'");
}

// Reductions with kLanes independent partial sums: GCC vectorises them into four AVX-512 (eight AVX2) accumulator
// chains, enough to hide the add latency (one accumulator would be a serial chain, since float addition may not be
// reassociated without -ffast-math; with 16 lanes the row norms were a third of the non-GEMM time).
constexpr int kLanes = 64;

template <typename T>
VIREID_ALWAYS_INLINE T lane_sum(const T* acc) {
  T s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
VIREID_ALWAYS_INLINE T dot_inline(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[k + j] * b[k + j];
  }
  T s = lane_sum(acc);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
VIREID_ALWAYS_INLINE T dot_body(const T* a, const T* b, int64_t n) {
  return dot_inline(a, b, n);
}
VIREID_MULTIVERSION(dot)

// One row of the forward epilogue: divide by temp in place, return the log-sum-exp and this row's loss.
// buf: C scratch values.
template <typename T>
VIREID_ALWAYS_INLINE void forward_row_body(T* logit, int64_t C, T temp, const T* soft, int64_t label, T* lse_out,
                                           T* loss_out, T* buf) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < C; ++j) {
    const T v = logit[j] / temp;
    logit[j] = v;
    mx = v > mx ? v : mx;
  }
  for (int64_t j = 0; j < C; ++j) buf[j] = exp_vec(logit[j] - mx);
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += buf[j + l];
  }
  T s = lane_sum(acc);
  for (; j < C; ++j) s += buf[j];
  const T lse = mx + std::log(s);
  *lse_out = lse;
  if (soft == nullptr) {
    *loss_out = lse - logit[label];
  } else {
    T mass = 0;
    for (int64_t c = 0; c < C; ++c) mass += soft[c];
    *loss_out = lse * mass - dot_inline(soft, logit, C);
  }
}
VIREID_MULTIVERSION(forward_row)

// grad_logits row = (softmax * sum(t) - t) * scale, written to out.
template <typename T>
VIREID_ALWAYS_INLINE void grad_row_body(const T* logit, int64_t C, T lse, const T* soft, int64_t label, T scale,
                                        T* out) {
  if (soft == nullptr) {
    for (int64_t j = 0; j < C; ++j) out[j] = exp_vec(logit[j] - lse) * scale;
    out[label] -= scale;
  } else {
    T mass = 0;
    for (int64_t j = 0; j < C; ++j) mass += soft[j];
    for (int64_t j = 0; j < C; ++j) out[j] = (exp_vec(logit[j] - lse) * mass - soft[j]) * scale;
  }
}
VIREID_MULTIVERSION(grad_row)

// dst = src / max(||src||, eps); returns ||src||.
template <typename T>
VIREID_ALWAYS_INLINE T normalize_row_body(const T* src, T* dst, int64_t D) {
  const T n = std::sqrt(dot_inline(src, src, D));
  const T denom = std::max(n, static_cast<T>(kNormEps));
  for (int64_t k = 0; k < D; ++k) dst[k] = src[k] / denom;
  return n;
}
VIREID_MULTIVERSION(normalize_row)

// Jacobian of x / max(||x||, eps) applied to g in place: (g - xn (xn . g)) / ||x||, or g / eps for tiny rows.
template <typename T>
VIREID_ALWAYS_INLINE void jacobian_row_body(T* g, const T* xn, T n, int64_t D) {
  if (n > static_cast<T>(kNormEps)) {
    const T dot = dot_inline(xn, g, D);
    for (int64_t k = 0; k < D; ++k) g[k] = (g[k] - xn[k] * dot) / n;
  } else {
    for (int64_t k = 0; k < D; ++k) g[k] = g[k] / static_cast<T>(kNormEps);
  }
}
VIREID_MULTIVERSION(jacobian_row)

// m <- (mu m + (1 - mu) x) / ||mu m + (1 - mu) x||, computed like the community's tensor expression.
// The squared norm is accumulated lane by lane as dot_inline(m, m) would sum it, in a first pass that writes nothing:
// when the sum has no length (x exactly opposite m with mu = 0.5, where the community code writes 0/0 = NaN) the row
// keeps its previous value, the documented rule on every backend.
template <typename T>
VIREID_ALWAYS_INLINE void momentum_step_body(T* m, const T* x, T mu, T one_minus, int64_t D) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= D; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T v = m[k + j] * mu + one_minus * x[k + j];
      acc[j] += v * v;
    }
  }
  T s = lane_sum(acc);
  for (; k < D; ++k) {
    const T v = m[k] * mu + one_minus * x[k];
    s += v * v;
  }
  if (!(s > 0)) return;
  const T n = std::sqrt(s);
  for (k = 0; k < D; ++k) m[k] = (m[k] * mu + one_minus * x[k]) / n;
}
VIREID_MULTIVERSION(momentum_step)

// Row normalisation of inputs (converted to T) into xn; norms kept for the Jacobian.
template <typename T>
void normalize_rows(const at::Tensor& inputs_t, at::Tensor& xn, std::vector<T>& norms) {
  const int64_t B = inputs_t.size(0), D = inputs_t.size(1);
  const T* src = inputs_t.data_ptr<T>();
  T* dst = xn.data_ptr<T>();
  norms.assign(B, T(0));
  at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) norms[i] = normalize_row<T>(src + i * D, dst + i * D, D);
  });
}

void check_common(const at::Tensor& inputs, const at::Tensor& targets, const at::Tensor& memory, const char* what) {
  TORCH_CHECK(inputs.dim() == 2, what, ": inputs must be (B, D), got ", inputs.sizes());
  TORCH_CHECK(memory.dim() == 2, what, ": memory must be (C, D), got ", memory.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == inputs.size(0), what, ": targets must be (B,) with B = ",
              inputs.size(0), ", got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, what, ": targets must be int64");
  TORCH_CHECK(inputs.size(1) == memory.size(1), what, ": inputs and memory must share D, got ", inputs.size(1),
              " and ", memory.size(1));
  TORCH_CHECK(inputs.size(0) > 0 && inputs.size(1) > 0 && memory.size(0) > 0, what, ": empty input");
  TORCH_CHECK(memory.scalar_type() == at::kFloat || memory.scalar_type() == at::kDouble, what,
              ": memory must be float32 (or float64)");
  TORCH_CHECK(inputs.is_floating_point(), what, ": inputs must be floating point");
  const int64_t C = memory.size(0);
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.size(0); ++i) {
    TORCH_CHECK(t[i] >= 0 && t[i] < C, what, ": targets[", i, "] = ", t[i], " is outside [0, ", C, ")");
  }
}

at::Tensor checked_soft(const c10::optional<at::Tensor>& soft_targets, int64_t B, int64_t C, at::ScalarType dtype,
                        const char* what) {
  if (!soft_targets.has_value()) return at::Tensor();
  const at::Tensor& s = *soft_targets;
  TORCH_CHECK(s.dim() == 2 && s.size(0) == B && s.size(1) == C, what, ": soft_targets must be (B, C) = (", B, ", ",
              C, "), got ", s.sizes());
  return s.to(dtype).contiguous();
}

// Update of memory rows with normalised features xn (B, D), in T = memory's dtype.
template <typename T>
void update_memory(const T* xn, const int64_t* labels, int64_t B, int64_t D, T* mem, double momentum,
                   UpdateMode mode) {
  if (mode == UpdateMode::kNone || B == 0) return;
  // Group sample indices by label, keeping batch order inside each group (stable counting sort over present labels).
  std::vector<int64_t> order(B);
  for (int64_t i = 0; i < B; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  std::vector<int64_t> starts;
  for (int64_t k = 0; k < B; ++k) {
    if (k == 0 || labels[order[k]] != labels[order[k - 1]]) starts.push_back(k);
  }
  const int64_t groups = static_cast<int64_t>(starts.size());
  starts.push_back(B);
  // The community computes m * momentum + (1 - momentum) * x in the memory's dtype with both scalars cast to it.
  const T mu = static_cast<T>(momentum);
  const T one_minus = static_cast<T>(1.0 - momentum);
  // Parallel over labels once the update is worth a parallel region (~64K elements).
  const int64_t grain = B * D >= (int64_t(1) << 16) ? 1 : groups + 1;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<T> mean_buf(mode == UpdateMode::kMean ? D : 0);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t first = starts[g], last = starts[g + 1];
      T* m = mem + labels[order[first]] * D;
      auto step = [&](const T* x) { momentum_step<T>(m, x, mu, one_minus, D); };
      if (mode == UpdateMode::kSequential) {
        for (int64_t k = first; k < last; ++k) step(xn + order[k] * D);
      } else if (mode == UpdateMode::kHard) {
        int64_t best = order[first];
        T best_sim = std::numeric_limits<T>::infinity();
        for (int64_t k = first; k < last; ++k) {  // strict < keeps the first minimum in batch order
          const T sim = dot<T>(xn + order[k] * D, m, D);
          if (sim < best_sim) {
            best_sim = sim;
            best = order[k];
          }
        }
        step(xn + best * D);
      } else {  // mean
        std::fill(mean_buf.begin(), mean_buf.end(), T(0));
        for (int64_t k = first; k < last; ++k) {
          const T* x = xn + order[k] * D;
          for (int64_t c = 0; c < D; ++c) mean_buf[c] += x[c];
        }
        const T count = static_cast<T>(last - first);
        for (int64_t c = 0; c < D; ++c) mean_buf[c] /= count;
        step(mean_buf.data());
      }
    }
  });
}

// Scratch tensors that never leave the op (normalised inputs, logit gradients), kept per calling thread between
// training steps: fresh multi-MB buffers come back from the kernel page by page, and at B=256, D=2048 those page
// faults cost about a third of the step's non-GEMM time.
at::Tensor workspace(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local at::Tensor cache[2];
  at::Tensor& t = cache[slot];
  if (!t.defined() || t.dtype() != options.dtype() || t.numel() < c10::multiply_integers(sizes))
    t = at::empty({c10::multiply_integers(sizes)}, options);
  return t.narrow(0, 0, c10::multiply_integers(sizes)).view(sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> memory_contrastive_cpu(const at::Tensor& inputs,
                                                                      const at::Tensor& targets,
                                                                      const at::Tensor& memory,
                                                                      const c10::optional<at::Tensor>& soft_targets,
                                                                      double temp, double momentum,
                                                                      c10::string_view update) {
  const char* what = "vireid::memory_contrastive";
  check_common(inputs, targets.contiguous(), memory, what);
  parse_update(update);
  TORCH_CHECK(temp > 0, what, ": temp must be > 0, got ", temp);
  const int64_t B = inputs.size(0), D = inputs.size(1), C = memory.size(0);
  const auto dtype = memory.scalar_type();
  const at::Tensor labels = targets.contiguous();
  const at::Tensor soft = checked_soft(soft_targets, B, C, dtype, what);
  const at::Tensor mem = memory.contiguous();
  at::Tensor inputs_t = inputs.to(dtype).contiguous();
  at::Tensor xn = workspace(0, {B, D}, inputs_t.options());
  at::Tensor logits, lse = at::empty({B}, inputs_t.options());
  at::Tensor per_sample = at::empty({B}, inputs_t.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "memory_contrastive_cpu", [&] {
    std::vector<scalar_t> norms;
    normalize_rows<scalar_t>(inputs_t, xn, norms);
    logits = at::empty({B, C}, xn.options());
    gemm_nt_out(logits, xn, mem);  // oneDNN for fp32: about 2x MKL's sgemm on these AMD CPUs
    scalar_t* lg = logits.data_ptr<scalar_t>();
    const scalar_t* sp = soft.defined() ? soft.data_ptr<scalar_t>() : nullptr;
    const int64_t* y = labels.data_ptr<int64_t>();
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* ps = per_sample.data_ptr<scalar_t>();
    const scalar_t t = static_cast<scalar_t>(temp);
    at::parallel_for(0, B, row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> buf(C);
      for (int64_t i = r0; i < r1; ++i) {
        forward_row<scalar_t>(lg + i * C, C, t, sp ? sp + i * C : nullptr, y[i], lse_p + i, ps + i, buf.data());
      }
    });
  });
  // Summed in double: the mean over a large batch stays exact to float32 rounding.
  at::Tensor loss = at::empty({}, inputs_t.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "memory_contrastive_cpu_mean", [&] {
    const scalar_t* ps = per_sample.data_ptr<scalar_t>();
    double acc = 0;
    for (int64_t i = 0; i < B; ++i) acc += static_cast<double>(ps[i]);
    *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(acc / static_cast<double>(B));
  });
  return {loss, logits, lse};
}

at::Tensor memory_contrastive_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& inputs,
                                           const at::Tensor& targets, at::Tensor& memory,
                                           const c10::optional<at::Tensor>& soft_targets, const at::Tensor& logits,
                                           const at::Tensor& lse, double temp, double momentum,
                                           c10::string_view update) {
  const char* what = "vireid::memory_contrastive_backward";
  check_common(inputs, targets.contiguous(), memory, what);
  const UpdateMode mode = parse_update(update);
  TORCH_CHECK(memory.is_contiguous(), what, ": memory must be contiguous (it is updated in place)");
  const int64_t B = inputs.size(0), D = inputs.size(1), C = memory.size(0);
  const auto dtype = memory.scalar_type();
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == C, what, ": logits must be (B, C)");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == B, what, ": lse must be (B,)");
  TORCH_CHECK(grad_loss.numel() == 1, what, ": grad_loss must have one element");
  const at::Tensor labels = targets.contiguous();
  const at::Tensor soft = checked_soft(soft_targets, B, C, dtype, what);
  const at::Tensor lg = logits.to(dtype).contiguous();
  const at::Tensor ls = lse.to(dtype).contiguous();
  at::Tensor inputs_t = inputs.to(dtype).contiguous();
  at::Tensor xn = workspace(0, {B, D}, inputs_t.options());
  at::Tensor grad_inputs;
  AT_DISPATCH_FLOATING_TYPES(dtype, "memory_contrastive_backward_cpu", [&] {
    std::vector<scalar_t> norms;
    normalize_rows<scalar_t>(inputs_t, xn, norms);
    const scalar_t scale = static_cast<scalar_t>(grad_loss.item<double>() / (static_cast<double>(B) * temp));
    at::Tensor grad_logits = workspace(1, {B, C}, inputs_t.options());
    const scalar_t* lgp = lg.data_ptr<scalar_t>();
    const scalar_t* lsp = ls.data_ptr<scalar_t>();
    const scalar_t* sp = soft.defined() ? soft.data_ptr<scalar_t>() : nullptr;
    const int64_t* y = labels.data_ptr<int64_t>();
    scalar_t* gl = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        grad_row<scalar_t>(lgp + i * C, C, lsp[i], sp ? sp + i * C : nullptr, y[i], scale, gl + i * C);
      }
    });
    at::Tensor grad_x = at::empty({B, D}, inputs_t.options());
    gemm_nt_out(grad_x, grad_logits, memory.t());  // memory before the update
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    const scalar_t* xp = xn.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) jacobian_row<scalar_t>(gx + i * D, xp + i * D, norms[i], D);
    });
    grad_inputs = grad_x;
    update_memory<scalar_t>(xp, y, B, D, memory.data_ptr<scalar_t>(), momentum, mode);
  });
  return grad_inputs.to(inputs.scalar_type());
}

void memory_update_cpu(const at::Tensor& normalized, const at::Tensor& targets, at::Tensor& memory, double momentum,
                       c10::string_view update) {
  const char* what = "vireid::memory_update";
  check_common(normalized, targets.contiguous(), memory, what);
  TORCH_CHECK(memory.is_contiguous(), what, ": memory must be contiguous (it is updated in place)");
  const UpdateMode mode = parse_update(update);
  const at::Tensor labels = targets.contiguous();
  const at::Tensor xn = normalized.to(memory.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "memory_update_cpu", [&] {
    update_memory<scalar_t>(xn.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), xn.size(0), xn.size(1),
                            memory.data_ptr<scalar_t>(), momentum, mode);
  });
}

}  // namespace
}  // namespace vireid

TORCH_LIBRARY_IMPL(vireid, CPU, m) {
  m.impl("_memory_contrastive_cpu", &vireid::memory_contrastive_cpu);
  m.impl("_memory_contrastive_backward_cpu", &vireid::memory_contrastive_backward_cpu);
  m.impl("_memory_update_cpu", &vireid::memory_update_cpu);
}
