// CUDA kernels and launchers of the jacobian_det operator. The per-voxel math is in
// csrc/include/jacobian.h (shared with csrc/cpu/jacobian.cpp).
//
// No host syncs and no allocations: every launcher is safe under CUDA-graph capture.

#include <cstdint>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {

namespace {

constexpr int kJacobianBlock = 256;
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
  dispatch_ndim_dtype(a.ndim, a.dtype, "jacobian_forward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t total = a.B * a.n();
    if (total == 0) return;
    jacobian_forward_kernel<NDIM, scalar_t>
        <<<blocks_for(total, kJacobianBlock), kJacobianBlock, 0,
           reinterpret_cast<cudaStream_t>(stream)>>>(
            a, reinterpret_cast<const scalar_t*>(u), reinterpret_cast<scalar_t*>(det));
    check_launch("jacobian_forward_kernel");
  });
}

void jacobian_backward(const jacobian::JacobianArgs& a, uintptr_t grad_det, uintptr_t u,
                       uintptr_t grad_u, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "jacobian_backward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t total = a.B * a.n();
    if (total == 0) return;
    jacobian_backward_kernel<NDIM, scalar_t>
        <<<blocks_for(total, kJacobianBlock), kJacobianBlock, 0,
           reinterpret_cast<cudaStream_t>(stream)>>>(
            a, reinterpret_cast<const scalar_t*>(grad_det), reinterpret_cast<const scalar_t*>(u),
            reinterpret_cast<scalar_t*>(grad_u));
    check_launch("jacobian_backward_kernel");
  });
}

}  // namespace cuda
}  // namespace mrus
