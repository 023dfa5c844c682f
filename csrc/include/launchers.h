// Entry points of the compiled kernels. Pointers, sizes and the CUDA stream arrive as plain
// integers from mrus_kernels/_ext.py; the Python layer has validated everything and made
// every tensor contiguous.
#pragma once

#include <cstdint>

#include "jacobian.h"
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
// As the cpu versions, float32/float16/bfloat16 (float32 math), on `stream`.
void jacobian_forward(const jacobian::JacobianArgs& a, uintptr_t u, uintptr_t det, uintptr_t stream);
void jacobian_backward(const jacobian::JacobianArgs& a, uintptr_t grad_det, uintptr_t u,
                       uintptr_t grad_u, uintptr_t stream);
}  // namespace cuda

}  // namespace mrus
