// Entry points of the compiled kernels. Pointers, sizes and the CUDA stream arrive as plain
// integers from mrus_kernels/_ext.py; the Python layer has validated everything and made
// every tensor contiguous.
#pragma once

#include <cstdint>

#include "jacobian.h"
#include "mi.h"
#include "sobel.h"
#include "lncc.h"
#include "regularisers.h"
#include "warp.h"

namespace mrus {

namespace cpu {
void warp_forward(const warp::WarpArgs& a, uintptr_t image, uintptr_t ddf, uintptr_t out);
// grad_image: [Bi, C, *in] of the input dtype, zero-filled, or 0 when not needed.
// grad_ddf: [Bd, ndim, *out] of the input dtype, every element written, or 0.
void warp_backward(const warp::WarpArgs& a, uintptr_t grad_out, uintptr_t image, uintptr_t ddf,
                   uintptr_t grad_image, uintptr_t grad_ddf);
// det: [B, *size] of the input dtype; grad_u: [B, ndim, *size]; every element written.
void jacobian_forward(const jacobian::JacobianArgs& a, uintptr_t u, uintptr_t det);
void jacobian_backward(const jacobian::JacobianArgs& a, uintptr_t grad_det, uintptr_t u,
                       uintptr_t grad_u);
// Parzen joint histogram: hist [B, K, K] of the input dtype, every element written (the sum
// of m W_a(f) W_b(g), not yet divided by the mask sum). mask: [B, N] of the input dtype or 0.
void mi_forward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                uintptr_t ranges, uintptr_t hist);
// grad_fixed / grad_moving: [B, N] of the input dtype, every element written, or 0.
void mi_backward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                 uintptr_t ranges, uintptr_t grad_hist, uintptr_t grad_fixed,
                 uintptr_t grad_moving);
// Sobel (csrc/cpu/sobel.cpp). x, x0 (L1 only, else 0): [B, C, *S]; out as a.mode says
// (L1 with SUM/MEAN: one element). grad_out as the forward's out; grad_x / grad_x0:
// [B, C, *S], every element written, or 0 when not needed. float32 / float64.
void sobel_forward(const sobel::SobelArgs& a, uintptr_t x, uintptr_t x0, uintptr_t out);
void sobel_backward(const sobel::SobelArgs& a, uintptr_t grad_out, uintptr_t x, uintptr_t x0,
                    uintptr_t grad_x, uintptr_t grad_x0);
// LNCC, float32/float64 [B, 1, *S] inputs. work: [B, 5, *S] scratch. num: [B], Σ_v m(v) cc(v)
// (m = 1 without a mask). mask: [B, 1, *S] or 0. scale: [B], the weight of each item's
// voxels (upstream gradient / Σm). grad_fixed, grad_moving: [B, 1, *S], fully written, or 0.
void lncc_forward(const lncc::LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                  uintptr_t work, uintptr_t num);
void lncc_backward(const lncc::LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                   uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving);
// Regularisers, float32/float64 u [B, C, *S]. out: [B] per-item sums. scale: [B] upstream
// weight per item. grad: [B, C, *S], fully written.
void regularisers_forward(const reg::RegArgs& a, uintptr_t u, uintptr_t out);
void regularisers_backward(const reg::RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad);
}  // namespace cpu

namespace cuda {
bool built();
void warp_forward(const warp::WarpArgs& a, uintptr_t image, uintptr_t ddf, uintptr_t out,
                  uintptr_t stream);
// grad_image: float32 [Bi, C, *in], zero-filled, or 0 when not needed (the caller casts it
// to the input dtype). grad_ddf: input dtype [Bd, ndim, *out], every element written, or 0.
// deterministic: accumulate the image gradient in 64-bit fixed point in fixed_scratch
// (int64 [Bi * C * n_in] sums followed by int32 [Bi * C * n_in] non-finite flags, zero-filled);
// vmax: float32 device scalar bounding every finite contribution (the quantum follows from it,
// csrc/cuda/warp.cu); integer sums do not depend on the order of atomics.
void warp_backward(const warp::WarpArgs& a, uintptr_t grad_out, uintptr_t image, uintptr_t ddf,
                   uintptr_t grad_image, uintptr_t grad_ddf, bool deterministic,
                   uintptr_t fixed_scratch, uintptr_t vmax, uintptr_t stream);
// As the cpu versions, float32/float16/bfloat16 (float32 math), on `stream`.
void jacobian_forward(const jacobian::JacobianArgs& a, uintptr_t u, uintptr_t det, uintptr_t stream);
// scratch: float32 [B, ndim * ndim, *S], written then read by the backward (no init needed).
void jacobian_backward(const jacobian::JacobianArgs& a, uintptr_t grad_det, uintptr_t u,
                       uintptr_t grad_u, uintptr_t scratch, uintptr_t stream);
// float32 only (the caller converts). partial: float32 [B, blocks_per_item, K, K], every
// element written: one histogram per block, which the caller sums over blocks (fixed order).
void mi_forward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                uintptr_t ranges, uintptr_t partial, int64_t blocks_per_item, uintptr_t stream);
// grad_hist float32 [B, K, K]; grad_fixed / grad_moving float32 [B, N] or 0.
void mi_backward(const mi::MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                 uintptr_t ranges, uintptr_t grad_hist, uintptr_t grad_fixed,
                 uintptr_t grad_moving, uintptr_t stream);
// Sobel (csrc/cuda/sobel.cu), as the cpu entry points, input dtype (float32, float16,
// bfloat16; float32 math). L1 with SUM/MEAN writes one float32 partial sum per block into
// partials (sobel_num_partials(a) floats, also holding the chunk sums of the second stage),
// then reduces them in a fixed order into out. The MAGNITUDE and L1 backward need scratch:
// float32 [n, B, C, ndim, *S], n = the number of gradients asked for (x's block first);
// COMPONENTS takes 0.
int64_t sobel_num_partials(const sobel::SobelArgs& a);
void sobel_forward(const sobel::SobelArgs& a, uintptr_t x, uintptr_t x0, uintptr_t out,
                   uintptr_t partials, uintptr_t stream);
void sobel_backward(const sobel::SobelArgs& a, uintptr_t grad_out, uintptr_t x, uintptr_t x0,
                    uintptr_t grad_x, uintptr_t grad_x0, uintptr_t scratch, uintptr_t stream);
// LNCC, float32 only; as the cpu entry points, except that the forward writes per-block
// partial sums [B, ceil(H W / LNCC_CUDA_COLS)] (float32) instead of num, and that work holds
// the box sums [B, 5, *S] as float64, followed in the backward by the coefficient maps
// [B, 5, *S] as float32 (csrc/cuda/lncc.cu).
void lncc_forward(const lncc::LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                  uintptr_t work, uintptr_t partials, uintptr_t stream);
void lncc_backward(const lncc::LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                   uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving,
                   uintptr_t stream);
// Regularisers, float32 only; the forward writes per-block partials
// [B, ceil(C D H W / REG_CUDA_BLOCK)] (float32) instead of per-item sums.
void regularisers_forward(const reg::RegArgs& a, uintptr_t u, uintptr_t partials, uintptr_t stream);
// scratch: float32 like u for the harmonic kind (its Laplacian, no init needed), else unused.
void regularisers_backward(const reg::RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad,
                           uintptr_t scratch, uintptr_t stream);
}  // namespace cuda

}  // namespace mrus
