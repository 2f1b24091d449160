#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define VIREID_HAVE_BF16_KERNEL 1
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>
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

// MKL's bf16 GEMM with float32 output, exported by libtorch_cpu when torch is built with MKL (LP64 interface).
// Weak: absent in other builds, where the pointer is null.
extern "C" __attribute__((weak)) void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                                            float alpha, const uint16_t* a, int lda, const uint16_t* b,
                                                            int ldb, float beta, float* c, int ldc);

bool bf16_gemm_supported(Bf16Gemm kind) {
  if (cpu_isa() != Isa::kAvx512) return false;  // also covers VIREID_CPU_ISA=avx2|baseline
#if defined(VIREID_HAVE_BF16_KERNEL)
  if (kind == Bf16Gemm::kAvx512Bf16) return __builtin_cpu_supports("avx512bf16");
#endif
  if (kind == Bf16Gemm::kMklCblas) return cblas_gemm_bf16bf16f32 != nullptr;
  return false;
}

static Bf16Gemm detect_bf16_gemm() {
  // Measured (6,000 x 6,000 x 2,048 and 1,024^2 x 2,048 tiles): on Sapphire Rapids MKL's bf16 GEMM runs on AMX at
  // ~5x sgemm (issue 17). On an AMD EPYC (Zen 4, AVX512-BF16, no AMX) MKL converts to float32 (sgemm speed) and our
  // AVX512-BF16 kernel reaches ~0.6-0.8x ATen's oneDNN bf16 GEMM, whose output is bf16; the kNN at N = 12,000 took
  // 6.2 s with it against 5.0 s with oneDNN's (the tighter bound saved 13 fp32 redo rows, less than the slower
  // GEMM cost). So the float32-output GEMM is the default only with AMX; elsewhere the bf16-output path stays.
  Bf16Gemm best = Bf16Gemm::kNone;
#if defined(VIREID_HAVE_BF16_KERNEL)
  if (bf16_gemm_supported(Bf16Gemm::kMklCblas) && __builtin_cpu_supports("amx-bf16")) best = Bf16Gemm::kMklCblas;
#endif
  if (const char* want = std::getenv("VIREID_BF16_GEMM")) {
    const std::string s(want);
    if (s == "none") best = Bf16Gemm::kNone;
    if (s == "avx512bf16" && bf16_gemm_supported(Bf16Gemm::kAvx512Bf16)) best = Bf16Gemm::kAvx512Bf16;
    if (s == "mkl" && bf16_gemm_supported(Bf16Gemm::kMklCblas)) best = Bf16Gemm::kMklCblas;
  }
  return best;
}

Bf16Gemm bf16_gemm_kind() {
  static const Bf16Gemm kind = detect_bf16_gemm();
  return kind;
}

#if defined(VIREID_HAVE_BF16_KERNEL)
namespace {

constexpr int kPanel = 32;  // columns per packed panel: two zmm of 16 float32 accumulators per row
constexpr int kRowBlock = 14;  // rows per micro-kernel call: 28 accumulators + 2 panel vectors + 1 broadcast
constexpr int64_t kDepth = 128;  // pairs per k block

// One block of MR rows against one packed panel: c[r][0, 32) = sum over the pairs t of a_r(t) . panel(t), the pairs
// of bf16 values (2t, 2t + 1) taken as one 32-bit word; a holds the block's rows interleaved (a[t * MR + r]).
// Sequential over t: a fixed summation order.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_block(const uint32_t* a, int64_t pairs,
                                                                                const uint32_t* panel, float* c,
                                                                                int64_t ldc, __mmask16 m0,
                                                                                __mmask16 m1, bool resume) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 14
  for (int r = 0; r < MR; ++r) {
    acc0[r] = resume ? _mm512_maskz_loadu_ps(m0, c + r * ldc) : _mm512_setzero_ps();
    acc1[r] = resume ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < pairs; ++t) {
    const __m512i b0 = _mm512_load_si512(panel + t * kPanel);
    const __m512i b1 = _mm512_load_si512(panel + t * kPanel + 16);
#pragma GCC unroll 14
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(static_cast<int>(a[t * MR + r]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], (__m512bh)av, (__m512bh)b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], (__m512bh)av, (__m512bh)b1);
    }
  }
#pragma GCC unroll 14
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
  }
}

using BlockFn = void (*)(const uint32_t*, int64_t, const uint32_t*, float*, int64_t, __mmask16, __mmask16, bool);

template <int... I>
constexpr std::array<BlockFn, sizeof...(I)> block_table(std::integer_sequence<int, I...>) {
  return {&bf16_block<I + 1>...};
}

