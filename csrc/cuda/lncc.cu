// CUDA kernels of the LNCC operator over the shared per-voxel math (csrc/include/lncc.h).
//
// One work buffer S [B, 5, *S] (float32) and the gradients; nothing else is allocated.
// Passes (running box sums, cost independent of the window):
//   forward:  W (rows, I J -> S) | H (columns, in place) | D (columns, cc -> block partials)
//   backward: W | H | D (coefficient maps K written over S) | H on K | D on K |
//             W on K fused with the gradients dI, dJ.
// In-place column passes keep the originals of the last r + 1 voxels of each column in a
// shared-memory ring (the voxel leaving the window has been overwritten by then).
// The forward's per-item sum: one partial per block, tree-reduced in shared memory, added
// in fixed order by the caller: deterministic, no atomics. No host syncs, no allocations.
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace mrus {
namespace cuda {
namespace {

using lncc::LnccArgs;
using lncc::NSUM;

constexpr int kRowThreads = 128;
constexpr int kRingBytes = 48 * 1024;

// Row pass along W from (I, J): thread per row (b, d, h).
__global__ void wpass_ij_kernel(LnccArgs a, const float* __restrict__ I,
                                const float* __restrict__ J, float* __restrict__ S) {
  const int64_t rows = a.B * a.D * a.H;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t vol = a.vol(), rpi = a.D * a.H;
  const int64_t b = row / rpi, off = (row % rpi) * a.W;
  const float* Ir = I + b * vol + off;
  const float* Jr = J + b * vol + off;
  float* Sr = S + b * NSUM * vol + off;
  const int64_t W = a.W, r = a.rW;
  float acc[NSUM] = {0.f, 0.f, 0.f, 0.f, 0.f}, s[NSUM];
  for (int64_t w = 0; w <= min(r, W - 1); ++w) {
    lncc::summands(Ir[w], Jr[w], s);
    for (int c = 0; c < NSUM; ++c) acc[c] += s[c];
  }
  for (int64_t w = 0; w < W; ++w) {
    if (w > 0) {
      if (w + r < W) {
        lncc::summands(Ir[w + r], Jr[w + r], s);
        for (int c = 0; c < NSUM; ++c) acc[c] += s[c];
      }
      if (w - r - 1 >= 0) {
        lncc::summands(Ir[w - r - 1], Jr[w - r - 1], s);
        for (int c = 0; c < NSUM; ++c) acc[c] -= s[c];
      }
    }
    for (int c = 0; c < NSUM; ++c) Sr[c * vol + w] = acc[c];
  }
}

// Row pass along W over the box-summed coefficient maps, combined into the gradients.
__global__ void wpass_final_kernel(LnccArgs a, const float* __restrict__ K,
                                   const float* __restrict__ I, const float* __restrict__ J,
                                   float* __restrict__ gI, float* __restrict__ gJ) {
  const int64_t rows = a.B * a.D * a.H;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t vol = a.vol(), rpi = a.D * a.H;
  const int64_t b = row / rpi, off = (row % rpi) * a.W;
  const float* Kr = K + b * NSUM * vol + off;
  const int64_t io = b * vol + off;
  const int64_t W = a.W, r = a.rW;
  float acc[NSUM] = {0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t w = 0; w <= min(r, W - 1); ++w)
    for (int c = 0; c < NSUM; ++c) acc[c] += Kr[c * vol + w];
  for (int64_t w = 0; w < W; ++w) {
    if (w > 0) {
      if (w + r < W)
        for (int c = 0; c < NSUM; ++c) acc[c] += Kr[c * vol + w + r];
      if (w - r - 1 >= 0)
        for (int c = 0; c < NSUM; ++c) acc[c] -= Kr[c * vol + w - r - 1];
    }
    const float i = I[io + w], j = J[io + w];
    if (gI) gI[io + w] = lncc::grad_fixed(acc, i, j);
    if (gJ) gJ[io + w] = lncc::grad_moving(acc, i, j);
  }
}

enum class ColMode : int { COPY = 0, COEFF = 1 };

// In-place column pass: thread per (b, m, w) column of length N with stride sk, five
// channels. COPY writes the box sums; COEFF (axis D) writes the coefficient maps.
template <ColMode MODE>
__global__ void col_inplace_kernel(LnccArgs a, float* __restrict__ S, int64_t M, int64_t N,
                                   int64_t sm, int64_t sk, int64_t r,
                                   const float* __restrict__ mask, const float* __restrict__ scale) {
  extern __shared__ float ring[];  // [(r + 1) * NSUM][blockDim.x]
  const int64_t cols = a.B * M * a.W;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  const int64_t vol = a.vol();
  const int64_t w = col % a.W, m = (col / a.W) % M, b = col / (a.W * M);
  float* base = S + b * NSUM * vol + m * sm + w;
  const int64_t slots = r + 1;
  const int t = threadIdx.x, nt = blockDim.x;
  float acc[NSUM] = {0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t e = 0; e <= min(r, N - 1); ++e)
    for (int c = 0; c < NSUM; ++c) acc[c] += base[c * vol + e * sk];
  for (int64_t k = 0; k < N; ++k) {
    const int slot = int(k % slots);
    if (k > 0) {
      if (k + r < N)
        for (int c = 0; c < NSUM; ++c) acc[c] += base[c * vol + (k + r) * sk];
      if (k - r - 1 >= 0)
        for (int c = 0; c < NSUM; ++c) acc[c] -= ring[(slot * NSUM + c) * nt + t];
    }
    for (int c = 0; c < NSUM; ++c) ring[(slot * NSUM + c) * nt + t] = base[c * vol + k * sk];
    if (MODE == ColMode::COPY) {
      for (int c = 0; c < NSUM; ++c) base[c * vol + k * sk] = acc[c];
    } else {
      // axis D: d = k, h = m
      const float n = float(lncc::axis_count(k, r, N) * lncc::axis_count(m, a.rH, a.H) *
                            lncc::axis_count(w, a.rW, a.W));
      const int64_t vox = b * vol + m * sm + w + k * sk;
      const float wt = mask ? scale[b] * mask[vox] : scale[b];
      float kk[NSUM];
      lncc::cc_coeffs<float>(acc[0], acc[1], acc[2], acc[3], acc[4], n, float(a.eps), wt, kk);
      for (int c = 0; c < NSUM; ++c) base[c * vol + k * sk] = kk[c];
    }
  }
}

// Column pass along D computing Σ m cc: one partial per block of LNCC_CUDA_COLS columns
// (grid.y = item).
__global__ void col_reduce_kernel(LnccArgs a, const float* __restrict__ S,
                                  const float* __restrict__ mask, float* __restrict__ partials) {
  __shared__ float red[lncc::LNCC_CUDA_COLS];
  const int64_t b = blockIdx.y;
  const int64_t plane = a.H * a.W, vol = a.vol();
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float part = 0.f;
  if (col < plane) {
    const int64_t h = col / a.W, w = col % a.W;
    const float* base = S + b * NSUM * vol + col;
    const int64_t N = a.D, r = a.rD;
    const int64_t chw = lncc::axis_count(h, a.rH, a.H) * lncc::axis_count(w, a.rW, a.W);
    float acc[NSUM] = {0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t e = 0; e <= min(r, N - 1); ++e)
      for (int c = 0; c < NSUM; ++c) acc[c] += base[c * vol + e * plane];
    for (int64_t k = 0; k < N; ++k) {
      if (k > 0) {
        if (k + r < N)
          for (int c = 0; c < NSUM; ++c) acc[c] += base[c * vol + (k + r) * plane];
        if (k - r - 1 >= 0)
          for (int c = 0; c < NSUM; ++c) acc[c] -= base[c * vol + (k - r - 1) * plane];
      }
      const float n = float(lncc::axis_count(k, r, N) * chw);
      const float cc = lncc::cc_value<float>(acc[0], acc[1], acc[2], acc[3], acc[4], n, float(a.eps));
      part += mask ? mask[b * vol + k * plane + col] * cc : cc;
    }
  }
  red[threadIdx.x] = part;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = red[0];
}

void check_args(const LnccArgs& a) {
  if (a.dtype != DType::F32) throw std::invalid_argument("lncc cuda kernels take float32");
}

// Threads per block of the in-place column passes: the ring holds (r + 1) * 5 floats per
// thread in at most kRingBytes of shared memory.
int ring_threads(int64_t r) {
  const int64_t per = (r + 1) * NSUM * int64_t(sizeof(float));
  int64_t t = std::min<int64_t>(128, kRingBytes / per);
  if (t >= 32) t = t / 32 * 32;
  if (t < 1) throw std::invalid_argument("lncc cuda: window too large for the shared-memory ring");
  return int(t);
}

template <ColMode MODE>
void col_inplace(const LnccArgs& a, float* S, bool axis_d, const float* mask, const float* scale,
                 cudaStream_t s) {
  const int64_t M = axis_d ? a.H : a.D, N = axis_d ? a.D : a.H;
  const int64_t sm = axis_d ? a.W : a.H * a.W, sk = axis_d ? a.H * a.W : a.W;
  const int64_t r = axis_d ? a.rD : a.rH;
  const int threads = ring_threads(r);
  const int64_t cols = a.B * M * a.W;
  const size_t smem = size_t(r + 1) * NSUM * threads * sizeof(float);
  col_inplace_kernel<MODE><<<unsigned(ceil_div(cols, threads)), threads, smem, s>>>(
      a, S, M, N, sm, sk, r, mask, scale);
  check_launch("lncc col_inplace_kernel");
}

void wpass_ij(const LnccArgs& a, const float* I, const float* J, float* S, cudaStream_t s) {
  const int64_t rows = a.B * a.D * a.H;
  wpass_ij_kernel<<<unsigned(ceil_div(rows, kRowThreads)), kRowThreads, 0, s>>>(a, I, J, S);
  check_launch("lncc wpass_ij_kernel");
}

}  // namespace

void lncc_forward(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                  uintptr_t work, uintptr_t partials, uintptr_t stream) {
  check_args(a);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float* I = reinterpret_cast<const float*>(fixed);
  const float* J = reinterpret_cast<const float*>(moving);
  float* S = reinterpret_cast<float*>(work);
  wpass_ij(a, I, J, S, s);
  col_inplace<ColMode::COPY>(a, S, false, nullptr, nullptr, s);
  const dim3 grid(unsigned(ceil_div(a.H * a.W, lncc::LNCC_CUDA_COLS)), unsigned(a.B));
  col_reduce_kernel<<<grid, lncc::LNCC_CUDA_COLS, 0, s>>>(a, S, reinterpret_cast<const float*>(mask),
                                                          reinterpret_cast<float*>(partials));
  check_launch("lncc col_reduce_kernel");
}

void lncc_backward(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                   uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving,
                   uintptr_t stream) {
  check_args(a);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const float* I = reinterpret_cast<const float*>(fixed);
  const float* J = reinterpret_cast<const float*>(moving);
  float* S = reinterpret_cast<float*>(work);
  wpass_ij(a, I, J, S, s);
  col_inplace<ColMode::COPY>(a, S, false, nullptr, nullptr, s);
  col_inplace<ColMode::COEFF>(a, S, true, reinterpret_cast<const float*>(mask),
                              reinterpret_cast<const float*>(scale), s);
  col_inplace<ColMode::COPY>(a, S, false, nullptr, nullptr, s);
  col_inplace<ColMode::COPY>(a, S, true, nullptr, nullptr, s);
  const int64_t rows = a.B * a.D * a.H;
  wpass_final_kernel<<<unsigned(ceil_div(rows, kRowThreads)), kRowThreads, 0, s>>>(
      a, S, I, J, reinterpret_cast<float*>(grad_fixed), reinterpret_cast<float*>(grad_moving));
  check_launch("lncc wpass_final_kernel");
}

}  // namespace cuda
}  // namespace mrus
