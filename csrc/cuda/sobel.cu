// CUDA kernels and launchers of the Sobel operators. The per-voxel math (taps, adjoint
// weights, magnitude, L1 factors) is in csrc/include/sobel.h, shared with
// csrc/cpu/sobel.cpp.
//
// Layout: one thread per voxel of one (batch, channel) volume (grid y). The forward reads
// the 3^ndim neighbourhood through the read-only cache. The fused L1 forward reduces |m1 -
// m0| per block in shared memory (fixed tree) into one float partial per block, then one
// block sums the partials in a fixed order in double: deterministic, no float atomics. The
// backward is a gather, single writer per gradient element: each output voxel visits its
// 3^ndim neighbours p with the adjoint weights of sobel.h (the clamped reads of "replicate"
// folded onto the edges) and recomputes the gradient inputs at p (the upstream components,
// or upstream * g_i(p) / m(p), or the L1 factors of both inputs). No scratch memory.
//
// No host syncs and no allocations: every launcher is safe under CUDA-graph capture.

#include <cstdint>
#include <stdexcept>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {

namespace {

using sobel::Mode;
using sobel::Reduction;
using sobel::SobelArgs;

constexpr int kBlock = 256;
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float load(const T* p) {
  return to_float(p[0]);
}
template <>
__device__ __forceinline__ float load<float>(const float* p) {
  return __ldg(p);
}

struct Index {
  int64_t i[3];
};

__device__ __forceinline__ Index unravel(int64_t n, const SobelArgs& a, int ndim) {
  Index q{{0, 0, 0}};
  for (int k = ndim - 1; k >= 0; --k) {
    q.i[k] = n % a.size[k];
    n /= a.size[k];
  }
  return q;
}

// Forward taps: derivative d(o) = o, smoothing s(o) = 2 - |o| for o in -1, 0, 1.
__device__ __forceinline__ float tap_d(int o) { return float(o); }
__device__ __forceinline__ float tap_s(int o) { return o == 0 ? 2.f : 1.f; }

// Sobel components at voxel p of the volume X (g[2] = 0 in 2D).
template <int NDIM, typename T>
__device__ void components(const T* __restrict__ X, const Index& p, const SobelArgs& a,
                           float g[3]) {
  g[0] = g[1] = g[2] = 0.f;
  const bool rep = a.padding == int(Padding::BORDER);
  MRUS_UNROLL
  for (int o0 = -1; o0 <= 1; ++o0) {
    int64_t c0 = p.i[0] + o0;
    if (c0 < 0 || c0 >= a.size[0]) {
      if (!rep) continue;
      c0 = c0 < 0 ? 0 : a.size[0] - 1;
    }
    MRUS_UNROLL
    for (int o1 = -1; o1 <= 1; ++o1) {
      int64_t c1 = p.i[1] + o1;
      if (c1 < 0 || c1 >= a.size[1]) {
        if (!rep) continue;
        c1 = c1 < 0 ? 0 : a.size[1] - 1;
      }
      if constexpr (NDIM == 2) {
        if (o0 == 0 && o1 == 0) continue;  // weight 0 in every component
        const float v = load(X + c0 * a.size[1] + c1);
        g[0] += tap_d(o0) * tap_s(o1) * v;
        g[1] += tap_s(o0) * tap_d(o1) * v;
      } else {
        MRUS_UNROLL
        for (int o2 = -1; o2 <= 1; ++o2) {
          if (o0 == 0 && o1 == 0 && o2 == 0) continue;
          int64_t c2 = p.i[2] + o2;
          if (c2 < 0 || c2 >= a.size[2]) {
            if (!rep) continue;
            c2 = c2 < 0 ? 0 : a.size[2] - 1;
          }
          const float v = load(X + (c0 * a.size[1] + c1) * a.size[2] + c2);
          g[0] += tap_d(o0) * tap_s(o1) * tap_s(o2) * v;
          g[1] += tap_s(o0) * tap_d(o1) * tap_s(o2) * v;
          g[2] += tap_s(o0) * tap_s(o1) * tap_d(o2) * v;
        }
      }
    }
  }
}

template <int NDIM, typename T>
__global__ void __launch_bounds__(kBlock)
    sobel_forward_kernel(const __grid_constant__ SobelArgs a, const T* __restrict__ x,
                         const T* __restrict__ x0, T* __restrict__ out,
                         float* __restrict__ partials) {
  __shared__ float red[kBlock];
  const int64_t vox = a.voxels();
  const int64_t v = blockIdx.y;
  const int64_t n = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  const Mode mode = static_cast<Mode>(a.mode);
  const float eps = static_cast<float>(a.eps);
  float d = 0.f;
  if (n < vox) {
    const Index p = unravel(n, a, NDIM);
    float g[3];
    components<NDIM>(x + v * vox, p, a, g);
    if (mode == Mode::COMPONENTS) {
      for (int i = 0; i < NDIM; ++i) out[(v * NDIM + i) * vox + n] = from_float<T>(g[i]);
    } else if (mode == Mode::MAGNITUDE) {
      out[v * vox + n] = from_float<T>(sobel::magnitude(g[0], g[1], g[2], eps));
    } else {
      float h[3];
      components<NDIM>(x0 + v * vox, p, a, h);
      d = fabsf(sobel::magnitude(g[0], g[1], g[2], eps) - sobel::magnitude(h[0], h[1], h[2], eps));
      if (a.reduction == int(Reduction::NONE)) out[v * vox + n] = from_float<T>(d);
    }
  }
  if (mode != Mode::L1 || a.reduction == int(Reduction::NONE)) return;
  red[threadIdx.x] = d;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[v * gridDim.x + blockIdx.x] = red[0];
}

// One block: thread t sums partials t, t + kBlock, ... in double, then a fixed tree.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sum_partials_kernel(const float* __restrict__ partials, int64_t n, double scale,
                        T* __restrict__ out) {
  __shared__ double red[kBlock];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) s += partials[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int k = kBlock / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = from_float<T>(static_cast<float>(red[0] * scale));
}

