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

// 64-bit fixed point (precision and the choice of the quantum: mrus_kernels/triton/warp.py,
// whose kernels use the same quantum and rounding). Every finite contribution v is rounded once
// to an integer multiple of q = 2**E, E = e + log2m - 62 with 2**(e - 1) <= vmax < 2**e,
// vmax a bound on every finite |v| and 2**log2m >= max(the most contributions one element
// can receive, 2**11), so no sum leaves [-2**62, 2**62] and no rounded contribution exceeds
// 2**51; integer sums do not depend on the order of the atomics. A non-finite v sets a bit of its element's int32 flag instead (1 NaN, 2 +inf,
// 4 -inf), which the conversion turns into what a float sum would give: a NaN or inf
// poisons exactly the elements it reaches.
__device__ __forceinline__ int fixed_exponent(float vmax, int log2m) {
  // e from vmax's exponent bits; vmax below 2**-126 takes e = -126, still a bound.
  const int bits = min(max((__float_as_int(vmax) >> 23) & 0xff, 1), 254);
  return bits - 126 + log2m - 62;
}

// 2.0**k, exact, for -1022 <= k <= 1023.
__device__ __forceinline__ double pow2(int k) {
  return __longlong_as_double(static_cast<long long>(k + 1023) << 52);
}

struct FixedPointScatter {
  unsigned long long* __restrict__ sums;
  int* __restrict__ flags;
  const float* __restrict__ vmax;
  int log2m;
  double inv_q;  // 2**-E, set by prepare()

  __device__ __forceinline__ bool prepare() {
    inv_q = pow2(-fixed_exponent(*vmax, log2m));
    return true;
  }
  __device__ __forceinline__ void operator()(int64_t idx, float v) const {
    if (isfinite(v)) {
      // Exact scaling by a power of two, one rounding (half to even), as the Triton kernel.
      const long long fixed = __double2ll_rn(static_cast<double>(v) * inv_q);
      // Two's complement: adding the unsigned image of a negative value subtracts it.
      atomicAdd(sums + idx, static_cast<unsigned long long>(fixed));
    } else {
      atomicOr(flags + idx, isnan(v) ? 1 : (v > 0.f ? 2 : 4));
    }
  }
};

// A scatter whose indices are relative to one batch item's image gradient.
template <typename Scatter>
struct ItemScatter {
  Scatter s;
  int64_t base;

  __device__ __forceinline__ void operator()(int64_t idx, float v) const { s(base + idx, v); }
};

// The most contributions one element of the image gradient can receive: the 2**ndim corners
// of one sample are distinct voxels, so one per output voxel of each batch item that reads
// the image item, plus one from its own displacement gradient with DDF_GRAD_SCATTER.
// At least 2**11 (kFixedMinLog2m), as the Triton kernels (FIXED_MIN_LOG2M): the same quantum.
constexpr int kFixedMinLog2m = 11;

inline int fixed_log2_terms(const warp::WarpArgs& a) {
  const int64_t m = (a.Bi > 1 ? 1 : a.B) * a.n_out() + ((a.flags & warp::DDF_GRAD_SCATTER) ? 1 : 0);
  int log2m = kFixedMinLog2m;
  while ((int64_t(1) << log2m) < m) ++log2m;
  return log2m;
}

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
// grad_ddf element has a single writer when ddf is broadcast (Bd == 1 < B) and its gradient
// is needed.
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

// Batch item b on grid y: every other case (each item writes its own grad_ddf, or none).
// `one` is the problem of one item (B = Bi = Bd = 1); item b reads grad_out at
// b * go_stride, the image and ddf at b times their strides (0 when broadcast) and writes
// grad_ddf at b * NDIM * n_out and the image gradient at b * img_stride.
template <int NDIM, typename scalar_t, typename Scatter>
__global__ void __launch_bounds__(kBlockSize)
    warp_backward_items_kernel(const __grid_constant__ warp::WarpArgs one, int64_t B,
                               int64_t img_stride, int64_t ddf_stride,
                               const scalar_t* __restrict__ grad_out,
                               const scalar_t* __restrict__ image,
                               const scalar_t* __restrict__ ddf, bool has_image,
                               scalar_t* __restrict__ grad_ddf, Scatter scatter) {
  const bool need_image = has_image && scatter.prepare();
  if (!need_image && grad_ddf == nullptr) return;
  const int64_t n_out = one.n_out();
  const int64_t go_stride = one.C * n_out;
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    ItemScatter<Scatter> item{scatter, b * img_stride};
    scalar_t* gd = grad_ddf != nullptr ? grad_ddf + b * NDIM * n_out : nullptr;
    for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < n_out; n += stride) {
      int64_t x[NDIM];
      warp::voxel_coords<NDIM>(one, n, x);
      warp::backward_voxel<NDIM, scalar_t, float, ItemScatter<Scatter>>(
          one, grad_out + b * go_stride, image + b * img_stride, ddf + b * ddf_stride,
          need_image, gd, item, n, x);
    }
  }
}

