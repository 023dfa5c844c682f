// CUDA kernels and launchers of the Sobel operators. The per-voxel math (taps, adjoint
// weights, magnitude, L1 factors) is in csrc/include/sobel.h, shared with
// csrc/cpu/sobel.cpp; the per-voxel bodies of the kernels below are host-device functions
// (forward_voxel, backward_prep_voxel, adjoint_voxel), so a host program can run them too.
//
// Layout: one thread per voxel of one (batch, channel) volume. Grid axis x holds the
// voxel blocks of every volume, volume-major (block b: volume b / bpv, voxel block b % bpv,
// bpv blocks per volume), so B * C is not bound by grid axis y's 65535; only where B * C *
// bpv exceeds grid x's 2**31 - 1 blocks do further rows of whole volumes go on grid y
// (block_item; 32-bit divisions only, no loop). The forward reads
// the 3^ndim neighbourhood through the read-only cache. The fused L1 forward reduces |m1 -
// m0| per block in shared memory (fixed tree) into one float partial per block; a second
// kernel adds fixed chunks of kSumChunk partials per block in double, and one block adds
// those chunk sums in a fixed order: deterministic, no float atomics.
//
// The backward is two passes. The first (modes MAGNITUDE and L1) computes the Sobel of the
// input(s) once per voxel and writes the gradient inputs h_i = r g_i (r = upstream / m, or
// the L1 factors of sobel.h) to a float32 scratch [B, C, ndim, *S] per gradient asked for;
// the COMPONENTS mode has them already (the upstream gradient). The second is the adjoint
// filter, a gather with a single writer per gradient element: grad(q) = sum_i sum_p
// w_i(q, p) h_i(p) over the 3^ndim neighbours p, with the adjoint taps of sobel.h (the
// clamped reads of "replicate" folded onto the edges). Terms of weight 0 (the derivative's
// centre, neighbours outside) are not read, as on the CPU, so a NaN reaches exactly the
// gradients that depend on it. 2 x 26 reads per voxel in the first pass (3D, L1), at most
// 3 x 27 in the second (18 per component inside the volume), against 27 recomputed Sobels
// of both inputs (about 1,400 reads) when the gather recomputed them.
//
// No host syncs and no allocations (the scratch and the partials come from the caller):
// every launcher is safe under CUDA-graph capture.

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
// Partials added by one block of the second reduction stage (16 per thread).
constexpr int64_t kSumChunk = int64_t(kBlock) * 16;

// The (volume, voxel block) of block (bx, by) of a grid whose rows (grid x, a multiple of
// bpv blocks) hold grid_x / bpv whole volumes each: volume v = by grid_x / bpv + bx / bpv,
// voxel block nb = bx % bpv. Every division is a 32-bit one (grid x < 2**31); v >= V marks
// a block past the last volume (the last row may be partial).
struct BlockItem {
  int64_t v;
  uint32_t nb, bpv;
};

MRUS_HD BlockItem block_item(int64_t vox, uint32_t grid_x, uint32_t bx, uint32_t by) {
  const uint32_t bpv = static_cast<uint32_t>((vox + kBlock - 1) / kBlock);
  const uint32_t in_row = bx / bpv;
  BlockItem b;
  b.bpv = bpv;
  b.nb = bx - in_row * bpv;
  b.v = int64_t(by) * (grid_x / bpv) + in_row;
  return b;
}

MRUS_HD float to_float(__half v) { return __half2float(v); }
MRUS_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
MRUS_HD T from_float(float v);
template <>
MRUS_HD float from_float<float>(float v) { return v; }
template <>
MRUS_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MRUS_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
MRUS_HD float load(const T* p) {
  return to_float(p[0]);
}
template <>
MRUS_HD float load<float>(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return p[0];
#endif
}

