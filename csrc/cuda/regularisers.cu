// CUDA kernels of the regularisers over the shared per-voxel math
// (csrc/include/regularisers.h): thread per voxel, one block of REG_CUDA_BLOCK voxels of one
// item; the blocks of all items run on grid axis x (block k: item k / blocks_per_item), so
// the batch meets no 65535 limit. The forward tree-reduces each block in shared memory into
// one partial (added in fixed order by the caller: deterministic, no atomics); the backward
// writes each voxel's gradient once. The harmonic backward runs in two passes over a
// float32 scratch that the caller allocates (the Laplacian, then its adjoint stencil); the
// bending and diffusion backward in one, recomputing each stencil at the interior centres
// that reach the voxel (bending: 37 distinct loads per voxel in 3D, cache hits; a scratch
// would need one volume per term, six for 3D bending). Kernels are compiled per kind.
// No host syncs, no allocations.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {
namespace {

using reg::RegArgs;

// Item, flat voxel index inside the item's [C, D, H, W] block and its (d, h, w)
// coordinates, for thread threadIdx.x of block blockIdx.x; false past the item's end.
// 32-bit divisions below 2**32 voxels per item (common.h unravel).
__device__ __forceinline__ bool thread_voxel(const RegArgs& a, unsigned blocks_per_item,
                                             int64_t per_item, int64_t* b, int64_t* idx,
                                             int64_t* x) {
  const unsigned item = blockIdx.x / blocks_per_item;
  *b = item;
  *idx = int64_t(blockIdx.x - item * blocks_per_item) * blockDim.x + threadIdx.x;
  if (*idx >= per_item) return false;
  const int64_t dims[4] = {a.C, a.D, a.H, a.W};
  int64_t c[4];
  unravel<4>(*idx, dims, per_item, c);  // channels are stacked along axis 0
  x[0] = c[1];
  x[1] = c[2];
  x[2] = c[3];
  return true;
}

template <reg::Kind K>
__global__ void __launch_bounds__(reg::REG_CUDA_BLOCK)
    reg_forward_kernel(RegArgs a, unsigned blocks_per_item, const float* __restrict__ u,
                       float* __restrict__ partials) {
  __shared__ float red[reg::REG_CUDA_BLOCK];
  const int64_t per_item = a.C * a.vol();
  int64_t b, idx, x[3];
  float e = 0.f;
  if (thread_voxel(a, blocks_per_item, per_item, &b, &idx, x)) {
    e = reg::kind_energy<float, K>(a, u + b * per_item + idx, x);
  }
  red[threadIdx.x] = e;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  // partials [B, blocks_per_item] row-major: block k writes element k.
  if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

// grad_l2: one pass, the 7-point stencil of voxel_grad.
__global__ void __launch_bounds__(reg::REG_CUDA_BLOCK)
    reg_grad_l2_backward_kernel(RegArgs a, unsigned blocks_per_item, const float* __restrict__ u,
                                const float* __restrict__ scale, float* __restrict__ grad) {
  const int64_t per_item = a.C * a.vol();
  int64_t b, idx, x[3];
  if (!thread_voxel(a, blocks_per_item, per_item, &b, &idx, x)) return;
  const int64_t off = b * per_item + idx;
  grad[off] = scale[b] * reg::grad_l2_grad<float>(a, u + off, x);
}

// bending / diffusion: one pass, the gather adjoint of stencil_grad.
template <bool BENDING>
__global__ void __launch_bounds__(reg::REG_CUDA_BLOCK)
    reg_stencil_backward_kernel(RegArgs a, unsigned blocks_per_item,
                                const float* __restrict__ u, const float* __restrict__ scale,
                                float* __restrict__ grad) {
  const int64_t per_item = a.C * a.vol();
  int64_t b, idx, x[3];
  if (!thread_voxel(a, blocks_per_item, per_item, &b, &idx, x)) return;
  const int64_t off = b * per_item + idx;
  grad[off] = scale[b] * reg::stencil_grad<float, BENDING>(a, u + off, x);
}

// harmonic, pass 1: lap = ∇²u on interior voxels, 0 elsewhere (every element written).
__global__ void __launch_bounds__(reg::REG_CUDA_BLOCK)
    reg_laplacian_kernel(RegArgs a, unsigned blocks_per_item, const float* __restrict__ u,
                         float* __restrict__ lap) {
  const int64_t per_item = a.C * a.vol();
  int64_t b, idx, x[3];
  if (!thread_voxel(a, blocks_per_item, per_item, &b, &idx, x)) return;
  const int64_t off = b * per_item + idx;
  lap[off] = reg::harmonic_laplacian<float>(a, u + off, x);
}

// harmonic, pass 2: the adjoint stencil over lap (reads lap on interior voxels only).
__global__ void __launch_bounds__(reg::REG_CUDA_BLOCK)
    reg_harmonic_backward_kernel(RegArgs a, unsigned blocks_per_item,
                                 const float* __restrict__ lap, const float* __restrict__ scale,
                                 float* __restrict__ grad) {
  const int64_t per_item = a.C * a.vol();
  int64_t b, idx, x[3];
  if (!thread_voxel(a, blocks_per_item, per_item, &b, &idx, x)) return;
  const int64_t off = b * per_item + idx;
  grad[off] = scale[b] * reg::harmonic_grad_from_laplacian<float>(a, lap + off, x);
}

// Blocks per item; throws where the B items' blocks exceed grid axis x.
unsigned blocks_per_item(const RegArgs& a) {
  if (a.dtype != DType::F32) throw std::invalid_argument("regulariser cuda kernels take float32");
  const int64_t n = ceil_div(a.C * a.vol(), reg::REG_CUDA_BLOCK);
  if (a.B * n > kMaxGridX) {
    throw std::invalid_argument("regularisers (cuda): B * ceil(C*D*H*W / 256) = " +
                                std::to_string(a.B * n) + " blocks, at most " +
                                std::to_string(kMaxGridX) + " fit; split the batch");
  }
  return unsigned(n);
}

}  // namespace

void regularisers_forward(const RegArgs& a, uintptr_t u, uintptr_t partials, uintptr_t stream) {
  const unsigned n = blocks_per_item(a);
  if (a.B * n == 0) return;
  const auto launch = [&](auto kernel) {
    kernel<<<unsigned(a.B * n), reg::REG_CUDA_BLOCK, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        a, n, reinterpret_cast<const float*>(u), reinterpret_cast<float*>(partials));
    check_launch("reg_forward_kernel");
  };
  switch (a.kind) {
    case reg::Kind::HARMONIC: launch(reg_forward_kernel<reg::Kind::HARMONIC>); break;
    case reg::Kind::BENDING: launch(reg_forward_kernel<reg::Kind::BENDING>); break;
    case reg::Kind::DIFFUSION: launch(reg_forward_kernel<reg::Kind::DIFFUSION>); break;
    default: launch(reg_forward_kernel<reg::Kind::GRAD_L2>); break;
  }
}

