// CUDA kernels and launchers of the warp operator. The per-voxel math is in
// csrc/include/warp.h (shared with csrc/cpu/warp.cpp); this file holds only kernels, the
// image-gradient scatter functors, dtype/ndim dispatch and launchers.
//
// No host syncs and no allocations: every launcher is safe under CUDA-graph capture.

#include <algorithm>
#include <cstdint>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {

namespace {

constexpr int kBlockSize = 256;

// ---------------------------------------------------------------------------------------
// Image-gradient scatter functors. prepare() runs once per thread before any scatter and
// returns false when the image gradient must not be scattered.

// Float atomics: fast, order-dependent rounding.
struct AtomicScatter {
  float* __restrict__ grad_image;

  __device__ __forceinline__ bool prepare() { return true; }
  __device__ __forceinline__ void operator()(int64_t idx, float v) const {
    atomicAdd(grad_image + idx, v);
  }
};

// The fixed-point denominator d: quantum q = d * 2**-32, with d = gmax, or 2**32 (q = 1)
// when gmax is 0.
__host__ __device__ __forceinline__ float fixed_denominator(float gmax) {
  return gmax > 0.f ? gmax : 0x1p32f;
}

// 64-bit fixed point: integer sums do not depend on the order of the atomics. v / q is
// computed as (v / d) * 2**32, the same float as v / q whenever q is a normal float, with
// |v / d| <= 1 so that nothing overflows or goes subnormal for any finite gmax > 0.
struct FixedPointScatter {
  unsigned long long* __restrict__ scratch;
  const float* __restrict__ gmax;
  float denom;

  // A NaN or infinite gmax makes the whole image gradient NaN (fixed_to_float_kernel):
  // nothing to accumulate.
  __device__ __forceinline__ bool prepare() {
    const float g = *gmax;
    denom = fixed_denominator(g);
    return isfinite(g);
  }
  __device__ __forceinline__ void operator()(int64_t idx, float v) const {
    const long long fixed = llrintf((v / denom) * 0x1p32f);
    // Two's complement: adding the unsigned image of a negative value subtracts it.
    atomicAdd(scratch + idx, static_cast<unsigned long long>(fixed));
  }
};

// ---------------------------------------------------------------------------------------
// Kernels. WarpArgs is __grid_constant__: the header indexes its size arrays with a runtime
// ndim, which would otherwise copy the whole struct to local memory in every thread.

// One thread per output voxel n of batch item b (grid y), all channels in the thread.
template <int NDIM, typename scalar_t>
__global__ void __launch_bounds__(kBlockSize)
    warp_forward_kernel(const __grid_constant__ warp::WarpArgs a,
                        const scalar_t* __restrict__ image, const scalar_t* __restrict__ ddf,
                        scalar_t* __restrict__ out) {
  const int64_t n_out = a.n_out();
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < n_out; n += stride) {
      int64_t x[NDIM];
      warp::voxel_coords<NDIM>(a, n, x);
      warp::forward_voxel<NDIM, scalar_t, float>(a, image, ddf, out, b, n, x);
    }
  }
}

// One thread per output voxel n; backward_voxel loops over the batch itself, so that each
// grad_ddf element has a single writer even when ddf is broadcast.
template <int NDIM, typename scalar_t, typename Scatter>
__global__ void __launch_bounds__(kBlockSize)
    warp_backward_kernel(const __grid_constant__ warp::WarpArgs a,
                         const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ image,
                         const scalar_t* __restrict__ ddf, bool has_image,
                         scalar_t* __restrict__ grad_ddf, Scatter scatter) {
  const bool need_image = has_image && scatter.prepare();
  if (!need_image && grad_ddf == nullptr) return;
  const int64_t n_out = a.n_out();
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < n_out; n += stride) {
    int64_t x[NDIM];
    warp::voxel_coords<NDIM>(a, n, x);
    warp::backward_voxel<NDIM, scalar_t, float, Scatter>(a, grad_out, image, ddf, need_image,
                                                         grad_ddf, scatter, n, x);
  }
}

// grad_image = scratch * q, or NaN everywhere when gmax is NaN or infinite.
__global__ void __launch_bounds__(kBlockSize)
    fixed_to_float_kernel(const long long* __restrict__ scratch, const float* __restrict__ gmax,
                          float* __restrict__ grad_image, int64_t n) {
  const float g = *gmax;
  const bool finite = isfinite(g);
  const double q = double(fixed_denominator(g)) * 0x1p-32;  // exact in double
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    grad_image[i] = finite ? static_cast<float>(static_cast<double>(scratch[i]) * q) : NAN;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers.

bool built() { return true; }

void warp_forward(const warp::WarpArgs& a, uintptr_t image, uintptr_t ddf, uintptr_t out,
                  uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "warp_forward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t n_out = a.n_out();
    if (n_out == 0 || a.B == 0 || a.C == 0) return;
    const dim3 grid(blocks_for(n_out, kBlockSize), static_cast<unsigned>(std::min(a.B, kMaxGridY)));
    warp_forward_kernel<NDIM, scalar_t>
        <<<grid, kBlockSize, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            a, reinterpret_cast<const scalar_t*>(image), reinterpret_cast<const scalar_t*>(ddf),
            reinterpret_cast<scalar_t*>(out));
    check_launch("warp_forward_kernel");
  });
}

void warp_backward(const warp::WarpArgs& a, uintptr_t grad_out, uintptr_t image, uintptr_t ddf,
                   uintptr_t grad_image, uintptr_t grad_ddf, bool deterministic,
                   uintptr_t fixed_scratch, uintptr_t gmax, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "warp_backward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t n_out = a.n_out();
    if (n_out == 0 || a.B == 0 || (grad_image == 0 && grad_ddf == 0)) return;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const unsigned grid = blocks_for(n_out, kBlockSize);
    const auto* go = reinterpret_cast<const scalar_t*>(grad_out);
    const auto* img = reinterpret_cast<const scalar_t*>(image);
    const auto* u = reinterpret_cast<const scalar_t*>(ddf);
    auto* gd = reinterpret_cast<scalar_t*>(grad_ddf);
    const bool has_image = grad_image != 0;

    if (deterministic && has_image) {
      const FixedPointScatter scatter{reinterpret_cast<unsigned long long*>(fixed_scratch),
                                      reinterpret_cast<const float*>(gmax), 1.f};
      warp_backward_kernel<NDIM, scalar_t, FixedPointScatter>
          <<<grid, kBlockSize, 0, s>>>(a, go, img, u, true, gd, scatter);
      check_launch("warp_backward_kernel (deterministic)");
      const int64_t n_img = a.Bi * a.C * a.n_in();
      if (n_img == 0) return;
      fixed_to_float_kernel<<<blocks_for(n_img, kBlockSize), kBlockSize, 0, s>>>(
          reinterpret_cast<const long long*>(fixed_scratch), reinterpret_cast<const float*>(gmax),
          reinterpret_cast<float*>(grad_image), n_img);
      check_launch("fixed_to_float_kernel");
    } else {
      const AtomicScatter scatter{reinterpret_cast<float*>(grad_image)};
      warp_backward_kernel<NDIM, scalar_t, AtomicScatter>
          <<<grid, kBlockSize, 0, s>>>(a, go, img, u, has_image, gd, scatter);
      check_launch("warp_backward_kernel");
    }
  });
}

}  // namespace cuda
}  // namespace mrus