template <int NDIM, typename T>
__global__ void __launch_bounds__(kBlock)
    sobel_backward_kernel(const __grid_constant__ SobelArgs a, const T* __restrict__ grad_out,
                          const T* __restrict__ x, const T* __restrict__ x0,
                          T* __restrict__ grad_x, T* __restrict__ grad_x0) {
  const int64_t vox = a.voxels();
  const int64_t v = blockIdx.y;
  const int64_t n = int64_t(blockIdx.x) * kBlock + threadIdx.x;
  if (n >= vox) return;
  const Mode mode = static_cast<Mode>(a.mode);
  const float eps = static_cast<float>(a.eps);
  const bool scalar_up = mode == Mode::L1 && a.reduction != int(Reduction::NONE);
  const float up_scalar =
      scalar_up ? load(grad_out) * (a.reduction == int(Reduction::MEAN)
                                        ? static_cast<float>(1.0 / double(a.numel()))
                                        : 1.f)
                : 0.f;
  const sobel::Tap3<float> s_adj = sobel::make_tap<float>(false, true, a.padding);
  const sobel::Tap3<float> d_adj = sobel::make_tap<float>(true, true, a.padding);
  const Index q = unravel(n, a, NDIM);
  // Adjoint weights per axis for the neighbours -1, 0, +1 (0 where outside).
  float ws[3][3], wd[3][3];
  for (int k = 0; k < NDIM; ++k) {
    sobel::tap_coefs(s_adj, q.i[k], a.size[k], ws[k][0], ws[k][1], ws[k][2]);
    sobel::tap_coefs(d_adj, q.i[k], a.size[k], wd[k][0], wd[k][1], wd[k][2]);
  }
  const T* X = x + v * vox;
  const T* X0 = x0 ? x0 + v * vox : nullptr;
  float acc1 = 0.f, acc0 = 0.f;
  for (int d0 = -1; d0 <= 1; ++d0) {
    for (int d1 = -1; d1 <= 1; ++d1) {
      for (int d2 = (NDIM == 3 ? -1 : 0); d2 <= (NDIM == 3 ? 1 : 0); ++d2) {
        const int dd[3] = {d0, d1, d2};
        Index p = q;
        bool inside = true;
        for (int k = 0; k < NDIM; ++k) {
          p.i[k] += dd[k];
          inside = inside && p.i[k] >= 0 && p.i[k] < a.size[k];
        }
        if (!inside) continue;
        float w[3];
        for (int i = 0; i < NDIM; ++i) {
          float wi = 1.f;
          for (int k = 0; k < NDIM; ++k) wi *= (k == i ? wd[k][dd[k] + 1] : ws[k][dd[k] + 1]);
          w[i] = wi;
        }
        if (NDIM == 2) w[2] = 0.f;
        int64_t poff = p.i[0];
        for (int k = 1; k < NDIM; ++k) poff = poff * a.size[k] + p.i[k];
        if (mode == Mode::COMPONENTS) {
          for (int i = 0; i < NDIM; ++i) acc1 += w[i] * load(grad_out + (v * NDIM + i) * vox + poff);
          continue;
        }
        float g[3];
        components<NDIM>(X, p, a, g);
        const float m1 = sobel::magnitude(g[0], g[1], g[2], eps);
        const float dot1 = w[0] * g[0] + w[1] * g[1] + w[2] * g[2];
        if (mode == Mode::MAGNITUDE) {
          acc1 += dot1 * (load(grad_out + v * vox + poff) / m1);
          continue;
        }
        float h[3];
        components<NDIM>(X0, p, a, h);
        const float m0 = sobel::magnitude(h[0], h[1], h[2], eps);
        const float up = scalar_up ? up_scalar : load(grad_out + v * vox + poff);
        float r1, r0;
        sobel::l1_factors(m1, m0, up, r1, r0);
        acc1 += dot1 * r1;
        acc0 += (w[0] * h[0] + w[1] * h[1] + w[2] * h[2]) * r0;
      }
    }
  }
  if (grad_x) grad_x[v * vox + n] = from_float<T>(acc1);
  if (grad_x0) grad_x0[v * vox + n] = from_float<T>(acc0);
}

