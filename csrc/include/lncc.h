// Per-voxel math of the local normalised cross-correlation (LNCC), shared by the CPU and
// CUDA kernels.
//
// Five box sums per voxel (window sums over the in-bounds voxels only, n of them):
// S = (ΣI, ΣJ, ΣI², ΣJ², ΣIJ). From them
//   cross = ΣIJ − ΣIΣJ/n, var_I = max(0, ΣI² − (ΣI)²/n), var_J likewise,
//   cc = min(cross², var_I var_J) / (var_I var_J + eps)            ∈ [0, 1]      (FORM_MRUS)
// or MONAI's form (LocalNormalizedCrossCorrelationLoss), with dr = eps and nr:
//   var_I = max(ΣI² − (ΣI)²/n, dr), var_J likewise,
//   cc = (cross² + nr) / (var_I var_J)                                             (FORM_MONAI).
// The loss is Σ_v w(v) cc(v) with w = mask / Σmask (or 1/N). Its gradient with respect to
// the image at voxel x collects every window that contains x; since the box is symmetric
// that is again a box sum, of the per-window coefficient maps K = w ∂cc/∂S:
//   ∂L/∂I(x) = box(K0) + 2 I(x) box(K2) + J(x) box(K4)
//   ∂L/∂J(x) = box(K1) + 2 J(x) box(K3) + I(x) box(K4).
#pragma once

#include <cstdint>

#include "common.h"

namespace mrus {
namespace lncc {

constexpr int NSUM = 5;  // ΣI, ΣJ, ΣI², ΣJ², ΣIJ (and the coefficient maps, same order)

// Per-window formula (LnccArgs::form; the Python side passes the same codes).
constexpr int FORM_MRUS = 0;   // min(cross², vv) / (vv + eps), variances clamped at 0
constexpr int FORM_MONAI = 1;  // (cross² + nr) / (max(var_I, eps) max(var_J, eps))

// Sizes of one call: B items of one channel, D x H x W voxels (2D: D = 1, rD = 0), window
// radii per axis. Inputs contiguous [B, 1, D, H, W].
struct LnccArgs {
  DType dtype = DType::F32;
  int64_t B = 0, D = 1, H = 0, W = 0;
  int64_t rD = 0, rH = 0, rW = 0;
  double eps = 1e-5;  // FORM_MONAI: the variances' floor dr
  double nr = 0.0;    // FORM_MONAI: added to cross²
  int form = FORM_MRUS;
  int num_threads = 1;
  MRUS_HD int64_t vol() const { return D * H * W; }
};

// The CUDA forward writes one partial sum per block of LNCC_CUDA_COLS (h, w) columns per
// item: [B, ceil(H W / LNCC_CUDA_COLS)] float32, summed in fixed order by the caller.
constexpr int LNCC_CUDA_COLS = 256;

// How many positions of a window of radius r centred on i fall inside [0, n).
MRUS_HD int64_t axis_count(int64_t i, int64_t r, int64_t n) {
  const int64_t lo = i - r < 0 ? 0 : i - r;
  const int64_t hi = i + r > n - 1 ? n - 1 : i + r;
  return hi - lo + 1;
}

// NaN-propagating clamps (a comparison with NaN is false, so NaN passes through).
template <typename T>
MRUS_HD T clamp0(T x) {
  return x < T(0) ? T(0) : x;
}

// max(x, lo) that passes NaN through (as torch.maximum).
template <typename T>
MRUS_HD T floor_at(T x, T lo) {
  return x < lo ? lo : x;
}

// d max(x, lo) / dx as torch.maximum's autograd takes it: 1 above, 1/2 on a tie, 0 below.
template <typename T>
MRUS_HD T floor_gate(T x, T lo) {
  return x > lo ? T(1) : (x == lo ? T(0.5) : T(0));
}

// cc of one window from its box sums over n voxels, in the formula `form` (FORM_*).
template <typename T>
MRUS_HD T cc_value(T si, T sj, T sii, T sjj, T sij, T n, T eps, T nr, int form) {
  const T inv = T(1) / n;
  const T cross = sij - si * sj * inv;
  const T vi_raw = sii - si * si * inv;
  const T vj_raw = sjj - sj * sj * inv;
  if (form == FORM_MONAI) return (cross * cross + nr) / (floor_at(vi_raw, eps) * floor_at(vj_raw, eps));
  const T vv = clamp0(vi_raw) * clamp0(vj_raw);
  T c2 = cross * cross;
  if (c2 > vv) c2 = vv;  // rounding only: cross² <= var_I var_J exactly
  return c2 / (vv + eps);
}

// k[0..4] = w ∂cc/∂(ΣI, ΣJ, ΣI², ΣJ², ΣIJ), with the subgradients torch's autograd takes, so
// the kernels match the reference's autograd. FORM_MRUS: the clamp at 0 passes where the raw
// variance is >= 0, the cross² clamp takes the cross² branch on a tie. FORM_MONAI: the floor
// max(var, dr) as torch.maximum (floor_gate).
template <typename T>
MRUS_HD void cc_coeffs(T si, T sj, T sii, T sjj, T sij, T n, T eps, T nr, int form, T w, T* k) {
  const T inv = T(1) / n;
  const T cross = sij - si * sj * inv;
  const T vi_raw = sii - si * si * inv;
  const T vj_raw = sjj - sj * sj * inv;
  const T c2 = cross * cross;
  T dcross, dvi, dvj;  // ∂cc/∂cross, ∂cc/∂vi_raw, ∂cc/∂vj_raw
  if (form == FORM_MONAI) {
    const T vi = floor_at(vi_raw, eps), vj = floor_at(vj_raw, eps);
    const T rden = T(1) / (vi * vj);
    const T cc = (c2 + nr) * rden;
    dcross = T(2) * cross * rden;
    dvi = -floor_gate(vi_raw, eps) * cc / vi;
    dvj = -floor_gate(vj_raw, eps) * cc / vj;
  } else {
    const T vi = clamp0(vi_raw), vj = clamp0(vj_raw);
    const T vv = vi * vj;
    const T den = vv + eps;
    T dvv;
    if (c2 > vv) {  // cc = vv / (vv + eps)
      dcross = T(0);
      dvv = eps / (den * den);
    } else {  // cc = cross² / (vv + eps)
      dcross = T(2) * cross / den;
      dvv = -c2 / (den * den);
    }
    dvi = vi_raw < T(0) ? T(0) : dvv * vj;
    dvj = vj_raw < T(0) ? T(0) : dvv * vi;
  }
  k[0] = w * (-dcross * sj * inv - T(2) * dvi * si * inv);
  k[1] = w * (-dcross * si * inv - T(2) * dvj * sj * inv);
  k[2] = w * dvi;
  k[3] = w * dvj;
  k[4] = w * dcross;
}

// The five summands of voxel (i, j): I, J, I², J², IJ.
template <typename T, typename A>
MRUS_HD void summands(T i, T j, A* s) {
  const A a = A(i), b = A(j);
  s[0] = a;
  s[1] = b;
  s[2] = a * a;
  s[3] = b * b;
  s[4] = a * b;
}

// Image gradients at voxel x from the box-summed coefficient maps kb[0..4].
template <typename T>
MRUS_HD T grad_fixed(const T* kb, T i, T j) {
  return kb[0] + T(2) * i * kb[2] + j * kb[4];
}
template <typename T>
MRUS_HD T grad_moving(const T* kb, T i, T j) {
  return kb[1] + T(2) * j * kb[3] + i * kb[4];
}

}  // namespace lncc
}  // namespace mrus
