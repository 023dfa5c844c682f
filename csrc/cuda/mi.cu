// CUDA kernels and launchers of the Parzen-window mutual information operator. The per-value
// window math is in csrc/include/mi.h (shared with csrc/cpu/mi.cpp).
//
// Forward: each block owns a contiguous range of one item's voxels and a private KP x KP
// histogram (KP: K rounded up to a power of two, <= 64). Per tile of TV voxels the block
// writes the voxels' Parzen weights into shared memory as dense rows (zeros outside each
// voxel's window), then every thread accumulates its own 4 x 4 register tile of the
// histogram over the tile's voxels, in voxel order. When the histogram has fewer 4 x 4 tiles
// than the block has threads, GROUPS threads share a tile, each over every GROUPS-th voxel,
// and their sums are added in group order at the end. Each block writes its histogram once
// to `partial`; the caller sums the partials over blocks in a fixed order. There are no
// atomics anywhere: the result is bitwise repeatable.
//
// Backward: one thread per voxel, G = dL/dhist in shared memory, the voxel's windows and
// their derivatives in registers (at most kMaxWindowGpu bins each).
//
// No host syncs and no allocations: every launcher is safe under CUDA-graph capture.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kSharedFloats = 8192;  // two weight tiles of TV x KP floats: 32 KiB
// Writes one value's weights, times `scale` (the voxel's mask weight), into a shared-memory
// row that is already zero. A NaN value (or range) puts NaN in the row.
__device__ __forceinline__ void write_window(const mi::MIArgs& a, float x, float lo, float hi,
                                             float scale, float* row) {
  if (scale == 0.f) return;
  float w[mi::kMaxWindowGpu];
  int k0;
  const int n = mi::window<float>(a, x, lo, hi, k0, w, nullptr, mi::kMaxWindowGpu);
  if (n == 0) {
    row[0] = NAN;
    return;
  }
  for (int i = 0; i < n; ++i) row[k0 + i] = scale * w[i];
}