// Spatial indices q of flat voxel n of a volume of vox voxels (row-major over a.size; q[2]
// = 0 in 2D). As warp.h's voxel_coords: a 64-bit division is a long software sequence on a
// GPU, so volumes below 2**32 voxels (every real one) take 32-bit divisions (one per axis
// but the first).
template <int NDIM>
MRUS_HD void voxel_coords(const SobelArgs& a, int64_t vox, int64_t n, int64_t q[3]) {
  q[2] = 0;
  if (vox <= int64_t(0xffffffffu)) {
    uint32_t m = static_cast<uint32_t>(n);
    MRUS_UNROLL
    for (int k = NDIM - 1; k > 0; --k) {
      const uint32_t s = static_cast<uint32_t>(a.size[k]);
      q[k] = static_cast<int64_t>(m % s);
      m /= s;
    }
    q[0] = static_cast<int64_t>(m);
    return;
  }
  // 2**32 voxels or more: each quotient in double (n < 2**53 is exact; the rounded quotient
  // is off by at most one, which the remainder corrects). A 64-bit integer division is a
  // subroutine call whose saved registers spill (sm_80) even when this path is not taken.
  MRUS_UNROLL
  for (int k = NDIM - 1; k > 0; --k) {
    const int64_t s = a.size[k];
    int64_t d = static_cast<int64_t>(static_cast<double>(n) / static_cast<double>(s));
    int64_t r = n - d * s;
    if (r < 0) {
      --d;
      r += s;
    } else if (r >= s) {
      ++d;
      r -= s;
    }
    q[k] = r;
    n = d;
  }
  q[0] = n;
}

// The smoothing [1, 2, 1] of three values.
MRUS_HD float smooth3(float a, float b, float c) { return a + 2.f * b + c; }

// Sobel components at voxel p of the volume X (g[2] = 0 in 2D).
//
// Differences first: every derivative pair x(+1) - x(-1) is formed from the two inputs
// before a smoothing weight multiplies it (as the CPU's separable passes and the Triton
// kernels do), so a constant image gives exactly 0 at any magnitude and the rounding error
// scales with the differences, not with the inputs (a running sum of the 26 weighted
// inputs rounds at the inputs' scale: |g| ~ 1e9 on a constant image at 1e15).
template <int NDIM, typename T>
MRUS_HD void components(const T* __restrict__ X, const int64_t p[3], const SobelArgs& a,
                        float g[3]) {
  const bool rep = a.padding == int(Padding::BORDER);
  // The index of offset o - 1 along axis k, clamped; false where "zeros" reads 0 there.
  // Branches around the reads they skip rather than predicated reads: with predicated
  // reads the compiler hoisted the whole neighbourhood (3D forward 64-72 registers against
  // 47-52, and the first backward pass spilled around sqrt's slow-path call).
  auto index = [&](int k, int o, int64_t& c) {
    c = p[k] + o - 1;
    if (c < 0 || c >= a.size[k]) {
      if (!rep) return false;
      c = c < 0 ? 0 : a.size[k] - 1;
    }
    return true;
  };
  // The inputs at offsets (o0 - 1, [o1 - 1,] -1 .. +1) along the last axis into r (0 where
  // not read; the voxel's own input is never read: weight 0 in every component).
  auto row = [&](int o0, int o1, float r[3]) {
    r[0] = r[1] = r[2] = 0.f;
    int64_t c0, c1 = 0;
    if (!index(0, o0, c0)) return;
    if (NDIM == 3 && !index(1, o1, c1)) return;
    const int k = NDIM - 1;
    const T* base = NDIM == 3 ? X + (c0 * a.size[1] + c1) * a.size[2] : X + c0 * a.size[1];
    const bool centre = o0 == 1 && (NDIM == 2 || o1 == 1);
    MRUS_UNROLL
    for (int o = 0; o < 3; ++o) {
      int64_t c;
      if ((centre && o == 1) || !index(k, o, c)) continue;
      r[o] = load(base + c);
    }
  };
  if constexpr (NDIM == 2) {
    float lo[3], mid[3], hi[3];  // rows -1, 0, +1 along axis 0
    row(0, 0, lo);
    row(2, 0, hi);
    g[0] = smooth3(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]);
    row(1, 0, mid);
    g[1] = smooth3(lo[2] - lo[0], mid[2] - mid[0], hi[2] - hi[0]);
    g[2] = 0.f;
  } else {
    // Rows along axis 2, r[o2] at offsets (o0 - 1, o1 - 1, o2 - 1), taken in pairs so that
    // each difference is formed as soon as both of its rows are read and at most four
    // rows are live. The [1, 2, 1]-smoothed differences of two rows (hi - lo), and a row's own difference.
    auto pair = [](const float hi[3], const float lo[3]) {
      return smooth3(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]);
    };
    auto diff = [](const float r[3]) { return r[2] - r[0]; };
    float lo0[3], lo2[3], hi0[3], hi2[3];
    // The corner rows (planes -1 and +1, rows -1 and +1): weight 1 in every component.
    row(0, 0, lo0);
    row(0, 2, lo2);
    row(2, 0, hi0);
    row(2, 2, hi2);
    g[0] = pair(hi0, lo0) + pair(hi2, lo2);
    g[1] = pair(lo2, lo0) + pair(hi2, hi0);
    g[2] = (diff(lo0) + diff(lo2)) + (diff(hi0) + diff(hi2));
    // The middle rows of planes -1 and +1: weight 2 in g0 and g2.
    row(0, 1, lo0);
    row(2, 1, hi0);
    g[0] += 2.f * pair(hi0, lo0);
    g[2] += 2.f * (diff(lo0) + diff(hi0));
    // Rows -1 and +1 of the voxel's own plane: weight 2 in g1 and g2.
    row(1, 0, lo0);
    row(1, 2, lo2);
    g[1] += 2.f * pair(lo2, lo0);
    g[2] += 2.f * (diff(lo0) + diff(lo2));
    // The voxel's own row (its middle input unread): weight 4 in g2.
    row(1, 1, lo0);
    g[2] += 4.f * diff(lo0);
  }
}

