#include "common.h"

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

// Read (without loading the library) by vireid_fast._extension to refuse a build made for another torch.
extern "C" __attribute__((visibility("default"), used)) const char vireid_build_marker[] =
    "VIREID_TORCH_VERSION=" VIREID_TORCH_VERSION ";";
