// Host-side helpers shared by the CPU kernels (csrc/cpu/*.cpp): the float32/float64 and
// ndim dispatch, and the OpenMP thread count taken from the Python layer.
#pragma once

#include <atomic>
#include <stdexcept>
#include <type_traits>

#include "common.h"

namespace mrus {
namespace cpu {

// Calls f(float{}) or f(double{}) for the DType code dtype; any other code throws
// std::invalid_argument(dtype_error).
template <typename F>
void dispatch_real(int dtype, const char* dtype_error, F&& f) {
  if (dtype == int(DType::F32)) {
    f(float{});
  } else if (dtype == int(DType::F64)) {
    f(double{});
  } else {
    throw std::invalid_argument(dtype_error);
  }
}

// Calls f(std::integral_constant<int, NDIM>{}, scalar_t{}) for ndim in {2, 3} and a
// float32/float64 dtype code.
template <typename F>
void dispatch_ndim_real(int ndim, int dtype, const char* ndim_error, const char* dtype_error,
                        F&& f) {
  if (ndim != 2 && ndim != 3) throw std::invalid_argument(ndim_error);
  dispatch_real(dtype, dtype_error, [&](auto t) {
    ndim == 3 ? f(std::integral_constant<int, 3>{}, t) : f(std::integral_constant<int, 2>{}, t);
  });
}

// Whether the CPU kernels may take their vector (AVX2) paths where the CPU has them. On by
// default; _C.set_cpu_simd(False) turns them off so that tests also run the portable loops.
// Atomic: it may be set while another thread (GIL released) runs a kernel.
inline std::atomic<bool>& simd_switch() {
  static std::atomic<bool> on{true};
  return on;
}
inline bool simd_enabled() { return simd_switch().load(std::memory_order_relaxed); }

// OpenMP thread count: the Python layer passes 0 (or less) for "not set".
inline int clamp_threads(int num_threads) { return num_threads > 0 ? num_threads : 1; }

}  // namespace cpu
}  // namespace mrus