// The forward at voxel n (indices q) of volume v: writes out (COMPONENTS, MAGNITUDE, L1
// without reduction) and returns |m1 - m0| for L1 (0 otherwise).
template <int NDIM, typename T>
MRUS_HD float forward_voxel(const SobelArgs& a, int64_t vox, int64_t v, int64_t n,
                            const int64_t q[3], const T* __restrict__ x,
                            const T* __restrict__ x0, T* __restrict__ out) {
  const Mode mode = static_cast<Mode>(a.mode);
  const float eps = static_cast<float>(a.eps);
  float g[3];
  components<NDIM>(x + v * vox, q, a, g);
  if (mode == Mode::COMPONENTS) {
    MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) out[(v * NDIM + i) * vox + n] = from_float<T>(g[i]);
    return 0.f;
  }
  if (mode == Mode::MAGNITUDE) {
    out[v * vox + n] = from_float<T>(sobel::magnitude(g[0], g[1], g[2], eps));
    return 0.f;
  }
  float h[3];
  components<NDIM>(x0 + v * vox, q, a, h);
  // Squared sums first, both square roots last: nothing but the two sums and the output
  // address is live across sqrt's slow-path subroutine (it saved a register to the stack).
  const float s1 = g[0] * g[0] + g[1] * g[1] + g[2] * g[2] + eps;
  const float s0 = h[0] * h[0] + h[1] * h[1] + h[2] * h[2] + eps;
  T* const o = a.reduction == int(Reduction::NONE) ? out + (v * vox + n) : nullptr;
  const float d = fabsf(sqrtf(s1) - sqrtf(s0));
  if (o != nullptr) *o = from_float<T>(d);
  return d;
}

// The upstream gradient of the reduced L1 loss (one element), times 1/N for the mean.
template <typename T>
MRUS_HD float l1_scalar_upstream(const SobelArgs& a, const T* grad_out) {
  if (a.mode != int(Mode::L1) || a.reduction == int(Reduction::NONE)) return 0.f;
  const float up = load(grad_out);
  return a.reduction == int(Reduction::MEAN) ? up * static_cast<float>(1.0 / double(a.numel()))
                                             : up;
}

// First backward pass at voxel n (indices q) of volume v, modes MAGNITUDE and L1: the
// gradient inputs h_i = r g_i of x into h1 and (L1) of x0 into h0, each [V, NDIM, vox]
// float32 or nullptr when that gradient is not needed. up_scalar: l1_scalar_upstream.
template <int NDIM, typename T>
MRUS_HD void backward_prep_voxel(const SobelArgs& a, int64_t vox, int64_t v, int64_t n,
                                 const int64_t q[3], const T* __restrict__ grad_out,
                                 const T* __restrict__ x, const T* __restrict__ x0,
                                 float up_scalar, float* __restrict__ h1,
                                 float* __restrict__ h0) {
  const float eps = static_cast<float>(a.eps);
  const int64_t base = v * NDIM * vox + n;
  float g[3];
  components<NDIM>(x + v * vox, q, a, g);
  const float m1 = sobel::magnitude(g[0], g[1], g[2], eps);
  if (a.mode == int(Mode::MAGNITUDE)) {
    const float r1 = load(grad_out + v * vox + n) / m1;
    MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) h1[base + i * vox] = g[i] * r1;
    return;
  }
  float f[3];
  components<NDIM>(x0 + v * vox, q, a, f);
  const float m0 = sobel::magnitude(f[0], f[1], f[2], eps);
  const float up = a.reduction == int(Reduction::NONE) ? load(grad_out + v * vox + n) : up_scalar;
  float r1, r0;
  sobel::l1_factors(m1, m0, up, r1, r0);
  MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) {
    if (h1) h1[base + i * vox] = g[i] * r1;
    if (h0) h0[base + i * vox] = f[i] * r0;
  }
}

