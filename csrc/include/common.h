// Shared definitions for the CPU (C++) and CUDA kernels of mrus_kernels._C.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MRUS_HD __host__ __device__ __forceinline__
#else
#define MRUS_HD inline
#endif

// Loop unrolling hint: nvcc unrolls; g++ unrolls the small fixed-trip loops at -O3 anyway.
// __CUDA_ARCH__ (nvcc's device pass only): nvcc forwards the pragma to the host compiler in
// its host pass, where it is unknown (-Wunknown-pragmas).
#if defined(__CUDA_ARCH__)
#define MRUS_UNROLL _Pragma("unroll")
#else
#define MRUS_UNROLL
#endif

namespace mrus {

// Codes shared with mrus_kernels/_ext.py (DTYPE_CODES, Interp, Padding).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };
enum class Interp : int { LINEAR = 0, NEAREST = 1 };
enum class Padding : int { ZEROS = 0, BORDER = 1 };

template <typename T>
MRUS_HD bool is_nan(T x) {
  return x != x;
}

// Round half to even (nearbyint under the default rounding mode, as grid_sample's
// "nearest"), written out so that CPU, CUDA and Triton round identically.
// x - floor(x) is exact for the bounded coordinates we pass in.
template <typename T>
MRUS_HD T round_half_even(T x) {
  T r = floor(x);
  const T d = x - r;
  if (d > T(0.5)) {
    r += T(1);
  } else if (d == T(0.5)) {
    const T h = r * T(0.5);
    if (h != floor(h)) r += T(1);
  }
  return r;
}

// Coordinates x[0..N-1] of flat index n (0 <= n < total) in the row-major grid size[0..N-1]
// (last axis fastest), total = the product of the sizes. On a GPU a 64-bit division is a
// long software sequence: grids below 2**32 elements (all real ones) take 32-bit divisions.
template <int N>
MRUS_HD void unravel(int64_t n, const int64_t* size, int64_t total, int64_t* x) {
  if (total <= int64_t(0xffffffffu)) {
    uint32_t m = static_cast<uint32_t>(n);
MRUS_UNROLL
    for (int i = N - 1; i > 0; --i) {
      const uint32_t s = static_cast<uint32_t>(size[i]);
      const uint32_t q = m / s;
      x[i] = static_cast<int64_t>(m - q * s);
      m = q;
    }
    x[0] = static_cast<int64_t>(m);  // < size[0] since n < total
    return;
  }
MRUS_UNROLL
  for (int i = N - 1; i > 0; --i) {
    const int64_t q = n / size[i];
    x[i] = n - q * size[i];
    n = q;
  }
  x[0] = n;
}

}  // namespace mrus
