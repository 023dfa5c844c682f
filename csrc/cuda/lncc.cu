// CUDA kernels of the LNCC operator over the shared per-voxel math (csrc/include/lncc.h).
//
// Scratch (`work`, from the caller): the box sums S [B, 5, *S] in float64, followed in the
// backward by the coefficient maps K [B, 5, *S] in float32 (the caller sizes it).
//
// Two kernels, both running box sums along a line (add the row entering the window,
// subtract the one leaving: cost independent of the window), accumulated in double:
//   wh_kernel: a block owns kWhCols adjacent columns (w) of one (b, d) plane and a chunk of
//     rows along H; each row's sums along W are computed on the fly from the summands of I,
//     J (or from K) by 2r + 1 shifted contiguous loads (coalesced, cache hits after the
//     first), and summed along H in registers.
//   d_kernel: a block owns LNCC_CUDA_COLS adjacent (h, w) columns of one item and a chunk
//     of the line along D, reading S (coalesced).
// Each ends in an epilogue per voxel: COPY (S), REDUCE (Σ m cc, one partial per block,
// tree-reduced in shared memory in fixed order: deterministic, no atomics), COEFF (K) or
// FINAL (dI, dJ from the box-summed K and I, J).
//   forward:  wh(I, J -> S) | d(S -> partials)
//   backward: wh(I, J -> S) | d(S -> K) | wh(K -> S) | d(S -> dI, dJ); in 2D (D = 1) the
//             two D passes would only apply the epilogue: wh(I, J -> K) | wh(K -> dI, dJ).
//
// Why double: float32 running sums keep about one ulp of the largest window sum they have
// seen, and float32 sums between passes lose ~1e-7 of each sum; the variances
// ΣI² − (ΣI)²/n cancel, so a flat window next to bright tissue (intensity ~1000) kept a
// variance of 10²–10³ against eps = 1e-5 and cc ≈ 0.2 instead of 0. The products of two
// float32 values are exact in double, and the cc math runs in double too. K needs no double:
// it has no cancellation of that kind (a flat window's K is exactly 0).
//
// The backward recomputes the forward's box sums rather than keeping S from the forward:
// keeping it would hold 40 bytes per voxel between forward and backward (275 MB at
// 160×192×224) to save one wh pass. Lines are split into chunks (2r rows of warm-up each)
// when there are too few blocks to fill the GPU (2D images, small batches). No host syncs,
// no allocations; the grid is one axis, checked against its limit.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {
namespace {

using lncc::LnccArgs;
using lncc::NSUM;

constexpr int kWhCols = 128;                     // threads (columns) per wh_kernel block
constexpr int kDCols = lncc::LNCC_CUDA_COLS;     // threads (columns) per d_kernel block
constexpr int64_t kTargetBlocks = 1024;          // blocks wanted before lines get chunked
constexpr int64_t kMinChunk = 16;                // shortest chunk worth its warm-up

enum class Mode : int { COPY = 0, REDUCE = 1, COEFF = 2, FINAL = 3 };

// What the epilogues read and write.
struct Io {
  const float* I;
  const float* J;
  const float* mask;   // or nullptr
  const float* scale;  // [B] (COEFF)
  double* S;           // [B, 5, *S]
  float* K;            // [B, 5, *S]
  float* gI;           // or nullptr
  float* gJ;           // or nullptr
  float* partials;     // REDUCE
};

// Chunking of B * lines lines of length n (radius r) into blocks.
struct Plan {
  int64_t chunk, n_chunk, blocks;
};

Plan plan(int64_t lines, int64_t n, int64_t r) {
  int64_t n_chunk = 1;
  if (lines < kTargetBlocks) {
    const int64_t longest = std::max<int64_t>(1, n / std::max<int64_t>(kMinChunk, 4 * r));
    n_chunk = std::min(longest, ceil_div(kTargetBlocks, lines));
  }
  const int64_t chunk = ceil_div(n, n_chunk);
  n_chunk = ceil_div(n, chunk);
  return {chunk, n_chunk, lines * n_chunk};
}

unsigned grid_x(int64_t blocks) {
  if (blocks > kMaxGridX)
    throw std::invalid_argument("lncc cuda: the images need " + std::to_string(blocks) +
                                " blocks, at most " + std::to_string(kMaxGridX) +
                                " fit on grid axis 0; split the batch");
  return unsigned(blocks);
}

// The five summands of I, J summed over row `Ir`, `Jr` at columns w - r .. w + r.
__device__ __forceinline__ void wsum_ij(const float* __restrict__ Ir, const float* __restrict__ Jr,
                                        int w, int W, int r, double* s) {
  for (int o = -r; o <= r; ++o) {
    const int t = w + o;
    if (t < 0 || t >= W) continue;
    const double i = __ldg(Ir + t), j = __ldg(Jr + t);
    s[0] += i;
    s[1] += j;
    s[2] = fma(i, i, s[2]);  // the product of two floats is exact in double
    s[3] = fma(j, j, s[3]);
    s[4] = fma(i, j, s[4]);
  }
}

// The five channels of K (channel stride vol) summed over row `Kr` at columns w - r .. w + r.
__device__ __forceinline__ void wsum_k(const float* __restrict__ Kr, int64_t vol, int w, int W,
                                       int r, double* s) {
  for (int o = -r; o <= r; ++o) {
    const int t = w + o;
    if (t < 0 || t >= W) continue;
    for (int c = 0; c < NSUM; ++c) s[c] += double(__ldg(Kr + c * vol + t));
  }
}

// Epilogue at voxel `vox` (offset inside item b's volume) with box sums acc over n voxels;
// a: eps, nr and form of the per-window formula.
template <Mode MODE>
__device__ __forceinline__ void emit(const Io& io, const LnccArgs& a, int64_t vol, int64_t b,
                                     int64_t vox, const double* acc, double n, double& part) {
  if (MODE == Mode::COPY) {
    double* o = io.S + b * NSUM * vol + vox;
    for (int c = 0; c < NSUM; ++c) o[c * vol] = acc[c];
  } else if (MODE == Mode::REDUCE) {
    const double cc =
        lncc::cc_value<double>(acc[0], acc[1], acc[2], acc[3], acc[4], n, a.eps, a.nr, a.form);
    part += io.mask ? double(io.mask[b * vol + vox]) * cc : cc;
  } else if (MODE == Mode::COEFF) {
    const double wt = io.mask ? double(io.scale[b]) * double(io.mask[b * vol + vox])
                              : double(io.scale[b]);
    double k[NSUM];
    lncc::cc_coeffs<double>(acc[0], acc[1], acc[2], acc[3], acc[4], n, a.eps, a.nr, a.form, wt,
                            k);
    float* o = io.K + b * NSUM * vol + vox;
    for (int c = 0; c < NSUM; ++c) o[c * vol] = float(k[c]);
  } else {
    const double i = io.I[b * vol + vox], j = io.J[b * vol + vox];
    if (io.gI) io.gI[b * vol + vox] = float(lncc::grad_fixed<double>(acc, i, j));
    if (io.gJ) io.gJ[b * vol + vox] = float(lncc::grad_moving<double>(acc, i, j));
  }
}

// Box sums along W (on the fly) and H (running) of one (b, d) plane's column block and row
// chunk. Block index: ((b * D + d) * n_wblk + wb) * n_chunk + chunk index.
template <Mode MODE, bool FROM_IJ>
__global__ void __launch_bounds__(kWhCols)
    wh_kernel(LnccArgs a, Io io, int64_t n_wblk, int64_t n_chunk, int64_t chunk) {
  int64_t blk = blockIdx.x;
  const int64_t ci = blk % n_chunk;
  blk /= n_chunk;
  const int64_t wb = blk % n_wblk;
  blk /= n_wblk;
  const int64_t d = blk % a.D, b = blk / a.D;
  const int w = int(wb * kWhCols) + int(threadIdx.x);
  if (w >= a.W) return;  // no block-wide sync below
  const int W = int(a.W), H = int(a.H), r = int(a.rH), rw = int(a.rW);
  const int64_t vol = a.vol(), plane = a.H * a.W;
  const float* Ip = io.I + b * vol + d * plane;
  const float* Jp = io.J + b * vol + d * plane;
  const float* Kp = io.K + b * NSUM * vol + d * plane;
  const int k0 = int(ci * chunk), k1 = int(min(ci * chunk + chunk, int64_t(H)));
  const int lo = max(k0 - r, 0);  // rows before the warm-up are never added
  auto row = [&](int h, double* s) {
    for (int c = 0; c < NSUM; ++c) s[c] = 0.0;
    if (h < lo || h >= H) return;
    if (FROM_IJ)
      wsum_ij(Ip + int64_t(h) * W, Jp + int64_t(h) * W, w, W, rw, s);
    else
      wsum_k(Kp + int64_t(h) * W, vol, w, W, rw, s);
  };
  double acc[NSUM] = {0.0, 0.0, 0.0, 0.0, 0.0}, s[NSUM];
  for (int e = k0 - r; e < k0 + r; ++e) {  // warm-up: rows k0 - r .. k0 + r - 1
    row(e, s);
    for (int c = 0; c < NSUM; ++c) acc[c] += s[c];
  }
  const double cdw = double(lncc::axis_count(d, a.rD, a.D) * lncc::axis_count(w, rw, W));
  double part = 0.0;
  for (int h = k0; h < k1; ++h) {
    row(h + r, s);
    for (int c = 0; c < NSUM; ++c) acc[c] += s[c];
    row(h - r - 1, s);
    for (int c = 0; c < NSUM; ++c) acc[c] -= s[c];
    const double n = cdw * double(lncc::axis_count(h, r, H));
    emit<MODE>(io, a, vol, b, d * plane + int64_t(h) * W + w, acc, n, part);
  }
}

// Box sums along D (running) of S over one item's block of (h, w) columns and a chunk of D.
// Block index: (b * n_cblk + column block) * n_chunk + chunk index; REDUCE has one chunk and
// writes partials[b * n_cblk + column block].
template <Mode MODE>
__global__ void __launch_bounds__(kDCols)
    d_kernel(LnccArgs a, Io io, int64_t n_cblk, int64_t n_chunk, int64_t chunk) {
  __shared__ double red[MODE == Mode::REDUCE ? kDCols : 1];
  int64_t blk = blockIdx.x;
  const int64_t ci = blk % n_chunk;
  blk /= n_chunk;
  const int64_t cb = blk % n_cblk, b = blk / n_cblk;
  const int64_t plane = a.H * a.W, vol = a.vol(), D = a.D, r = a.rD;
  const int64_t p = cb * kDCols + threadIdx.x;
  double part = 0.0;
  if (p < plane) {
    const double* Sp = io.S + b * NSUM * vol + p;
    const int64_t k0 = ci * chunk, k1 = min(k0 + chunk, D);
    const int64_t lo = max(k0 - r, int64_t(0));
    const int64_t h = p / a.W, w = p - h * a.W;
    const double chw =
        double(lncc::axis_count(h, a.rH, a.H) * lncc::axis_count(w, a.rW, a.W));
    double acc[NSUM] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t e = lo; e < min(k0 + r, D); ++e)  // warm-up: rows k0 - r .. k0 + r - 1
      for (int c = 0; c < NSUM; ++c) acc[c] += Sp[c * vol + e * plane];
    for (int64_t k = k0; k < k1; ++k) {
      if (k + r < D)
        for (int c = 0; c < NSUM; ++c) acc[c] += Sp[c * vol + (k + r) * plane];
      if (k - r - 1 >= lo)
        for (int c = 0; c < NSUM; ++c) acc[c] -= Sp[c * vol + (k - r - 1) * plane];
      const double n = chw * double(lncc::axis_count(k, r, D));
      emit<MODE>(io, a, vol, b, k * plane + p, acc, n, part);
    }
  }
  if (MODE == Mode::REDUCE) {
    red[threadIdx.x] = part;
    __syncthreads();
    for (int s = kDCols / 2; s > 0; s >>= 1) {
      if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) io.partials[b * n_cblk + cb] = float(red[0]);
  }
}