template <int KP>
__global__ void __launch_bounds__(kThreads)
    mi_forward_kernel(const mi::MIArgs a, const float* __restrict__ f,
                      const float* __restrict__ g, const float* __restrict__ m,
                      const float* __restrict__ ranges, float* __restrict__ partial,
                      int64_t blocks_per_item) {
  constexpr int T1 = KP / 4;          // 4 x 4 register tiles per histogram side
  constexpr int TILES = T1 * T1;      // <= 256
  constexpr int GROUPS = kThreads / TILES;
  // Rows padded by 4 floats: keeps float4 alignment and spreads a column over 8 banks.
  constexpr int RS = KP + 4;
  constexpr int TV = kSharedFloats / (2 * RS);  // voxels per shared-memory tile, <= 128
  __shared__ __align__(16) float smem[kSharedFloats];
  float* swf = smem;            // [TV][RS], fixed weights times the mask
  float* swg = smem + TV * RS;  // [TV][RS], moving weights

  const int64_t b = blockIdx.y;
  const int64_t p = blockIdx.x;
  const int tid = threadIdx.x;
  const int tile = tid % TILES, group = tid / TILES;
  const int ta = tile / T1, tb = tile % T1;
  const float lo_f = ranges[4 * b], hi_f = ranges[4 * b + 1];
  const float lo_g = ranges[4 * b + 2], hi_g = ranges[4 * b + 3];
  const int64_t v_begin = a.N * p / blocks_per_item, v_end = a.N * (p + 1) / blocks_per_item;
  const float* fb = f + b * a.N;
  const float* gb = g + b * a.N;
  const float* mb = m ? m + b * a.N : nullptr;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int64_t t0 = v_begin; t0 < v_end; t0 += TV) {
    const int nv = static_cast<int>(v_end - t0 < TV ? v_end - t0 : TV);
    __syncthreads();  // the previous tile's rows are no longer read
    for (int e = tid; e < 2 * TV * RS; e += kThreads) smem[e] = 0.f;
    __syncthreads();
    // Threads [0, TV) write fixed windows, [TV, 2 TV) moving windows (2 TV <= kThreads).
    for (int e = tid; e < 2 * nv; e += kThreads) {
      const int v = e % nv;
      const int64_t idx = t0 + v;
      const float mv = mb ? mb[idx] : 1.f;
      if (e < nv) {
        write_window(a, fb[idx], lo_f, hi_f, mv, swf + v * RS);
      } else {
        write_window(a, gb[idx], lo_g, hi_g, mv != 0.f ? 1.f : 0.f, swg + v * RS);
      }
    }
    __syncthreads();
    for (int v = group; v < nv; v += GROUPS) {
      const float4 x = reinterpret_cast<const float4*>(swf + v * RS)[ta];
      const float4 y = reinterpret_cast<const float4*>(swg + v * RS)[tb];
      const float xs[4] = {x.x, x.y, x.z, x.w};
      const float ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xs[i], ys[j], acc[i][j]);
    }
  }

  float* out = partial + (b * blocks_per_item + p) * a.K * a.K;
  if (GROUPS == 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 4 * ta + i, c = 4 * tb + j;
        if (r < a.K && c < a.K) out[r * a.K + c] = acc[i][j];
      }
    return;
  }
  // Sum the groups' tiles in group order (GROUPS * KP * KP = 16 * kThreads floats).
  __syncthreads();
  float* red = smem;  // [GROUPS][KP][KP]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) red[(group * KP + 4 * ta + i) * KP + 4 * tb + j] = acc[i][j];
  __syncthreads();
  for (int e = tid; e < KP * KP; e += kThreads) {
    const int r = e / KP, c = e % KP;
    if (r >= a.K || c >= a.K) continue;
    float s = 0.f;
    for (int q = 0; q < GROUPS; ++q) s += red[q * KP * KP + e];
    out[r * a.K + c] = s;
  }
}

__global__ void __launch_bounds__(kThreads)
    mi_backward_kernel(const mi::MIArgs a, const float* __restrict__ f,
                       const float* __restrict__ g, const float* __restrict__ m,
                       const float* __restrict__ ranges, const float* __restrict__ grad_hist,
                       float* __restrict__ grad_f, float* __restrict__ grad_g) {
  extern __shared__ float G[];  // [K][K] of this item
  const int64_t b = blockIdx.y;
  const int64_t kk = int64_t(a.K) * a.K;
  for (int64_t e = threadIdx.x; e < kk; e += blockDim.x) G[e] = grad_hist[b * kk + e];
  __syncthreads();
  const float lo_f = ranges[4 * b], hi_f = ranges[4 * b + 1];
  const float lo_g = ranges[4 * b + 2], hi_g = ranges[4 * b + 3];
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  float wf[mi::kMaxWindowGpu], dwf[mi::kMaxWindowGpu], wg[mi::kMaxWindowGpu],
      dwg[mi::kMaxWindowGpu];
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < a.N; v += stride) {
    const int64_t idx = b * a.N + v;
    const float mv = m ? m[idx] : 1.f;
    if (mv == 0.f) {
      if (grad_f) grad_f[idx] = 0.f;
      if (grad_g) grad_g[idx] = 0.f;
      continue;
    }
    int kf, kg;
    const int nf = mi::window<float>(a, f[idx], lo_f, hi_f, kf, wf, grad_f ? dwf : nullptr,
                                     mi::kMaxWindowGpu);
    const int ng = mi::window<float>(a, g[idx], lo_g, hi_g, kg, wg, grad_g ? dwg : nullptr,
                                     mi::kMaxWindowGpu);
    if (nf == 0 || ng == 0) {
      if (grad_f) grad_f[idx] = NAN;
      if (grad_g) grad_g[idx] = NAN;
      continue;
    }
    float df = 0.f, dg = 0.f;
    for (int i = 0; i < nf; ++i) {
      const float* row = G + (kf + i) * a.K + kg;
      float r = 0.f, s = 0.f;
      for (int j = 0; j < ng; ++j) {
        r = fmaf(row[j], wg[j], r);
        if (grad_g) s = fmaf(row[j], dwg[j], s);
      }
      if (grad_f) df = fmaf(dwf[i], r, df);
      dg = fmaf(wf[i], s, dg);
    }
    if (grad_f) grad_f[idx] = mv * df;
    if (grad_g) grad_g[idx] = mv * dg;
  }
}

