// Entry points of the compiled kernels. Pointers, sizes and the CUDA stream arrive as plain
// integers from mrus_kernels/_ext.py; the Python layer has validated everything and made
// every tensor contiguous.
#pragma once

#include <cstdint>

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
// (int64 [Bi, C, *in], zero-filled) with quantum gmax[0] * 2**-32, where gmax is a float32
// device scalar holding max |grad_out|; integer sums do not depend on the order of atomics.
void warp_backward(const warp::WarpArgs& a, uintptr_t grad_out, uintptr_t image, uintptr_t ddf,
                   uintptr_t grad_image, uintptr_t grad_ddf, bool deterministic,
                   uintptr_t fixed_scratch, uintptr_t gmax, uintptr_t stream);
// LNCC, float32 only; as the cpu entry points, except that the forward writes per-block
// partial sums [B, ceil(H W / LNCC_CUDA_COLS)] (float32) instead of num.
void lncc_forward(const lncc::LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                  uintptr_t work, uintptr_t partials, uintptr_t stream);
void lncc_backward(const lncc::LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                   uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving,
                   uintptr_t stream);
// Regularisers, float32 only; the forward writes per-block partials
// [B, ceil(C D H W / REG_CUDA_BLOCK)] (float32) instead of per-item sums.
void regularisers_forward(const reg::RegArgs& a, uintptr_t u, uintptr_t partials, uintptr_t stream);
void regularisers_backward(const reg::RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad,
                           uintptr_t stream);
}  // namespace cuda

}  // namespace mrus
