// CUDA kernels and launchers of the Parzen-window mutual information operator. The per-value
// window math is in csrc/include/mi.h (shared with csrc/cpu/mi.cpp).
//
// Forward: a sparse product of the non-zero window entries. A voxel's Parzen weights are
// non-zero in a window of WN bins per image (4 for the cubic B-spline, about 7 for the
// Gaussian at sigma = 0.5 bin widths, at most kMaxWindowGpu = 16), so its contribution
// m W_f W_g^T to the K x K histogram is a WN x WN block: 49 products instead of the
// 1,024 (K = 32) or 4,096 (K = 64) of the dense outer product, and exact float32 products
// (the tensor-core alternative, P += W_f^T W_g on TF32, needs three TF32 products per
// entry to hold float32 accuracy, works on zero-filled dense tiles, and still scales with
// K^2). The cost per voxel does not grow with K.
//   Determinism without atomics: each warp owns a private K x K histogram in shared memory
// and walks its voxels in a fixed order, one voxel at a time: the lanes stage 32 voxels'
// windows (one voxel per lane) in shared memory, then for each staged voxel in turn the
// lanes split its WN x WN block (lane l takes entries l, l + 32, ... in row-major order of
// the block) and add into the histogram; a voxel's entries are distinct bins, and
// __syncwarp() orders one voxel's updates before the next voxel's. The histogram row stride
// is congruent to WN modulo 32, so the 32 entries a warp adds at once fall in 32 different
// banks. At the end the block adds its warps' histograms in warp order and writes its
// partial once; the caller sums the partials over blocks in a fixed order. Bitwise
// repeatable.
//
// Backward: one thread per voxel, G = dL/dhist of the item in shared memory, the voxel's
// windows and their derivatives in the thread's own row of shared memory (mi.h writes
// windows through a pointer; registers cannot be indexed at run time and local memory would
// be the stack), dL/df = m sum_i dW_f[i] sum_j G[kf + i][kg + j] W_g[j] (and symmetrically).
//
// Non-finite input: a voxel with mask != 0 whose value (or the item's range) gives no
// finite bin coordinate, or whose mask is NaN, makes the whole histogram of its item NaN
// (every block that meets one writes NaN into every entry of its partial) and its own
// gradient NaN: the rule of every backend (mrus_kernels/mi.py).
//
// The batch shares grid axis x with the blocks of an item (2**31 - 1 blocks there; axis y
// would cap the batch at 65535). No host syncs and no allocations: every launcher is safe
// under CUDA-graph capture.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;
// Every launch stays within the default dynamic shared memory of a block (no opt-in
// attribute): occupancy is bounded by shared memory per warp either way.
constexpr int kSharedFloats = 48 * 1024 / 4;

// The widest window of the launch: mi::window never returns more bins than this (`cap`).
int window_width(const mi::MIArgs& a) {
  int wn = a.kernel == mi::Kernel::BSPLINE ? 4 : static_cast<int>(std::floor(2 * a.radius)) + 2;
  return std::min({wn, a.K, mi::kMaxWindowGpu});
}

// Shared-memory layout of the forward, per warp: a histogram of K rows of `rs` floats, then
// 32 staged voxels of `stage` floats each: (kf << 8 | nf, kg << 8 | ng, W_f[wn], W_g[wn]).
struct FwdLayout {
  int wn;
  int rs;     // >= K, rs = wn (mod 32): one block row of a voxel spans 32 distinct banks
  int stage;  // odd: the 32 lanes' staged rows start in 32 distinct banks
  int warps;
  int64_t floats;  // per block
};

FwdLayout fwd_layout(const mi::MIArgs& a) {
  FwdLayout l;
  l.wn = window_width(a);
  l.rs = a.K + (((l.wn - a.K) % kWarp) + kWarp) % kWarp;
  l.stage = 2 * l.wn + 3;
  const int per_warp = a.K * l.rs + kWarp * l.stage;  // at most 64 * 80 + 32 * 35
  l.warps = std::max(1, std::min(kMaxWarps, kSharedFloats / per_warp));
  l.floats = int64_t(l.warps) * per_warp;
  return l;
}