// Second backward pass at voxel n (indices q): sum_i S_i^T h_i, h this volume's gradient
// inputs [NDIM, vox] (any float type). Terms of adjoint weight 0 are skipped, not
// multiplied: no 0 * NaN, and no pointer is formed outside the volume. Differences first,
// as in the forward: for each offset along the smoothing axes of component i, the
// derivative taps along axis i are combined (h(-1) - h(+1) inside the volume) before the
// smoothing weights multiply them, so a constant h gives exactly 0 inside.
template <int NDIM, typename H>
MRUS_HD float adjoint_voxel(const SobelArgs& a, int64_t vox, int64_t n, const int64_t q[3],
                            const H* __restrict__ h) {
  const sobel::Tap3<float> s_adj = sobel::make_tap<float>(false, true, a.padding);
  const sobel::Tap3<float> d_adj = sobel::make_tap<float>(true, true, a.padding);
  float ws[3][3], wd[3][3];  // per axis, neighbours -1, 0, +1 (0 outside the axis)
  MRUS_UNROLL
  for (int k = 0; k < NDIM; ++k) {
    sobel::tap_coefs(s_adj, q[k], a.size[k], ws[k][0], ws[k][1], ws[k][2]);
    sobel::tap_coefs(d_adj, q[k], a.size[k], wd[k][0], wd[k][1], wd[k][2]);
  }
  const int64_t step[3] = {NDIM == 3 ? a.size[1] * a.size[2] : a.size[1],
                           NDIM == 3 ? a.size[2] : 1, 1};
  float acc = 0.f;
  MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) {
    const H* hi = h + i * vox + n;
    // The smoothing axes of component i (the second one: 3D only).
    const int ax0 = i == 0 ? 1 : 0, ax1 = i == 2 ? 1 : 2;
    MRUS_UNROLL
    for (int da = 0; da < 3; ++da) {
      const float wa = ws[ax0][da];
      if (wa == 0.f) continue;
      MRUS_UNROLL
      for (int db = 0; db < (NDIM == 3 ? 3 : 1); ++db) {
        float wo = wa;
        const H* p = hi + (da - 1) * step[ax0];
        if constexpr (NDIM == 3) {
          wo *= ws[ax1][db];
          if (wo == 0.f) continue;
          p += (db - 1) * step[ax1];
        }
        float inner = 0.f;
        MRUS_UNROLL
        for (int d = 0; d < 3; ++d) {
          const float w = wd[i][d];
          if (w == 0.f) continue;
          inner += w * load(p + (d - 1) * step[i]);
        }
        acc += wo * inner;
      }
    }
  }
  return acc;
}

template <int NDIM, typename T>
__global__ void __launch_bounds__(kBlock)
    sobel_forward_kernel(const __grid_constant__ SobelArgs a, const T* __restrict__ x,
                         const T* __restrict__ x0, T* __restrict__ out,
                         float* __restrict__ partials) {
  __shared__ float red[kBlock];
  const int64_t vox = a.voxels();
  const BlockItem b = block_item(vox, gridDim.x, blockIdx.x, blockIdx.y);
  if (b.v >= a.volumes()) return;  // the whole block: no __syncthreads is left waiting
  const int64_t n = int64_t(b.nb) * kBlock + threadIdx.x;
  float d = 0.f;
  if (n < vox) {
    int64_t q[3];
    voxel_coords<NDIM>(a, vox, n, q);
    d = forward_voxel<NDIM>(a, vox, b.v, n, q, x, x0, out);
  }
  if (a.mode != int(Mode::L1) || a.reduction == int(Reduction::NONE)) return;
  red[threadIdx.x] = d;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  // Slot v * bpv + nb (= by * grid_x + bx, the rows holding whole volumes): the order of
  // the partials does not depend on the grid's shape.
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = red[0];
}

