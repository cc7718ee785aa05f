#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "kernels.h"

namespace qk {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The AVX-512 path uses F, BW, VL (byte shuffles and masks) and VNNI (vpdpbusd).
bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// CPUID.(EAX=7,ECX=0):EDX bits 22 (AMX-BF16), 24 (AMX-TILE) and 25 (AMX-INT8), then Linux's permission for the
// 8 KB of tile state (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), which a process must ask for before its first
// tile op.
bool detect_amx() {
#if defined(__x86_64__) && defined(__linux__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!((edx >> 22) & 1) || !((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Isa initial_isa() {
  const char* env = std::getenv("QUANTKERNELS_ISA");
  if (env == nullptr || *env == '\0') return best_isa();
  Isa isa;
  if (!parse_isa(env, &isa))
    throw std::invalid_argument(std::string("QUANTKERNELS_ISA: got '") + env +
                                "', expected one of portable, avx2, avx512, amx");
  if (!isa_supported(isa))
    throw std::invalid_argument(std::string("QUANTKERNELS_ISA: got '") + env + "', which this CPU does not support");
  return isa;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

bool amx_usable() {
  static const bool usable = detect_amx();
  return usable;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::portable: return "portable";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::amx: return "amx";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::portable, Isa::avx2, Isa::avx512, Isa::amx}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::portable: return true;
    case Isa::avx2: return cpu_has_avx2();
    case Isa::avx512: return cpu_has_avx512();
    case Isa::amx: return cpu_has_avx512() && amx_usable();
  }
  return false;
}

Isa best_isa() {
  if (isa_supported(Isa::amx)) return Isa::amx;
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::portable;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (!isa_supported(isa)) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const LinearKernels& kernels(Isa isa) {
  switch (isa) {
    case Isa::amx: return amx_kernels();
    case Isa::avx512: return avx512_kernels();
    case Isa::avx2: return avx2_kernels();
    case Isa::portable: break;
  }
  return portable_kernels();
}

}  // namespace qk