void check_args(const LnccArgs& a) {
  if (a.dtype != DType::F32) throw std::invalid_argument("lncc cuda kernels take float32");
  if (a.H > INT32_MAX || a.W > INT32_MAX)
    throw std::invalid_argument("lncc cuda: H and W must each be < 2**31");
}

template <Mode MODE, bool FROM_IJ>
void wh(const LnccArgs& a, const Io& io, cudaStream_t s) {
  const int64_t n_wblk = ceil_div(a.W, kWhCols);
  const Plan p = plan(a.B * a.D * n_wblk, a.H, a.rH);
  wh_kernel<MODE, FROM_IJ><<<grid_x(p.blocks), kWhCols, 0, s>>>(a, io, n_wblk, p.n_chunk,
                                                                 p.chunk);
  check_launch("lncc wh_kernel");
}

template <Mode MODE>
void dpass(const LnccArgs& a, const Io& io, cudaStream_t s) {
  const int64_t n_cblk = ceil_div(a.H * a.W, kDCols);
  // REDUCE writes one partial per (item, column block), the layout the caller sums: one
  // chunk per line.
  const Plan p = MODE == Mode::REDUCE ? Plan{a.D, 1, a.B * n_cblk} : plan(a.B * n_cblk, a.D, a.rD);
  d_kernel<MODE><<<grid_x(p.blocks), kDCols, 0, s>>>(a, io, n_cblk, p.n_chunk, p.chunk);
  check_launch("lncc d_kernel");
}

