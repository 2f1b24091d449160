// Shared helpers for the CPU kernels: a vectorisable exp, ISA multiversioning, argument checks.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#define VIREID_ALWAYS_INLINE inline __attribute__((always_inline))

namespace vireid {

// exp that GCC vectorises (no libm call in the loop). Max error ~1 ulp over the normal range; inputs below
// the smallest normal result return 0 (callers never rely on subnormals), inputs above overflow return +inf.
VIREID_ALWAYS_INLINE float exp_vec(float x) {
  const bool under = x < -87.3f;
  const bool over = x > 88.72f;
  float xc = x < -87.3f ? -87.3f : (x > 88.72f ? 88.72f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n split in two factors so that n = 128 (x near the overflow bound) stays representable.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  int32_t b1 = (half + 127) << 23;
  int32_t b2 = (ni - half + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(float));
  std::memcpy(&s2, &b2, sizeof(float));
  float res = p * s1 * s2;
  res = under ? 0.0f : res;
  res = over ? std::numeric_limits<float>::infinity() : res;
  return res;
}

VIREID_ALWAYS_INLINE double exp_vec(double x) {
  const bool under = x < -708.0;
  const bool over = x > 709.7;
  double xc = x < -708.0 ? -708.0 : (x > 709.7 ? 709.7 : x);
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = xc * 1.4426950408889634074 + shifter;
  const double n = t - shifter;
  const double r = xc - n * 6.93147180369123816490e-01 - n * 1.90821492927058770002e-10;
  // Taylor to degree 12 on |r| <= ln2/2: truncation error < 2e-17.
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  const int64_t ni = static_cast<int64_t>(n);
  const int64_t half = ni >> 1;
  int64_t b1 = (half + 1023) << 52;
  int64_t b2 = (ni - half + 1023) << 52;
  double s1, s2;
  std::memcpy(&s1, &b1, sizeof(double));
  std::memcpy(&s2, &b2, sizeof(double));
  double res = p * s1 * s2;
  res = under ? 0.0 : res;
  res = over ? std::numeric_limits<double>::infinity() : res;
  return res;
}

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Chosen once per process; VIREID_CPU_ISA=baseline|avx2|avx512 caps it (for testing the other paths).
Isa cpu_isa();

// out (rows x width, contiguous, preallocated) = lhs (rows x d) @ rhs (width x d)^T: a plain GEMM in lhs's dtype.
// float32 goes through oneDNN when torch has it and fp32 matmul precision is full (the default): on AMD CPUs MKL's
// sgemm takes its AVX2 "zen" path and oneDNN's AVX-512 kernel is about twice as fast. Otherwise at::mm_out, which
// follows torch's matmul precision settings.
void gemm_nt_out(at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs);

// Float32-output GEMM of bf16 inputs: out (rows x width, row stride ldo) = a (rows x dp) @ b (width x dp)^T, a and b
// row-major bf16 bit patterns with an even row length dp (pad odd d with a zero column). Every product of two bf16
// values is exact in float32 and the sums are float32 (at most d + 1 roundings per output, in a fixed order per
// implementation; denormal inputs and results may be flushed to zero): the output carries no bf16 rounding.
enum class Bf16Gemm { kNone = 0, kAvx512Bf16 = 1, kMklCblas = 2 };

// Whether this GEMM can run here (AVX512-BF16 for ours, the MKL symbol for MKL's; never below VIREID_CPU_ISA=avx512).
bool bf16_gemm_supported(Bf16Gemm kind);

// The float32-output bf16 GEMM the kNN's bf16 candidate search uses, chosen once per process: MKL's
// cblas_gemm_bf16bf16f32 (exported by libtorch_cpu) on CPUs with AMX-BF16, where MKL runs it on the matrix units;
// kNone elsewhere, where the search keeps ATen's bf16 GEMM (bf16 output, a wider bound): on AVX512-BF16 CPUs without
// AMX our kernel below was measured slower than it (common.cpp). VIREID_BF16_GEMM=none|avx512bf16|mkl overrides the
// choice among the supported ones.
Bf16Gemm bf16_gemm_kind();

// Runs a supported float32-output bf16 GEMM. Parallel over column panels (ours) or MKL's threads.
void gemm_bf16_f32_nt(float* out, int64_t ldo, const uint16_t* a, int64_t rows, const uint16_t* b, int64_t width,
                      int64_t dp, Bf16Gemm kind);

// Asks the kernel to back [p, p + bytes) with transparent huge pages where it allows them on request ("madvise"
// mode): first-touch page faults on buffers of hundreds of MB cost more than filling them. No-op below 8 MB.
void advise_huge_pages(void* p, size_t bytes);

// ValueError (TORCH_CHECK_VALUE) if the floating tensor t holds NaN or Inf; worded like vireid_fast/ops/_checks.py.
// The op entry points repeat the Python validation layer's finiteness check so that the private _<op>_cpu twins are
// never fed a value their search bounds cannot handle.
void check_finite(const at::Tensor& t, const char* name);

}  // namespace vireid

// Compiles a function body (an always-inline template `NAME##_body<T>`) three times, for AVX-512, AVX2+FMA and the
// baseline, and defines `NAME<T>(args...)` choosing by cpu_isa(). OpenMP stays outside: outlined parallel regions
// would not inherit the target attribute.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VIREID_MULTIVERSION(NAME)                                                                 \
  template <typename T, typename... Args>                                                         \
  __attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))) auto NAME##_v4(Args... args) { \
    return NAME##_body<T>(args...);                                                               \
  }                                                                                               \
  template <typename T, typename... Args>                                                         \
  __attribute__((target("arch=x86-64-v3"))) auto NAME##_v3(Args... args) {                        \
    return NAME##_body<T>(args...);                                                               \
  }                                                                                               \
  template <typename T, typename... Args>                                                         \
  auto NAME##_v1(Args... args) {                                                                  \
    return NAME##_body<T>(args...);                                                                      \
  }                                                                                               \
  template <typename T, typename... Args>                                                         \
  auto NAME(Args... args) {                                                                       \
    switch (::vireid::cpu_isa()) {                                                                \
      case ::vireid::Isa::kAvx512:                                                                \
        return NAME##_v4<T>(args...);                                                             \
      case ::vireid::Isa::kAvx2:                                                                  \
        return NAME##_v3<T>(args...);                                                             \
      default:                                                                                    \
        return NAME##_v1<T>(args...);                                                             \
    }                                                                                             \
  }