__global__ void __launch_bounds__(kMaxWarps * kWarp)
    mi_forward_kernel(const mi::MIArgs a, const float* __restrict__ f,
                      const float* __restrict__ g, const float* __restrict__ m,
                      const float* __restrict__ ranges, float* __restrict__ partial,
                      int64_t blocks_per_item, FwdLayout l) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int K = a.K;
  float* hist = smem + warp * K * l.rs;
  float* stage = smem + l.warps * K * l.rs + warp * kWarp * l.stage;
  const int64_t b = blockIdx.x / blocks_per_item, p = blockIdx.x % blocks_per_item;
  const float lo_f = ranges[4 * b], hi_f = ranges[4 * b + 1];
  const float lo_g = ranges[4 * b + 2], hi_g = ranges[4 * b + 3];
  const int64_t v_begin = a.N * p / blocks_per_item, v_end = a.N * (p + 1) / blocks_per_item;
  const float* fb = f + b * a.N;
  const float* gb = g + b * a.N;
  const float* mb = m ? m + b * a.N : nullptr;

  for (int e = lane; e < K * l.rs; e += kWarp) hist[e] = 0.f;
  // This lane's entries (i, j) of a voxel's wn x wn block, e = lane + 32 it = i wn + j, are
  // stepped from (i0, j0) by (di, dj) per iteration (no table: it would cost 16 registers).
  const int i0 = lane / l.wn, j0 = lane % l.wn;
  const int di = kWarp / l.wn, dj = kWarp % l.wn;
  const int iters = (l.wn * l.wn + kWarp - 1) / kWarp;
  bool bad = false;

  // Groups of 32 voxels in order, group q to warp q % warps.
  const int64_t groups = (v_end - v_begin + kWarp - 1) / kWarp;
  for (int64_t q = warp; q < groups; q += l.warps) {
    const int64_t idx = v_begin + q * kWarp + lane;
    float* mine = stage + lane * l.stage;
    int hf = 0, hg = 0;  // n = 0: the voxel adds nothing
    if (idx < v_end) {
      const float mv = mb ? mb[idx] : 1.f;
      if (mv != 0.f) {  // masked out: its values, even NaN, do not count; a NaN mask does
        int kf, kg;
        const int nf = mi::window<float>(a, fb[idx], lo_f, hi_f, kf, mine + 2, nullptr, l.wn);
        const int ng =
            mi::window<float>(a, gb[idx], lo_g, hi_g, kg, mine + 2 + l.wn, nullptr, l.wn);
        if (nf == 0 || ng == 0 || mv != mv) {
          bad = true;
        } else {
          for (int i = 0; i < nf; ++i) mine[2 + i] *= mv;
          hf = (kf << 8) | nf;
          hg = (kg << 8) | ng;
        }
      }
    }
    mine[0] = __int_as_float(hf);
    mine[1] = __int_as_float(hg);
    __syncwarp();
    for (int v = 0; v < kWarp; ++v) {
      const float* sv = stage + v * l.stage;
      const int sf = __float_as_int(sv[0]), sg = __float_as_int(sv[1]);
      const int nf = sf & 0xff, ng = sg & 0xff;
      if (nf == 0) continue;  // the same for every lane
      const float* wf = sv + 2;
      const float* wg = sv + 2 + l.wn;
      float* corner = hist + (sf >> 8) * l.rs + (sg >> 8);
      int i = i0, j = j0;  // i >= wn (never < nf) past the block's last entry
      for (int it = 0; it < iters; ++it) {
        if (i < nf && j < ng) {
          float* h = corner + i * l.rs + j;
          *h = fmaf(wf[i], wg[j], *h);
        }
        i += di;
        j += dj;
        if (j >= l.wn) {
          j -= l.wn;
          ++i;
        }
      }
      __syncwarp();  // this voxel's additions land before the next voxel's, in every lane
    }
    __syncwarp();  // every lane has read the staged rows before they are written again
  }

  const bool block_bad = __syncthreads_or(bad);  // also: every warp's histogram is complete
  float* out = partial + int64_t(blockIdx.x) * K * K;
  for (int e = threadIdx.x; e < K * K; e += blockDim.x) {
    const int r = e / K, c = e % K;
    float s = 0.f;
    for (int w = 0; w < l.warps; ++w) s += smem[(w * K + r) * l.rs + c];
    out[e] = block_bad ? NAN : s;
  }
}

// Shared-memory layout of the backward: G [K][K], then per thread a row of `row` floats:
// W_f, dW_f, W_g, dW_g, wn each.
struct BwdLayout {
  int wn;
  int row;  // odd: the threads of a warp write their rows in distinct banks
  int threads;
  int64_t floats;
};

BwdLayout bwd_layout(const mi::MIArgs& a) {
  BwdLayout l;
  l.wn = window_width(a);
  l.row = 4 * l.wn + 1;
  const int fit = (kSharedFloats - a.K * a.K) / l.row;  // >= 126 (K = 64, wn = 16)
  l.threads = std::max(kWarp, std::min(128, fit / kWarp * kWarp));
  l.floats = int64_t(a.K) * a.K + int64_t(l.threads) * l.row;
  return l;
}