void gemm_bf16_avx512(float* out, int64_t ldo, const uint16_t* a, int64_t rows, const uint16_t* b, int64_t width,
                      int64_t dp) {
  static constexpr auto blocks = block_table(std::make_integer_sequence<int, kRowBlock>());
  const int64_t pairs = dp / 2;
  const uint32_t* a32 = reinterpret_cast<const uint32_t*>(a);
  const uint32_t* b32 = reinterpret_cast<const uint32_t*>(b);
  const int64_t panels = (width + kPanel - 1) / kPanel;
  // The rows interleaved by blocks of kRowBlock (the last block narrower): the micro-kernel's broadcasts then read
  // one contiguous stream instead of kRowBlock rows 2 * dp bytes apart (4 KB at d = 2048: one L1 set).
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  // Scratch kept per thread between calls (grow-only): fresh multi-MB buffers would cost page faults on every tile.
  static thread_local std::vector<uint32_t> a_store;
  if (a_store.size() < static_cast<size_t>(rows * pairs)) a_store.resize(static_cast<size_t>(rows * pairs));
  uint32_t* const a_pack = a_store.data();  // the calling thread's buffer, shared with the workers below
  at::parallel_for(0, row_blocks, 4, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i0 = q * kRowBlock, mr = std::min<int64_t>(kRowBlock, rows - i0);
      uint32_t* dst = a_pack + i0 * pairs;
      for (int64_t r = 0; r < mr; ++r) {
        const uint32_t* src = a32 + (i0 + r) * pairs;
        for (int64_t t = 0; t < pairs; ++t) dst[t * mr + r] = src[t];
      }
    }
  });
  // Panel-outer: a packed panel (32 x dp bf16, 128 KB at d = 2048) stays in L2 while every row block streams by.
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    static thread_local std::vector<uint32_t> panel_store;
    if (panel_store.size() < static_cast<size_t>(pairs * kPanel + 16)) panel_store.resize(pairs * kPanel + 16);
    const uintptr_t raw = reinterpret_cast<uintptr_t>(panel_store.data());
    uint32_t* panel = reinterpret_cast<uint32_t*>((raw + 63) & ~uintptr_t{63});
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * kPanel;
      const int64_t nc = std::min<int64_t>(kPanel, width - j0);
      for (int64_t c = 0; c < kPanel; ++c) {
        if (c < nc) {
          const uint32_t* src = b32 + (j0 + c) * pairs;
          for (int64_t t = 0; t < pairs; ++t) panel[t * kPanel + c] = src[t];
        } else {
          for (int64_t t = 0; t < pairs; ++t) panel[t * kPanel + c] = 0;
        }
      }
      const __mmask16 m0 = nc >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nc) - 1);
      const __mmask16 m1 = nc >= 32 ? __mmask16(0xFFFF) : nc <= 16 ? __mmask16(0) : __mmask16((1u << (nc - 16)) - 1);
      // k blocks of kDepth pairs: the panel's slice (16 KB) stays in L1 while the row blocks pass; partial sums go
      // through the output and resume in the same order, so the sum is the same as in one sweep.
      for (int64_t t0 = 0; t0 < pairs; t0 += kDepth) {
        const int64_t tn = std::min<int64_t>(kDepth, pairs - t0);
        for (int64_t i0 = 0; i0 < rows; i0 += kRowBlock) {
          const int64_t mr = std::min<int64_t>(kRowBlock, rows - i0);
          blocks[mr - 1](a_pack + i0 * pairs + t0 * mr, tn, panel + t0 * kPanel, out + i0 * ldo + j0, ldo,
                         m0, m1, t0 > 0);
        }
      }
    }
  });
}

}  // namespace
#endif

void gemm_bf16_f32_nt(float* out, int64_t ldo, const uint16_t* a, int64_t rows, const uint16_t* b, int64_t width,
                      int64_t dp, Bf16Gemm kind) {
  if (rows == 0 || width == 0) return;
  TORCH_CHECK(bf16_gemm_supported(kind) && dp % 2 == 0, "vireid: this float32-output bf16 GEMM is not available");
  if (kind == Bf16Gemm::kMklCblas) {
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, static_cast<int>(rows), static_cast<int>(width),
                           static_cast<int>(dp), 1.0f, a, static_cast<int>(dp), b, static_cast<int>(dp), 0.0f, out,
                           static_cast<int>(ldo));
    return;
  }
#if defined(VIREID_HAVE_BF16_KERNEL)
  gemm_bf16_avx512(out, ldo, a, rows, b, width, dp);
#endif
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

// The float32-output bf16 GEMMs for tests and benchmarks (called through ctypes): kind 1 = the AVX512-BF16 kernel,
// 2 = MKL's; returns the kind run, 0 (and does nothing) when it is not available here; -1 queries the kNN's choice.
extern "C" __attribute__((visibility("default"), used)) int vireid_gemm_bf16_f32(int kind, float* out, int64_t ldo,
                                                                               const uint16_t* a, int64_t rows,
                                                                               const uint16_t* b, int64_t width,
                                                                               int64_t dp) {
  if (kind == -1) return static_cast<int>(vireid::bf16_gemm_kind());
  const auto k = static_cast<vireid::Bf16Gemm>(kind);
  if ((kind != 1 && kind != 2) || !vireid::bf16_gemm_supported(k) || dp % 2 != 0) return 0;
  vireid::gemm_bf16_f32_nt(out, ldo, a, rows, b, width, dp, k);
  return kind;
}