#else
#define VIREID_MULTIVERSION(NAME)        \
  template <typename T, typename... Args> \
  auto NAME(Args... args) {               \
    return NAME##_body<T>(args...);              \
  }
#endif

namespace vireid {

// Dot product of two float rows as the float64 sum of the (exact) float64 products. 32 fixed accumulators (column t
// goes to t mod 32), folded as acc[u] += acc[u + w] for w = 16, 8, 4, 2, 1: the same sum on every ISA, so "exact"
// scores do not depend on the machine, and four independent vector chains (the kNN re-score is bound by this loop).
// b may also be given as its float64 conversion (B = double): the same products and order, so the same bits, and a
// row scored against many others is converted once.
template <typename T, typename B>
VIREID_ALWAYS_INLINE double dot_exact_body(const float* a, const B* b, int64_t d) {
  constexpr int kLanes = 32;
  double acc[kLanes] = {0};
  int64_t t = 0;
  for (; t + kLanes <= d; t += kLanes) {
    for (int u = 0; u < kLanes; ++u) acc[u] += static_cast<double>(a[t + u]) * static_cast<double>(b[t + u]);
  }
  for (int u = 0; t < d; ++t, ++u) acc[u] += static_cast<double>(a[t]) * static_cast<double>(b[t]);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int u = 0; u < w; ++u) acc[u] += acc[u + w];
  }
  return acc[0];
}
VIREID_MULTIVERSION(dot_exact)

}  // namespace vireid
