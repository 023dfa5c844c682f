// Per-voxel math of the Sobel operators, shared by csrc/cpu/sobel.cpp and csrc/cuda/sobel.cu.
//
// Conventions (DESIGN.md): x is [B, C, *S], each (batch, channel) volume filtered on its own.
// Component i of the Sobel = the 3-tap derivative d = [-1, 0, 1] along spatial axis i times
// the smoothing s = [1, 2, 1] along every other spatial axis (unnormalised, as
// scipy.ndimage.sobel): g_i(p) = sum_o d(o_i) prod_{j != i} s(o_j) x(p + o). Padding
// "replicate" (Padding::BORDER) reads clamped indices (SciPy "nearest"), "zeros" reads 0
// outside (SciPy "constant"). Both are separable: the 3^ndim stencil equals the product of
// 1D passes, each with its own padding, which is what every kernel computes.
//
// Large intensities: no kernel adds the weighted inputs in one running sum (that rounds at
// the scale of the inputs: |g| ~ 1e9 on a constant image at 1e15). The CPU's 1D passes
// treat every voxel alike; the CUDA and Triton kernels form each derivative difference
// x(+1) - x(-1) before a smoothing weight multiplies it, and their adjoints combine the
// derivative taps first in the same way. A constant input thus gives exactly 0 at any
// magnitude, and the error scales with the differences, not with the inputs.
//
// Every 1D pass, forward or adjoint, is a 3-tap operator Tap3 applied at index m of an axis
// of length n:
//   out[m] = c0 in[m] + (m > 0 ? cm in[m-1] : elo in[m]) + (m < n-1 ? cp in[m+1] : ehi in[m]).
// Forward with kernel k = (k[-1], k[0], k[1]): (cm, c0, cp) = k, and the missing neighbour
// replicates (elo = cm, ehi = cp) or reads 0 (elo = ehi = 0). The adjoint of the forward
// pass is the flipped kernel (cm, c0, cp) = (k[1], k[0], k[-1]) with out-of-range
// neighbours dropped, plus, for "replicate", the clamped reads folded back onto the end
// voxels: elo = k[-1] (= cp), ehi = k[1] (= cm). The adjoint of a separable filter is the
// product of the 1D adjoints, so every backward is a gather (single writer, no atomics).
//
// Gradients: magnitude m = sqrt(sum_i g_i^2 + eps), dm/dg_i = g_i / m. The L1 boundary loss
// sum |m1 - m0| has dL/dm1 = sign(m1 - m0) = -dL/dm0 (0 where equal, NaN for NaN), so
// grad_f1 = sum_i S_i^T (w g1_i / m1) and grad_f0 = -sum_i S_i^T (w g0_i / m0), with
// w = sign(m1 - m0) * upstream gradient (times 1/N for the mean).
#pragma once

#include "common.h"

namespace mrus {
namespace sobel {

// What the forward writes / the backward receives; codes shared with mrus_kernels/sobel.py.
enum class Mode : int {
  COMPONENTS = 0,  // [B, C, ndim, *S]
  MAGNITUDE = 1,   // [B, C, *S]
  L1 = 2,          // |m1 - m0|, reduced by Reduction
};
enum class Reduction : int { NONE = 0, SUM = 1, MEAN = 2 };

// Everything a Sobel kernel needs besides the pointers. All tensors contiguous:
// x (and x0 for L1) [B, C, *size]; outputs as Mode says.
struct SobelArgs {
  int dtype = 0;  // DType
  int ndim = 3;
  int64_t B = 1, C = 1;
  int64_t size[3] = {1, 1, 1};  // spatial sizes, first ndim used
  int padding = 1;              // Padding: ZEROS or BORDER (= "replicate")
  double eps = 1e-6;
  int mode = 1;       // Mode
  int reduction = 2;  // Reduction (L1 only)
  int num_threads = 1;  // CPU only

  MRUS_HD int64_t volumes() const { return B * C; }
  MRUS_HD int64_t voxels() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= size[i];
    return n;
  }
  MRUS_HD int64_t numel() const { return volumes() * voxels(); }
};

// One 3-tap 1D pass (see the header comment).
template <typename T>
struct Tap3 {
  T cm, c0, cp, elo, ehi;
};

// The forward (adjoint = false) or adjoint pass of the smoothing [1, 2, 1] (deriv = false)
// or derivative [-1, 0, 1] (deriv = true) kernel with this padding.
template <typename T>
MRUS_HD Tap3<T> make_tap(bool deriv, bool adjoint, int padding) {
  const T km = deriv ? T(-1) : T(1), k0 = deriv ? T(0) : T(2), kp = T(1);
  const bool rep = padding == int(Padding::BORDER);
  Tap3<T> t;
  t.c0 = k0;
  if (!adjoint) {
    t.cm = km;
    t.cp = kp;
    t.elo = rep ? km : T(0);
    t.ehi = rep ? kp : T(0);
  } else {
    t.cm = kp;
    t.cp = km;
    t.elo = rep ? km : T(0);
    t.ehi = rep ? kp : T(0);
  }
  return t;
}

// The three coefficients a pass applies at index m of an axis of length n to in[m-1],
// in[m], in[m+1]; a neighbour outside the axis gets coefficient 0 (its weight is folded
// into a0), so callers may point it at in[m].
template <typename T>
MRUS_HD void tap_coefs(const Tap3<T>& t, int64_t m, int64_t n, T& am, T& a0, T& ap) {
  const bool lo = m > 0, hi = m < n - 1;
  am = lo ? t.cm : T(0);
  ap = hi ? t.cp : T(0);
  a0 = t.c0 + (lo ? T(0) : t.elo) + (hi ? T(0) : t.ehi);
}

// The pass at one index, given the three values (left/right ignored where outside).
template <typename T>
MRUS_HD T tap(const Tap3<T>& t, T left, T mid, T right, int64_t m, int64_t n) {
  T am, a0, ap;
  tap_coefs(t, m, n, am, a0, ap);
  T r = a0 * mid;
  if (m > 0) r += am * left;
  if (m < n - 1) r += ap * right;
  return r;
}

template <typename T>
MRUS_HD T magnitude(T g0, T g1, T g2, T eps) {
  return sqrt(g0 * g0 + g1 * g1 + g2 * g2 + eps);
}

// sign(d) as torch's abs backward uses it: 0 at 0, NaN for NaN.
template <typename T>
MRUS_HD T l1_sign(T d) {
  return d > T(0) ? T(1) : (d < T(0) ? T(-1) : d * T(0));
}

// The factor of the L1 backward at one voxel: w = sign(m1 - m0) * upstream gradient; the
// gradient inputs are g1_i * (w / m1) and g0_i * (-w / m0).
template <typename T>
MRUS_HD void l1_factors(T m1, T m0, T upstream, T& r1, T& r0) {
  const T w = l1_sign(m1 - m0) * upstream;
  r1 = w / m1;
  r0 = -w / m0;
}

}  // namespace sobel
}  // namespace mrus
