// Host-side helpers shared by the CUDA launchers (csrc/cuda/*.cu only): launch checks, grid
// sizes and the dtype/ndim dispatch. Kept out of the headers shared with the CPU build.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"

namespace mrus {
namespace cuda {

constexpr int64_t kMaxGridX = 0x7fffffff;  // grid-stride loops cover the rest
constexpr int64_t kMaxGridY = 65535;

// Launches are asynchronous: this reports configuration errors (bad grid, too much shared
// memory) at the launch site instead of at some later, unrelated sync.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mrus cuda: launch of ") + kernel +
                             " failed: " + cudaGetErrorString(err));
  }
}

inline int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }

// Blocks of `block` threads covering n items, capped at the x-grid limit: only for kernels
// with grid-stride loops.
inline unsigned blocks_for(int64_t n, int block) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, block), kMaxGridX));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(std::integral_constant<int, NDIM>, TypeTag<scalar_t>) for ndim in {2, 3} and the
// DType code dtype (float32, float16, bfloat16; float64 is CPU-only).
template <typename F>
void dispatch_ndim_dtype(int ndim, int dtype, const char* op, F&& f) {
  auto by_ndim = [&](auto tag) {
    if (ndim == 2) {
      f(std::integral_constant<int, 2>{}, tag);
    } else if (ndim == 3) {
      f(std::integral_constant<int, 3>{}, tag);
    } else {
      throw std::invalid_argument(std::string("mrus cuda ") + op + ": ndim must be 2 or 3, got " +
                                  std::to_string(ndim));
    }
  };
  switch (static_cast<DType>(dtype)) {
    case DType::F32:
      return by_ndim(TypeTag<float>{});
    case DType::F16:
      return by_ndim(TypeTag<__half>{});
    case DType::BF16:
      return by_ndim(TypeTag<__nv_bfloat16>{});
    case DType::F64:
      throw std::invalid_argument(std::string("mrus cuda ") + op +
                                  ": float64 is not supported by the cuda backend "
                                  "(use backend='torch' or 'cpu')");
  }
  throw std::invalid_argument(std::string("mrus cuda ") + op + ": unknown dtype code " +
                              std::to_string(dtype));
}

}  // namespace cuda
}  // namespace mrus