// grad_image = sums * q, or NaN / +inf / -inf where the flag says so.
__global__ void __launch_bounds__(kBlockSize)
    fixed_to_float_kernel(const long long* __restrict__ sums, const int* __restrict__ flags,
                          const float* __restrict__ vmax, int log2m,
                          float* __restrict__ grad_image, int64_t n) {
  const double q = pow2(fixed_exponent(*vmax, log2m));
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int f = flags[i];
    float v;
    if (f == 0) {
      v = static_cast<float>(static_cast<double>(sums[i]) * q);
    } else if ((f & 1) || (f & 6) == 6) {
      v = NAN;
    } else {
      v = (f & 2) ? INFINITY : -INFINITY;
    }
    grad_image[i] = v;
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
                   uintptr_t fixed_scratch, uintptr_t vmax_ptr, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "warp_backward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using scalar_t = typename decltype(tag)::type;
    const int64_t n_out = a.n_out();
    if (n_out == 0 || a.B == 0 || (grad_image == 0 && grad_ddf == 0)) return;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const auto* go = reinterpret_cast<const scalar_t*>(grad_out);
    const auto* img = reinterpret_cast<const scalar_t*>(image);
    const auto* u = reinterpret_cast<const scalar_t*>(ddf);
    auto* gd = reinterpret_cast<scalar_t*>(grad_ddf);
    const bool has_image = grad_image != 0;
    const int64_t n_img = a.Bi * a.C * a.n_in();

    // A broadcast ddf whose gradient sums over the batch needs one writer per element:
    // one thread walks the batch. Otherwise each batch item goes on grid y.
    const bool serial = a.Bd == 1 && a.B > 1 && grad_ddf != 0;
    warp::WarpArgs one = a;
    one.B = one.Bi = one.Bd = 1;
    const int64_t img_stride = a.Bi > 1 ? a.C * a.n_in() : 0;
    const int64_t ddf_stride = a.Bd > 1 ? NDIM * n_out : 0;
    const dim3 items_grid(blocks_for(n_out, kBlockSize),
                          static_cast<unsigned>(std::min(a.B, kMaxGridY)));
    auto launch = [&](auto scatter, const char* name) {
      using Scatter = decltype(scatter);
      if (serial) {
        warp_backward_kernel<NDIM, scalar_t, Scatter>
            <<<blocks_for(n_out, kBlockSize), kBlockSize, 0, s>>>(a, go, img, u, has_image, gd,
                                                                   scatter);
      } else {
        warp_backward_items_kernel<NDIM, scalar_t, Scatter><<<items_grid, kBlockSize, 0, s>>>(
            one, a.B, img_stride, ddf_stride, go, img, u, has_image, gd, scatter);
      }
      check_launch(name);
    };

    if (deterministic && has_image) {
      // fixed_scratch: int64 [n_img] sums, then int32 [n_img] flags, zero-filled.
      auto* sums = reinterpret_cast<unsigned long long*>(fixed_scratch);
      auto* flags = reinterpret_cast<int*>(sums + n_img);
      const auto* vmax = reinterpret_cast<const float*>(vmax_ptr);
      const int log2m = fixed_log2_terms(a);
      launch(FixedPointScatter{sums, flags, vmax, log2m, 1.0}, "warp_backward (deterministic)");
      if (n_img == 0) return;
      fixed_to_float_kernel<<<blocks_for(n_img, kBlockSize), kBlockSize, 0, s>>>(
          reinterpret_cast<const long long*>(sums), flags, vmax, log2m,
          reinterpret_cast<float*>(grad_image), n_img);
      check_launch("fixed_to_float_kernel");
    } else {
      launch(AtomicScatter{reinterpret_cast<float*>(grad_image)}, "warp_backward");
    }
  });
}

}  // namespace cuda
}  // namespace mrus