dim3 grid_for(const SobelArgs& a) {
  const int64_t blocks = ceil_div(a.voxels(), kBlock);
  if (a.volumes() > kMaxGridY) {
    throw std::invalid_argument("mrus cuda sobel: B * C must be at most 65535");
  }
  if (blocks > kMaxGridX) throw std::invalid_argument("mrus cuda sobel: volume too large");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(a.volumes()));
}

}  // namespace

int64_t sobel_num_partials(const SobelArgs& a) {
  return ceil_div(a.voxels(), kBlock) * a.volumes();
}

void sobel_forward(const SobelArgs& a, uintptr_t x, uintptr_t x0, uintptr_t out,
                   uintptr_t partials, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "sobel_forward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using T = typename decltype(tag)::type;
    if (a.numel() == 0) return;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const dim3 grid = grid_for(a);
    sobel_forward_kernel<NDIM, T><<<grid, kBlock, 0, s>>>(
        a, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(x0), reinterpret_cast<T*>(out),
        reinterpret_cast<float*>(partials));
    check_launch("sobel_forward_kernel");
    if (a.mode == int(Mode::L1) && a.reduction != int(Reduction::NONE)) {
      const double scale = a.reduction == int(Reduction::MEAN) ? 1.0 / double(a.numel()) : 1.0;
      sum_partials_kernel<T><<<1, kBlock, 0, s>>>(reinterpret_cast<const float*>(partials),
                                                  sobel_num_partials(a), scale,
                                                  reinterpret_cast<T*>(out));
      check_launch("sum_partials_kernel");
    }
  });
}

void sobel_backward(const SobelArgs& a, uintptr_t grad_out, uintptr_t x, uintptr_t x0,
                    uintptr_t grad_x, uintptr_t grad_x0, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "sobel_backward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using T = typename decltype(tag)::type;
    if (a.numel() == 0 || (grad_x == 0 && grad_x0 == 0)) return;
    sobel_backward_kernel<NDIM, T>
        <<<grid_for(a), kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            a, reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(x),
            reinterpret_cast<const T*>(x0), reinterpret_cast<T*>(grad_x),
            reinterpret_cast<T*>(grad_x0));
    check_launch("sobel_backward_kernel");
  });
}

}  // namespace cuda
}  // namespace mrus