// The sum of every thread's v over the block, in a fixed tree (same order every run).
__device__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int k = kBlock / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
    __syncthreads();
  }
  return red[0];
}

// Second stage: block b adds partials [b kSumChunk, (b + 1) kSumChunk) in double (thread t
// the elements t, t + kBlock, ... of the chunk) into sums[b].
__global__ void __launch_bounds__(kBlock)
    sum_chunks_kernel(const float* __restrict__ partials, int64_t n, double* __restrict__ sums) {
  __shared__ double red[kBlock];
  const int64_t lo = int64_t(blockIdx.x) * kSumChunk;
  const int64_t hi = lo + kSumChunk < n ? lo + kSumChunk : n;
  double s = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kBlock) s += partials[i];
  const double total = block_sum(s, red);
  if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

// Last stage, one block: out = scale * the sum of the n chunk sums.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    sum_final_kernel(const double* __restrict__ sums, int64_t n, double scale,
                     T* __restrict__ out) {
  __shared__ double red[kBlock];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) s += sums[i];
  const double total = block_sum(s, red);
  if (threadIdx.x == 0) out[0] = from_float<T>(static_cast<float>(total * scale));
}

template <int NDIM, typename T>
__global__ void __launch_bounds__(kBlock)
    sobel_backward_prep_kernel(const __grid_constant__ SobelArgs a,
                               const T* __restrict__ grad_out, const T* __restrict__ x,
                               const T* __restrict__ x0, float* __restrict__ h1,
                               float* __restrict__ h0) {
  const int64_t vox = a.voxels();
  const BlockItem b = block_item(vox, gridDim.x, blockIdx.x, blockIdx.y);
  const int64_t n = int64_t(b.nb) * kBlock + threadIdx.x;
  if (b.v >= a.volumes() || n >= vox) return;
  int64_t q[3];
  voxel_coords<NDIM>(a, vox, n, q);
  backward_prep_voxel<NDIM>(a, vox, b.v, n, q, grad_out, x, x0, l1_scalar_upstream(a, grad_out),
                            h1, h0);
}

// grad [V, *S] = the adjoint filter of h [V, NDIM, *S].
template <int NDIM, typename H, typename T>
__global__ void __launch_bounds__(kBlock)
    sobel_adjoint_kernel(const __grid_constant__ SobelArgs a, const H* __restrict__ h,
                         T* __restrict__ grad) {
  const int64_t vox = a.voxels();
  const BlockItem b = block_item(vox, gridDim.x, blockIdx.x, blockIdx.y);
  const int64_t n = int64_t(b.nb) * kBlock + threadIdx.x;
  if (b.v >= a.volumes() || n >= vox) return;
  const int64_t v = b.v;
  int64_t q[3];
  voxel_coords<NDIM>(a, vox, n, q);
  grad[v * vox + n] = from_float<T>(adjoint_voxel<NDIM>(a, vox, n, q, h + v * NDIM * vox));
}

// Grid x: the voxel blocks of whole volumes, volume-major, as many volumes as 2**31 - 1
// blocks hold (every B * C below that many blocks in all: one row); grid y: further rows of
// as many volumes (block_item).
dim3 grid_for(const SobelArgs& a) {
  const int64_t bpv = ceil_div(a.voxels(), kBlock);
  if (bpv > kMaxGridX) {
    throw std::invalid_argument("mrus cuda sobel: a volume must have at most " +
                                std::to_string(kMaxGridX * kBlock) + " voxels, got " +
                                std::to_string(a.voxels()));
  }
  const int64_t per_row = std::min<int64_t>(a.volumes(), kMaxGridX / bpv);
  const int64_t rows = ceil_div(a.volumes(), per_row);
  if (rows > kMaxGridY) {
    throw std::invalid_argument("mrus cuda sobel: B * C * ceil(voxels / " +
                                std::to_string(kBlock) + ") must be at most " +
                                std::to_string(kMaxGridX * kMaxGridY) + " blocks, got " +
                                std::to_string(a.volumes()) + " volumes of " +
                                std::to_string(bpv) + " blocks");
  }
  return dim3(static_cast<unsigned>(per_row * bpv), static_cast<unsigned>(rows));
}

