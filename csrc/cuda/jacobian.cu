// CUDA kernels and launchers of the jacobian_det operator. The per-voxel math is in
// csrc/include/jacobian.h (shared with csrc/cpu/jacobian.cpp).
//
// No host syncs and no allocations: every launcher is safe under CUDA-graph capture.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launchers.h"

namespace mrus {
namespace cuda {

namespace {

constexpr int kJacobianBlock = 256;
constexpr int64_t kJacobianMaxGrid = 0x7fffffff;  // grid-stride loops cover the rest

template <typename T>
struct JacobianType {
  using type = T;
};

// Calls f(std::integral_constant<int, NDIM>, JacobianType<scalar_t>) for a.ndim and a.dtype.
template <typename F>
void dispatch_jacobian(const jacobian::JacobianArgs& a, const char* op, F&& f) {
  auto by_ndim = [&](auto tag) {
    if (a.ndim == 2) {
      f(std::integral_constant<int, 2>{}, tag);
    } else if (a.ndim == 3) {
      f(std::integral_constant<int, 3>{}, tag);
    } else {
      throw std::invalid_argument(std::string("mrus cuda ") + op + ": ndim must be 2 or 3, got " +
                                  std::to_string(a.ndim));
    }
  };
  switch (static_cast<DType>(a.dtype)) {
    case DType::F32:
      return by_ndim(JacobianType<float>{});
    case DType::F16:
      return by_ndim(JacobianType<__half>{});
    case DType::BF16:
      return by_ndim(JacobianType<__nv_bfloat16>{});
    case DType::F64:
      throw std::invalid_argument(std::string("mrus cuda ") + op +
                                  ": float64 is not supported by the cuda backend "
                                  "(use backend='torch' or 'cpu')");
  }
  throw std::invalid_argument(std::string("mrus cuda ") + op + ": unknown dtype code " +
                              std::to_string(a.dtype));
}

void check_jacobian_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mrus cuda: launch of ") + kernel +
                             " failed: " + cudaGetErrorString(err));
  }
}

unsigned jacobian_blocks(int64_t n) {
  return static_cast<unsigned>(
      std::min<int64_t>((n + kJacobianBlock - 1) / kJacobianBlock, kJacobianMaxGrid));
}

// One thread per voxel of the flattened [B, *size] (grid-stride). JacobianArgs is
// __grid_constant__: the header indexes its arrays with runtime indices, which would
// otherwise copy the struct to local memory in every thread.
template <int NDIM, typename scalar_t>
__global__ void __launch_bounds__(kJacobianBlock)
    jacobian_forward_kernel(const __grid_constant__ jacobian::JacobianArgs a,
                            const scalar_t* __restrict__ u, scalar_t* __restrict__ det) {
  const int64_t nv = a.n(), total = a.B * nv;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += stride) {
    jacobian::forward_voxel<NDIM, scalar_t, float>(a, u, det, k / nv, k % nv);
  }
}

// One thread per element group grad_u[b, :, y]: a gather, a single writer each.
template <int NDIM, typename scalar_t>
__global__ void __launch_bounds__(kJacobianBlock)
    jacobian_backward_kernel(const __grid_constant__ jacobian::JacobianArgs a,
                             const scalar_t* __restrict__ grad_det,
                             const scalar_t* __restrict__ u, scalar_t* __restrict__ grad_u) {
  const int64_t nv = a.n(), total = a.B * nv;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += stride) {
    jacobian::backward_voxel<NDIM, scalar_t, float>(a, grad_det, u, grad_u, k / nv, k % nv);
  }
}

}  // namespace

void jacobian_forward(const jacobian::JacobianArgs& a, uintptr_t u, uintptr_t det,
                      uintptr_t stream) {
  dispatch_jacobian(a, "jacobian_forward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t total = a.B * a.n();
    if (total == 0) return;
    jacobian_forward_kernel<NDIM, scalar_t>
        <<<jacobian_blocks(total), kJacobianBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            a, reinterpret_cast<const scalar_t*>(u), reinterpret_cast<scalar_t*>(det));
    check_jacobian_launch("jacobian_forward_kernel");
  });
}

void jacobian_backward(const jacobian::JacobianArgs& a, uintptr_t grad_det, uintptr_t u,
                       uintptr_t grad_u, uintptr_t stream) {
  dispatch_jacobian(a, "jacobian_backward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t total = a.B * a.n();
    if (total == 0) return;
    jacobian_backward_kernel<NDIM, scalar_t>
        <<<jacobian_blocks(total), kJacobianBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            a, reinterpret_cast<const scalar_t*>(grad_det), reinterpret_cast<const scalar_t*>(u),
            reinterpret_cast<scalar_t*>(grad_u));
    check_jacobian_launch("jacobian_backward_kernel");
  });
}

}  // namespace cuda
}  // namespace mrus