void require_f32(const mi::MIArgs& a, const char* what) {
  if (a.dtype != int(DType::F32)) {
    throw std::invalid_argument(std::string("mi (cuda kernels): ") + what +
                                " takes float32 tensors (the Python layer converts)");
  }
  if (a.K > 64) throw std::invalid_argument("mi (cuda kernels): bins must be <= 64");
}

}  // namespace

void mi_forward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                uintptr_t ranges, uintptr_t partial, int64_t blocks_per_item, uintptr_t stream) {
  require_f32(a, "mi_forward");
  if (a.B == 0 || a.N == 0) return;
  if (a.B > kMaxGridY || blocks_per_item > kMaxGridX) {
    throw std::invalid_argument("mi (cuda kernels): batch or block count too large");
  }
  const dim3 grid(static_cast<unsigned>(blocks_per_item), static_cast<unsigned>(a.B));
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const auto* f = reinterpret_cast<const float*>(fixed);
  const auto* g = reinterpret_cast<const float*>(moving);
  const auto* m = reinterpret_cast<const float*>(mask);
  const auto* r = reinterpret_cast<const float*>(ranges);
  auto* out = reinterpret_cast<float*>(partial);
  const int kp = a.K <= 4 ? 4 : a.K <= 8 ? 8 : a.K <= 16 ? 16 : a.K <= 32 ? 32 : 64;
  switch (kp) {
    case 4: mi_forward_kernel<4><<<grid, kThreads, 0, s>>>(a, f, g, m, r, out, blocks_per_item); break;
    case 8: mi_forward_kernel<8><<<grid, kThreads, 0, s>>>(a, f, g, m, r, out, blocks_per_item); break;
    case 16: mi_forward_kernel<16><<<grid, kThreads, 0, s>>>(a, f, g, m, r, out, blocks_per_item); break;
    case 32: mi_forward_kernel<32><<<grid, kThreads, 0, s>>>(a, f, g, m, r, out, blocks_per_item); break;
    default: mi_forward_kernel<64><<<grid, kThreads, 0, s>>>(a, f, g, m, r, out, blocks_per_item); break;
  }
  check_launch("mi_forward_kernel");
}

void mi_backward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                 uintptr_t ranges, uintptr_t grad_hist, uintptr_t grad_fixed,
                 uintptr_t grad_moving, uintptr_t stream) {
  require_f32(a, "mi_backward");
  if (a.B == 0 || a.N == 0 || (grad_fixed == 0 && grad_moving == 0)) return;
  if (a.B > kMaxGridY) throw std::invalid_argument("mi (cuda kernels): batch too large");
  const int64_t blocks = std::min<int64_t>(ceil_div(a.N, kThreads), 8192);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.B));
  const size_t shared = sizeof(float) * size_t(a.K) * a.K;
  mi_backward_kernel<<<grid, kThreads, shared, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, reinterpret_cast<const float*>(fixed), reinterpret_cast<const float*>(moving),
      reinterpret_cast<const float*>(mask), reinterpret_cast<const float*>(ranges),
      reinterpret_cast<const float*>(grad_hist), reinterpret_cast<float*>(grad_fixed),
      reinterpret_cast<float*>(grad_moving));
  check_launch("mi_backward_kernel");
}

}  // namespace cuda
}  // namespace mrus
