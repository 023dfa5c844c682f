// Per-voxel math of the Parzen-window mutual information operator, shared by
// csrc/cpu/mi.cpp and csrc/cuda/mi.cu.
//
// Definition (mrus_kernels/reference.py): bins K over [lo, hi], width w = (hi - lo) / K
// (at least 1e-12), centres c_k = lo + (k + 1/2) w, x clamped to [lo, hi]. In bin units
// s = (x - lo) / w - 1/2, so that t_k = (x - c_k) / w = s - k. The weights
// W_k(x) = phi(t_k) / sum_j phi(t_j) are non-zero (above the truncation level) only in a
// window of bins around s: at most 4 for the cubic B-spline; for the Gaussian
// phi(t) = exp(-t^2 / (2 sigma^2)) the bins with |t_k| <= radius (radius =
// sqrt(2 sigma^2 ln(1 / level) + 1/4), chosen by the Python layer so that a dropped weight
// is below `level` times the largest one, far below the dtype's precision).
// The Gaussian is evaluated max-subtracted, relative to the nearest bin's value, so a tiny
// sigma tends to hard binning without 0/0.
#pragma once

#include "common.h"

namespace mrus {
namespace mi {

// Codes shared with mrus_kernels/mi.py (KERNELS).
enum class Kernel : int { GAUSSIAN = 0, BSPLINE = 1 };

// Largest window a fixed-size (GPU) buffer must hold; the CPU sizes its buffers from K.
constexpr int kMaxWindowGpu = 16;

// Everything the kernels need besides the pointers. Tensors are contiguous:
//   fixed, moving, mask (optional) [B, N]; ranges [B, 4] = (lo_f, hi_f, lo_g, hi_g);
//   hist (forward) and grad_hist (backward) [B, K, K], row a = fixed bin, column b = moving.
struct MIArgs {
  int dtype = 0;  // DType of fixed / moving / ranges
  int64_t B = 1;
  int64_t N = 1;  // voxels per item
  int K = 32;
  Kernel kernel = Kernel::GAUSSIAN;
  double sigma = 0.5;   // Gaussian width in bin widths
  double radius = 4.0;  // Gaussian truncation radius in bin widths
  double gauss_step = 0.0;  // exp(-1 / sigma^2), set by the launcher
  int num_threads = 1;
};

// Bin coordinate of x and whether the clamp passes its derivative (inclusive bounds, as
// torch.clamp). Returns false for a NaN / infinite coordinate (NaN data or range).
template <typename T>
MRUS_HD bool bin_coord(T x, T lo, T hi, int K, T& s, T& inv_w, bool& inside) {
  T w = (hi - lo) / T(K);
  if (!(w >= T(1e-12))) w = T(1e-12);  // also maps a NaN width to 1e-12: NaN then shows in s
  inside = x >= lo && x <= hi;
  const T xc = x < lo ? lo : (x > hi ? hi : x);
  s = (xc - lo) / w - T(0.5);
  inv_w = T(1) / w;
  // Clamped values give s in [-1/2, K - 1/2]; anything else is NaN / inf (or a NaN range).
  return s >= T(-0.5) - T(1e-3) && s <= T(K) - T(0.5) + T(1e-3) && hi >= lo;
}

// Window of normalised weights of one value: bins k0 .. k0 + n - 1, weights w[i], and when
// dw != nullptr their derivatives dW/dx (0 where the clamp is active). Returns n, or 0 for
// a NaN / infinite value (the caller then produces NaN). `cap` bounds n (buffer size).
template <typename T>
MRUS_HD int window(const MIArgs& a, T x, T lo, T hi, int& k0, T* w, T* dw, int cap) {
  T s, inv_w;
  bool inside;
  if (!bin_coord(x, lo, hi, a.K, s, inv_w, inside)) return 0;
  T sum = T(0), dsum = T(0);
  int n;
  if (a.kernel == Kernel::BSPLINE) {
    // Bins i-1 .. i+2 with i = floor(s), u = s - i in [0, 1): the four cubic B-spline
    // pieces, clipped to [0, K - 1] and renormalised.
    const T fi = floor(s);
    const int i = static_cast<int>(fi);
    const T u = s - fi, v = T(1) - u;
    const T phi4[4] = {v * v * v / T(6), (T(4) - T(6) * u * u + T(3) * u * u * u) / T(6),
                       (T(4) - T(6) * v * v + T(3) * v * v * v) / T(6), u * u * u / T(6)};
    const T dphi4[4] = {-v * v / T(2), -T(2) * u + T(1.5) * u * u,
                        T(2) * v - T(1.5) * v * v, u * u / T(2)};
    const int first = i - 1 < 0 ? 0 : i - 1;
    const int last = i + 2 > a.K - 1 ? a.K - 1 : i + 2;
    k0 = first;
    n = last - first + 1;
    // Over the four pieces with constant indices (bins first .. last in order), so that
    // phi4 / dphi4 stay in registers on the GPU instead of a stack frame.
    for (int q = 0; q < 4; ++q) {
      const int k = i - 1 + q;
      if (k < first || k > last) continue;
      w[k - first] = phi4[q];
      sum += phi4[q];
      if (dw) {
        dw[k - first] = dphi4[q];
        dsum += dphi4[q];
      }
    }
  } else {
    // Nearest bin kn, d = s - kn in [-1/2, 1/2]; bin kn + j has t = d - j and, relative to
    // the nearest bin, phi = exp(-((d - j)^2 - d^2) / (2 sigma^2)) = exp(-j (j - 2d) / (2 sigma^2)).
    T fk = floor(s + T(0.5));
    if (fk < T(0)) fk = T(0);
    if (fk > T(a.K - 1)) fk = T(a.K - 1);
    const int kn = static_cast<int>(fk);
    const T d = s - fk;
    const T r = T(a.radius);
    int jlo = static_cast<int>(ceil(d - r)), jhi = static_cast<int>(floor(d + r));
    if (jlo > 0) jlo = 0;
    if (jhi < 0) jhi = 0;
    if (kn + jlo < 0) jlo = -kn;
    if (kn + jhi > a.K - 1) jhi = a.K - 1 - kn;
    if (jhi - jlo + 1 > cap) {
      // Keep the `cap` bins nearest to s (the Python layer sizes cap so this does not bind).
      const int excess = jhi - jlo + 1 - cap;
      int cut_lo = excess / 2, cut_hi = excess - cut_lo;
      jlo += cut_lo;
      jhi -= cut_hi;
    }
    // Two exponentials per value: going out from the nearest bin, each next phi is the
    // previous one times q * step^(|j| - 1) with q = exp((+-2d - 1) / (2 sigma^2)) and
    // step = exp(-1 / sigma^2); every factor is <= 1 (|d| <= 1/2), so nothing overflows.
    const T inv_2s2 = T(1) / (T(2) * T(a.sigma) * T(a.sigma));
    const T inv_s2 = T(2) * inv_2s2;
    const T step = T(a.gauss_step);
    k0 = kn + jlo;
    n = jhi - jlo + 1;
    const int c = -jlo;  // index of the nearest bin in the window
    w[c] = T(1);
    sum = T(1);
    if (dw) dw[c] = -d * inv_s2;
    dsum = dw ? dw[c] : T(0);
    T phi = T(1), q = exp((T(2) * d - T(1)) * inv_2s2), sp = T(1);
    for (int j = 1; j <= jhi; ++j) {
      phi *= q * sp;
      sp *= step;
      w[c + j] = phi;
      sum += phi;
      if (dw) {
        dw[c + j] = -(d - T(j)) * inv_s2 * phi;  // d phi / d s
        dsum += dw[c + j];
      }
    }
    phi = T(1);
    q = exp((-T(2) * d - T(1)) * inv_2s2);
    sp = T(1);
    for (int j = -1; j >= jlo; --j) {
      phi *= q * sp;
      sp *= step;
      w[c + j] = phi;
      sum += phi;
      if (dw) {
        dw[c + j] = -(d - T(j)) * inv_s2 * phi;
        dsum += dw[c + j];
      }
    }
  }
  const T inv_sum = T(1) / sum;
  for (int i = 0; i < n; ++i) w[i] *= inv_sum;
  if (dw) {
    // d(phi_k / S)/dx = (phi'_k - W_k S') / S * ds/dx; zero where the clamp is active.
    const T scale = inside ? inv_sum * inv_w : T(0);
    for (int i = 0; i < n; ++i) dw[i] = (dw[i] - w[i] * dsum) * scale;
  }
  return n;
}

}  // namespace mi
}  // namespace mrus
