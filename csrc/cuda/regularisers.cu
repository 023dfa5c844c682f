// CUDA kernels of the regularisers over the shared per-voxel math
// (csrc/include/regularisers.h): thread per voxel, one block of REG_CUDA_BLOCK voxels of one
// item (grid.y = item). The forward tree-reduces each block in shared memory into one
// partial (added in fixed order by the caller: deterministic, no atomics); the backward
// writes each voxel's gradient once. No host syncs, no allocations.
#include <cstdint>
#include <stdexcept>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {
namespace {

using reg::RegArgs;

__device__ __forceinline__ void voxel_index(const RegArgs& a, int64_t idx, int64_t* x) {
  x[2] = idx % a.W;
  x[1] = (idx / a.W) % a.H;
  x[0] = (idx / (a.W * a.H)) % a.D;  // channels are stacked along axis 0
}

__global__ void reg_forward_kernel(RegArgs a, const float* __restrict__ u, float* __restrict__ partials) {
  __shared__ float red[reg::REG_CUDA_BLOCK];
  const int64_t per_item = a.C * a.vol();
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float e = 0.f;
  if (idx < per_item) {
    int64_t x[3];
    voxel_index(a, idx, x);
    e = reg::voxel_energy<float>(a, u + int64_t(blockIdx.y) * per_item + idx, x);
  }
  red[threadIdx.x] = e;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = red[0];
}

__global__ void reg_backward_kernel(RegArgs a, const float* __restrict__ u,
                                    const float* __restrict__ scale, float* __restrict__ grad) {
  const int64_t per_item = a.C * a.vol();
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= per_item) return;
  int64_t x[3];
  voxel_index(a, idx, x);
  const int64_t off = int64_t(blockIdx.y) * per_item + idx;
  grad[off] = scale[blockIdx.y] * reg::voxel_grad<float>(a, u + off, x);
}

dim3 grid_of(const RegArgs& a) {
  if (a.dtype != DType::F32) throw std::invalid_argument("regulariser cuda kernels take float32");
  if (a.B > kMaxGridY) {
    throw std::invalid_argument("regulariser cuda kernels take at most 65535 items");
  }
  const int64_t per_item = a.C * a.vol();
  return dim3(unsigned(ceil_div(per_item, reg::REG_CUDA_BLOCK)), unsigned(a.B));
}

}  // namespace

void regularisers_forward(const RegArgs& a, uintptr_t u, uintptr_t partials, uintptr_t stream) {
  const dim3 grid = grid_of(a);
  reg_forward_kernel<<<grid, reg::REG_CUDA_BLOCK, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, reinterpret_cast<const float*>(u), reinterpret_cast<float*>(partials));
  check_launch("reg_forward_kernel");
}

void regularisers_backward(const RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad,
                           uintptr_t stream) {
  const dim3 grid = grid_of(a);
  reg_backward_kernel<<<grid, reg::REG_CUDA_BLOCK, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, reinterpret_cast<const float*>(u), reinterpret_cast<const float*>(scale),
      reinterpret_cast<float*>(grad));
  check_launch("reg_backward_kernel");
}

}  // namespace cuda
}  // namespace mrus