void regularisers_backward(const RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad,
                           uintptr_t scratch, uintptr_t stream) {
  const unsigned n = blocks_per_item(a);
  if (a.B * n == 0) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned grid = unsigned(a.B * n);
  const auto* up = reinterpret_cast<const float*>(u);
  const auto* sp = reinterpret_cast<const float*>(scale);
  auto* gp = reinterpret_cast<float*>(grad);
  if (a.kind == reg::Kind::HARMONIC) {
    if (scratch == 0) throw std::invalid_argument("regularisers (cuda): harmonic needs a scratch");
    auto* lap = reinterpret_cast<float*>(scratch);
    reg_laplacian_kernel<<<grid, reg::REG_CUDA_BLOCK, 0, s>>>(a, n, up, lap);
    check_launch("reg_laplacian_kernel");
    reg_harmonic_backward_kernel<<<grid, reg::REG_CUDA_BLOCK, 0, s>>>(a, n, lap, sp, gp);
    check_launch("reg_harmonic_backward_kernel");
    return;
  }
  if (a.kind == reg::Kind::BENDING || a.kind == reg::Kind::DIFFUSION) {
    if (a.kind == reg::Kind::BENDING) {
      reg_stencil_backward_kernel<true><<<grid, reg::REG_CUDA_BLOCK, 0, s>>>(a, n, up, sp, gp);
    } else {
      reg_stencil_backward_kernel<false><<<grid, reg::REG_CUDA_BLOCK, 0, s>>>(a, n, up, sp, gp);
    }
    check_launch("reg_stencil_backward_kernel");
    return;
  }
  reg_grad_l2_backward_kernel<<<grid, reg::REG_CUDA_BLOCK, 0, s>>>(a, n, up, sp, gp);
  check_launch("reg_grad_l2_backward_kernel");
}

}  // namespace cuda
}  // namespace mrus