__global__ void __launch_bounds__(128)
    mi_backward_kernel(const mi::MIArgs a, const float* __restrict__ f,
                       const float* __restrict__ g, const float* __restrict__ m,
                       const float* __restrict__ ranges, const float* __restrict__ grad_hist,
                       float* __restrict__ grad_f, float* __restrict__ grad_g,
                       int64_t blocks_per_item, BwdLayout l) {
  extern __shared__ float smem[];
  const int K = a.K;
  float* G = smem;  // [K][K] of this item
  float* wf = smem + K * K + threadIdx.x * l.row;
  float* dwf = wf + l.wn;
  float* wg = dwf + l.wn;
  float* dwg = wg + l.wn;
  const int64_t b = blockIdx.x / blocks_per_item, p = blockIdx.x % blocks_per_item;
  const int64_t kk = int64_t(K) * K;
  for (int64_t e = threadIdx.x; e < kk; e += blockDim.x) G[e] = grad_hist[b * kk + e];
  __syncthreads();
  const float lo_f = ranges[4 * b], hi_f = ranges[4 * b + 1];
  const float lo_g = ranges[4 * b + 2], hi_g = ranges[4 * b + 3];
  const int64_t stride = int64_t(blockDim.x) * blocks_per_item;
  for (int64_t v = p * blockDim.x + threadIdx.x; v < a.N; v += stride) {
    const int64_t idx = b * a.N + v;
    const float mv = m ? m[idx] : 1.f;
    if (mv == 0.f) {
      if (grad_f) grad_f[idx] = 0.f;
      if (grad_g) grad_g[idx] = 0.f;
      continue;
    }
    int kf, kg;
    const int nf = mi::window<float>(a, f[idx], lo_f, hi_f, kf, wf, grad_f ? dwf : nullptr, l.wn);
    const int ng = mi::window<float>(a, g[idx], lo_g, hi_g, kg, wg, grad_g ? dwg : nullptr, l.wn);
    if (nf == 0 || ng == 0) {
      if (grad_f) grad_f[idx] = NAN;
      if (grad_g) grad_g[idx] = NAN;
      continue;
    }
    float df = 0.f, dg = 0.f;
    for (int i = 0; i < nf; ++i) {
      const float* row = G + (kf + i) * K + kg;
      float r = 0.f, s = 0.f;
      for (int j = 0; j < ng; ++j) {
        if (grad_f) r = fmaf(row[j], wg[j], r);
        if (grad_g) s = fmaf(row[j], dwg[j], s);
      }
      if (grad_f) df = fmaf(dwf[i], r, df);
      if (grad_g) dg = fmaf(wf[i], s, dg);
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
  if (a.K > 64) {
    throw std::invalid_argument("mi (cuda kernels): bins must be <= 64, got " +
                                std::to_string(a.K));
  }
}

void check_blocks(int64_t batch, int64_t blocks_per_item) {
  if (blocks_per_item < 1 || batch > kMaxGridX / blocks_per_item) {
    throw std::invalid_argument(
        "mi (cuda kernels): batch * blocks per item must be in [1, 2**31 - 1], got " +
        std::to_string(batch) + " * " + std::to_string(blocks_per_item));
  }
}

}  // namespace

void mi_forward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                uintptr_t ranges, uintptr_t partial, int64_t blocks_per_item, uintptr_t stream) {
  require_f32(a, "mi_forward");
  if (a.B == 0 || a.N == 0) return;
  check_blocks(a.B, blocks_per_item);
  const FwdLayout l = fwd_layout(a);
  mi_forward_kernel<<<static_cast<unsigned>(a.B * blocks_per_item), l.warps * kWarp,
                      sizeof(float) * l.floats, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, reinterpret_cast<const float*>(fixed), reinterpret_cast<const float*>(moving),
      reinterpret_cast<const float*>(mask), reinterpret_cast<const float*>(ranges),
      reinterpret_cast<float*>(partial), blocks_per_item, l);
  check_launch("mi_forward_kernel");
}

void mi_backward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                 uintptr_t ranges, uintptr_t grad_hist, uintptr_t grad_fixed,
                 uintptr_t grad_moving, uintptr_t stream) {
  require_f32(a, "mi_backward");
  if (a.B == 0 || a.N == 0 || (grad_fixed == 0 && grad_moving == 0)) return;
  const BwdLayout l = bwd_layout(a);
  // About 16k blocks in all (grid-stride loops cover larger items), at least one per item.
  const int64_t per_item =
      std::min<int64_t>(ceil_div(a.N, l.threads), std::max<int64_t>(1, 16384 / a.B));
  check_blocks(a.B, per_item);
  mi_backward_kernel<<<static_cast<unsigned>(a.B * per_item), l.threads,
                       sizeof(float) * l.floats, reinterpret_cast<cudaStream_t>(stream)>>>(
      a, reinterpret_cast<const float*>(fixed), reinterpret_cast<const float*>(moving),
      reinterpret_cast<const float*>(mask), reinterpret_cast<const float*>(ranges),
      reinterpret_cast<const float*>(grad_hist), reinterpret_cast<float*>(grad_fixed),
      reinterpret_cast<float*>(grad_moving), per_item, l);
  check_launch("mi_backward_kernel");
}

}  // namespace cuda
}  // namespace mrus