Io make_io(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t work) {
  Io io{};
  io.I = reinterpret_cast<const float*>(fixed);
  io.J = reinterpret_cast<const float*>(moving);
  io.mask = reinterpret_cast<const float*>(mask);
  io.S = reinterpret_cast<double*>(work);
  io.K = reinterpret_cast<float*>(io.S + a.B * NSUM * a.vol());
  return io;
}

}  // namespace

void lncc_forward(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                  uintptr_t work, uintptr_t partials, uintptr_t stream) {
  check_args(a);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  Io io = make_io(a, fixed, moving, mask, work);
  io.partials = reinterpret_cast<float*>(partials);
  wh<Mode::COPY, true>(a, io, s);
  dpass<Mode::REDUCE>(a, io, s);
}

void lncc_backward(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                   uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving,
                   uintptr_t stream) {
  check_args(a);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  Io io = make_io(a, fixed, moving, mask, work);
  io.scale = reinterpret_cast<const float*>(scale);
  io.gI = reinterpret_cast<float*>(grad_fixed);
  io.gJ = reinterpret_cast<float*>(grad_moving);
  if (a.D == 1) {  // 2D: no D pass, the epilogues run in the H pass
    wh<Mode::COEFF, true>(a, io, s);
    wh<Mode::FINAL, false>(a, io, s);
    return;
  }
  wh<Mode::COPY, true>(a, io, s);
  dpass<Mode::COEFF>(a, io, s);
  wh<Mode::COPY, false>(a, io, s);
  dpass<Mode::FINAL>(a, io, s);
}

}  // namespace cuda
}  // namespace mrus
