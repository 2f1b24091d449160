#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

namespace vireid {

static Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAvx2;
  }
#endif
  if (const char* cap = std::getenv("VIREID_CPU_ISA")) {
    const std::string s(cap);
    Isa want = s == "baseline" ? Isa::kBaseline : s == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace vireid

// ATen's oneDNN matmul on dense tensors (aten/src/ATen/native/mkldnn/Matmul.h, not among the installed headers).
// Declared weak: a torch build without it leaves the pointer null and the conversion path below runs instead.
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

namespace vireid {

static bool full_fp32_matmul() {
  auto& ctx = at::globalContext();
  if (ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST) return false;
  const auto p = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return p != at::Float32Precision::BF16 && p != at::Float32Precision::TF32;
}

void gemm_nt_out(at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs) {
  if (lhs.scalar_type() == at::kFloat && at::hasMKLDNN() && full_fp32_matmul()) {
    // oneDNN on the plain buffers (strided views, no conversion copies). ATen accepts fp32 there only on CPUs it
    // deems bf16-capable (AVX-512 BW/VL/DQ or AVX-NE-CONVERT) and in recent versions: a refusal (checked before any
    // work) switches to the conversion path for the rest of the process.
    static std::atomic<bool> plain_ok{true};
    if (at::native::mkldnn_matmul != nullptr && plain_ok.load(std::memory_order_relaxed) && out.is_contiguous()) {
      try {
        at::native::mkldnn_matmul(lhs, rhs.t(), out, 0.0f, 1.0f);
        return;
      } catch (const c10::Error&) {
        plain_ok.store(false, std::memory_order_relaxed);
      }
    }
    constexpr int64_t kBlock = 2048;  // bounds the conversion copies of rhs
    const at::Tensor lhs_m = lhs.contiguous().to_mkldnn();
    for (int64_t c = 0; c < rhs.size(0); c += kBlock) {
      const int64_t cw = std::min(kBlock, rhs.size(0) - c);
      const at::Tensor block = at::mkldnn_linear(lhs_m, rhs.narrow(0, c, cw).contiguous().to_mkldnn()).to_dense();
      out.narrow(1, c, cw).copy_(block);
    }
    return;
  }
  at::mm_out(out, lhs, rhs.t());
}

void check_finite(const at::Tensor& t, const char* name) {
  if (t.numel() == 0 || !t.is_floating_point()) return;
  const auto mm = at::aminmax(t);  // propagates NaN
  const bool ok = std::isfinite(std::get<0>(mm).item<double>()) && std::isfinite(std::get<1>(mm).item<double>());
  TORCH_CHECK_VALUE(ok, name, " contains NaN or Inf; clean the input (e.g. torch.nan_to_num) before calling");
}

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t{2} << 20;
  if (p == nullptr || bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace vireid

// Read (without loading the library) by vireid_fast._extension to refuse a build made for another torch.
extern "C" __attribute__((visibility("default"), used)) const char vireid_build_marker[] =
    "VIREID_TORCH_VERSION=" VIREID_TORCH_VERSION ";";