// Block partials of the forward, then (at an even float offset) the double chunk sums.
int64_t first_partials(const SobelArgs& a) { return ceil_div(a.voxels(), kBlock) * a.volumes(); }
int64_t chunk_sums_offset(const SobelArgs& a) { return (first_partials(a) + 1) / 2 * 2; }
int64_t chunk_sums(const SobelArgs& a) { return ceil_div(first_partials(a), kSumChunk); }

}  // namespace

int64_t sobel_num_partials(const SobelArgs& a) {
  return chunk_sums_offset(a) + 2 * chunk_sums(a);
}

void sobel_forward(const SobelArgs& a, uintptr_t x, uintptr_t x0, uintptr_t out,
                   uintptr_t partials, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "sobel_forward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using T = typename decltype(tag)::type;
    if (a.numel() == 0) return;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const dim3 grid = grid_for(a);
    float* part = reinterpret_cast<float*>(partials);
    sobel_forward_kernel<NDIM, T><<<grid, kBlock, 0, s>>>(
        a, reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(x0), reinterpret_cast<T*>(out),
        part);
    check_launch("sobel_forward_kernel");
    if (a.mode == int(Mode::L1) && a.reduction != int(Reduction::NONE)) {
      if (part == nullptr) {
        throw std::invalid_argument("mrus cuda sobel_forward: the reduced L1 loss needs "
                                    "sobel_num_partials(a) floats of partials");
      }
      double* sums = reinterpret_cast<double*>(part + chunk_sums_offset(a));
      const int64_t nsums = chunk_sums(a);
      sum_chunks_kernel<<<static_cast<unsigned>(nsums), kBlock, 0, s>>>(part, first_partials(a),
                                                                        sums);
      check_launch("sum_chunks_kernel");
      const double scale = a.reduction == int(Reduction::MEAN) ? 1.0 / double(a.numel()) : 1.0;
      sum_final_kernel<T><<<1, kBlock, 0, s>>>(sums, nsums, scale, reinterpret_cast<T*>(out));
      check_launch("sum_final_kernel");
    }
  });
}

void sobel_backward(const SobelArgs& a, uintptr_t grad_out, uintptr_t x, uintptr_t x0,
                    uintptr_t grad_x, uintptr_t grad_x0, uintptr_t scratch, uintptr_t stream) {
  dispatch_ndim_dtype(a.ndim, a.dtype, "sobel_backward", [&](auto nd, auto tag) {
    constexpr int NDIM = decltype(nd)::value;
    using T = typename decltype(tag)::type;
    if (a.numel() == 0 || (grad_x == 0 && grad_x0 == 0)) return;
    const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    const dim3 grid = grid_for(a);
    T* gx = reinterpret_cast<T*>(grad_x);
    T* gx0 = reinterpret_cast<T*>(grad_x0);
    if (a.mode == int(Mode::COMPONENTS)) {
      if (gx == nullptr) return;
      sobel_adjoint_kernel<NDIM, T, T>
          <<<grid, kBlock, 0, s>>>(a, reinterpret_cast<const T*>(grad_out), gx);
      check_launch("sobel_adjoint_kernel");
      return;
    }
    if (scratch == 0) {
      throw std::invalid_argument("mrus cuda sobel_backward: the magnitude and L1 backward need "
                                  "a float32 scratch of B * C * ndim * prod(S) per gradient");
    }
    float* h1 = gx ? reinterpret_cast<float*>(scratch) : nullptr;
    float* h0 = gx0 ? reinterpret_cast<float*>(scratch) + (gx ? a.numel() * NDIM : 0) : nullptr;
    sobel_backward_prep_kernel<NDIM, T><<<grid, kBlock, 0, s>>>(
        a, reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(x),
        reinterpret_cast<const T*>(x0), h1, h0);
    check_launch("sobel_backward_prep_kernel");
    if (gx) {
      sobel_adjoint_kernel<NDIM, float, T><<<grid, kBlock, 0, s>>>(a, h1, gx);
      check_launch("sobel_adjoint_kernel");
    }
    if (gx0) {
      sobel_adjoint_kernel<NDIM, float, T><<<grid, kBlock, 0, s>>>(a, h0, gx0);
      check_launch("sobel_adjoint_kernel");
    }
  });
}

}  // namespace cuda
}  // namespace mrus
