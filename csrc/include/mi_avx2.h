// AVX2 + FMA kernels of the float32 Parzen-window joint histogram and its backward
// (csrc/cpu/mi.cpp picks them at run time; its portable loops serve float64, CPUs without
// AVX2 and Gaussian windows wider than 15 bins).
//
// A value's window is S = 8 NV bins k0 .. k0 + S - 1 (NV = 1 or 2 vectors; weights 0
// outside the kernel's support and outside [0, K)), computed for 8 values at once with a
// vector exp. The histogram (forward) and dL/dhist (backward) are held padded, P = K + S
// bins a side with the real bins at offset `margin`, so that the S bins of any window are in
// memory: a histogram row update is 2 NV double vectors, a gradient row NV float vectors. Semantics are those of csrc/include/mi.h
// (the same bin coordinate, the same truncation radius, the same clamps).
#pragma once

#include "simd_avx2.h"

#ifdef MRUS_HAVE_AVX2_KERNELS

#include <cmath>
#include <cstdint>

#include "mi.h"

namespace mrus {
namespace cpu {
namespace avx2 {

struct MIWindows {
  int K = 0;
  bool gauss = true;
  int J = 0;       // Gaussian: window slot i is bin kn - J + i, kn the nearest bin
  int slots = 8;   // bins a window can cover: 2 J + 1 (Gaussian) or 4 (B-spline)
  int NV = 1;      // vectors per window: S = 8 NV >= slots bins
  int margin = 0;  // padded index of bin k: k + margin
  int P = 0;       // padded bins per side
  float inv_2s2 = 0, inv_s2 = 0, radius = 0, step = 0;

  static constexpr int kMaxNV = 2;
  static constexpr int kMaxS = L * kMaxNV;

  // Whether these kernels serve the arguments (the Gaussian window must fit 16 bins:
  // float32 sigma up to about 1.2 bin widths).
  static bool serves(const mi::MIArgs& a) {
    if (a.kernel == mi::Kernel::BSPLINE) return true;
    return 2 * std::floor(a.radius + 0.5) + 1 <= kMaxS;
  }

  explicit MIWindows(const mi::MIArgs& a) {
    K = a.K;
    gauss = a.kernel == mi::Kernel::GAUSSIAN;
    J = gauss ? static_cast<int>(std::floor(a.radius + 0.5)) : 0;
    slots = gauss ? 2 * J + 1 : 4;
    NV = (slots + L - 1) / L;
    // The first bin of a window is >= -J (Gaussian: the nearest bin is clamped into
    // [0, K - 1]) or >= -2 (B-spline: floor(s) - 1 with s >= -1/2 - 1e-3).
    margin = gauss ? J : 2;
    P = K + L * NV;
    inv_2s2 = static_cast<float>(1.0 / (2.0 * a.sigma * a.sigma));
    inv_s2 = 2.0f * inv_2s2;
    radius = static_cast<float>(a.radius);
    step = static_cast<float>(a.gauss_step);
  }

  // Windows of n <= 8 values x (lanes), slot-major: w[i] (and, when need_dw, dw[i]) holds
  // the weight (dW/dx) of bin k0 + i for every lane, i < S. bad: all ones for a lane whose value
  // (or range) is NaN / infinite (mi::bin_coord's test); lanes >= n are padding.
  struct Block {
    __m256i k0;
    __m256 w[kMaxS], dw[kMaxS];
    __m256 bad;
  };

  MRUS_AVX2 void windows(const float* x, int n, float lo, float hi, bool need_dw, Block& o) const {
    const __m256i tail = tail_mask(n);
    const __m256 xv = load(x, n, tail);
    // mi::bin_coord for 8 lanes: width, clamp, bin coordinate, sanity.
    float wd = (hi - lo) / float(K);
    if (!(wd >= 1e-12f)) wd = 1e-12f;
    const __m256 lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi);
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(xv, lov, _CMP_GE_OQ),
                                        _mm256_cmp_ps(xv, hiv, _CMP_LE_OQ));
    const __m256 xc = _mm256_blendv_ps(_mm256_min_ps(_mm256_max_ps(xv, lov), hiv), xv,
                                       _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    __m256 s = _mm256_sub_ps(_mm256_div_ps(_mm256_sub_ps(xc, lov), _mm256_set1_ps(wd)),
                             _mm256_set1_ps(0.5f));
    __m256 good = _mm256_and_ps(
        _mm256_cmp_ps(s, _mm256_set1_ps(-0.5f - 1e-3f), _CMP_GE_OQ),
        _mm256_cmp_ps(s, _mm256_set1_ps(float(K) - 0.5f + 1e-3f), _CMP_LE_OQ));
    if (!(hi >= lo)) good = _mm256_setzero_ps();
    o.bad = _mm256_andnot_ps(good, _mm256_castsi256_ps(tail));
    s = _mm256_and_ps(s, good);  // bad lanes: any finite coordinate (their result is NaN)
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(float(K - 1));
    const int S = L * NV;
    __m256 phi[kMaxS], dphi[kMaxS];
    __m256 k0f;
    if (gauss) {
      // Nearest bin kn, d = s - kn; bin kn + j has t = d - j and, relative to the nearest
      // bin, phi_j = exp(-j (j - 2d) / (2 sigma^2)) <= 1, built outwards from two
      // exponentials: phi_j = phi_(j-1) q step^(|j|-1), q = exp((+-2d - 1) / (2 sigma^2)),
      // step = exp(-1 / sigma^2). Kept where |t| <= radius.
      const __m256 fk = _mm256_min_ps(
          _mm256_max_ps(_mm256_floor_ps(_mm256_add_ps(s, _mm256_set1_ps(0.5f))), zero), top);
      const __m256 d = _mm256_sub_ps(s, fk);
      k0f = _mm256_sub_ps(fk, _mm256_set1_ps(float(J)));
      const __m256 c = _mm256_set1_ps(inv_2s2), one = _mm256_set1_ps(1.0f);
      const __m256 two_d = _mm256_add_ps(d, d);
      const __m256 q_up = exp_ps(_mm256_mul_ps(_mm256_sub_ps(two_d, one), c));
      const __m256 q_dn = exp_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_add_ps(two_d, one)), c));
      const __m256 stepv = _mm256_set1_ps(step);
      phi[J] = one;
      __m256 q = q_up;
      for (int i = J + 1; i < S; ++i) {
        phi[i] = _mm256_mul_ps(phi[i - 1], q);
        q = _mm256_mul_ps(q, stepv);
      }
      q = q_dn;
      for (int i = J - 1; i >= 0; --i) {
        phi[i] = _mm256_mul_ps(phi[i + 1], q);
        q = _mm256_mul_ps(q, stepv);
      }
      const __m256 r = _mm256_set1_ps(radius), sign = _mm256_set1_ps(-0.0f);
      for (int i = 0; i < S; ++i) {
        const __m256 t = _mm256_sub_ps(d, _mm256_set1_ps(float(i - J)));
        const __m256 bin = _mm256_add_ps(k0f, _mm256_set1_ps(float(i)));
        const __m256 keep = _mm256_and_ps(
            _mm256_cmp_ps(_mm256_andnot_ps(sign, t), r, _CMP_LE_OQ),
            _mm256_and_ps(_mm256_cmp_ps(bin, zero, _CMP_GE_OQ), _mm256_cmp_ps(bin, top, _CMP_LE_OQ)));
        phi[i] = _mm256_and_ps(phi[i], keep);
        if (need_dw) dphi[i] = _mm256_mul_ps(_mm256_mul_ps(t, _mm256_set1_ps(-inv_s2)), phi[i]);
      }
    } else {
      // Bins i - 1 .. i + 2 with i = floor(s), u = s - i: the four cubic B-spline pieces,
      // clipped to [0, K - 1].
      const __m256 fi = _mm256_floor_ps(s);
      const __m256 u = _mm256_sub_ps(s, fi), v = _mm256_sub_ps(_mm256_set1_ps(1.0f), u);
      k0f = _mm256_sub_ps(fi, _mm256_set1_ps(1.0f));
      const __m256 sixth = _mm256_set1_ps(1.0f / 6.0f), half = _mm256_set1_ps(0.5f);
      const __m256 c4 = _mm256_set1_ps(4.0f), c6 = _mm256_set1_ps(6.0f), c3 = _mm256_set1_ps(3.0f);
      const __m256 c2 = _mm256_set1_ps(2.0f), c15 = _mm256_set1_ps(1.5f);
      const __m256 uu = _mm256_mul_ps(u, u), vv = _mm256_mul_ps(v, v);
      phi[0] = _mm256_mul_ps(_mm256_mul_ps(vv, v), sixth);
      phi[1] = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_mul_ps(c3, uu), u, _mm256_fnmadd_ps(c6, uu, c4)), sixth);
      phi[2] = _mm256_mul_ps(_mm256_fmadd_ps(_mm256_mul_ps(c3, vv), v, _mm256_fnmadd_ps(c6, vv, c4)), sixth);
      phi[3] = _mm256_mul_ps(_mm256_mul_ps(uu, u), sixth);
      if (need_dw) {
        dphi[0] = _mm256_mul_ps(_mm256_sub_ps(zero, vv), half);
        dphi[1] = _mm256_fmadd_ps(c15, uu, _mm256_mul_ps(_mm256_sub_ps(zero, c2), u));
        dphi[2] = _mm256_fnmadd_ps(c15, vv, _mm256_mul_ps(c2, v));
        dphi[3] = _mm256_mul_ps(uu, half);
      }
      for (int i = 0; i < S; ++i) {
        if (i >= 4) {
          phi[i] = zero;
          if (need_dw) dphi[i] = zero;
          continue;
        }
        const __m256 bin = _mm256_add_ps(k0f, _mm256_set1_ps(float(i)));
        const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(bin, zero, _CMP_GE_OQ),
                                          _mm256_cmp_ps(bin, top, _CMP_LE_OQ));
        phi[i] = _mm256_and_ps(phi[i], keep);
        if (need_dw) dphi[i] = _mm256_and_ps(dphi[i], keep);
      }
    }
    o.k0 = _mm256_cvtps_epi32(k0f);
    __m256 sum = phi[0], dsum = need_dw ? dphi[0] : zero;
    for (int i = 1; i < S; ++i) {
      sum = _mm256_add_ps(sum, phi[i]);
      if (need_dw) dsum = _mm256_add_ps(dsum, dphi[i]);
    }
    const __m256 inv_sum = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
    for (int i = 0; i < S; ++i) o.w[i] = _mm256_mul_ps(phi[i], inv_sum);
    if (need_dw) {
      // d(phi_k / S)/dx = (phi'_k - W_k S') / S * ds/dx; zero where the clamp is active.
      const __m256 scale = _mm256_and_ps(_mm256_div_ps(inv_sum, _mm256_set1_ps(wd)), inside);
      for (int i = 0; i < S; ++i) {
        o.dw[i] = _mm256_mul_ps(_mm256_fnmadd_ps(o.w[i], dsum, dphi[i]), scale);
      }
    }
  }

  // Adds voxels [v0, v1) of one item into two padded double histograms h0, h1 (P * P each,
  // even voxels into h0, odd into h1: consecutive updates of the same bins do not wait on
  // each other). Returns false when a counted voxel had a NaN / infinite value or mask.
  MRUS_AVX2 bool accumulate(const float* f, const float* g, const float* m, float lo_f,
                            float hi_f, float lo_g, float hi_g, int64_t v0, int64_t v1,
                            double* h0, double* h1) const {
    bool ok = true;
    Block bf, bg;
    alignas(32) float wf[kMaxS][L];
    alignas(32) int32_t kf[L], kg[L];
    const int quads = (slots + 3) / 4;  // columns of a row update, in vectors of 4 doubles
    for (int64_t x0 = v0; x0 < v1; x0 += L) {
      const int n = static_cast<int>(v1 - x0 < L ? v1 - x0 : L);
      windows(f + x0, n, lo_f, hi_f, false, bf);
      windows(g + x0, n, lo_g, hi_g, false, bg);
      const int bad = _mm256_movemask_ps(_mm256_or_ps(bf.bad, bg.bad));
      for (int i = 0; i < slots; ++i) _mm256_store_ps(wf[i], bf.w[i]);
      for (int q = 0; q < NV; ++q) transpose8(bg.w + L * q);  // bg.w[L q + l]: lane l's slots L q ..
      _mm256_store_si256(reinterpret_cast<__m256i*>(kf), _mm256_add_epi32(bf.k0, _mm256_set1_epi32(margin)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(kg), _mm256_add_epi32(bg.k0, _mm256_set1_epi32(margin)));
      for (int l = 0; l < n; ++l) {
        const float mv = m ? m[x0 + l] : 1.0f;
        if (mv == 0.0f) continue;  // masked out: its values, even NaN, do not count
        if (((bad >> l) & 1) || std::isnan(mv)) {
          ok = false;
          continue;
        }
        __m256d gw[2 * kMaxNV];  // the g window of lane l in doubles, 4 bins a vector
        for (int q = 0; q < NV; ++q) {
          gw[2 * q] = _mm256_cvtps_pd(_mm256_castps256_ps128(bg.w[L * q + l]));
          gw[2 * q + 1] = _mm256_cvtps_pd(_mm256_extractf128_ps(bg.w[L * q + l], 1));
        }
        double* row = ((l & 1) ? h1 : h0) + int64_t(kf[l]) * P + kg[l];
        for (int i = 0; i < slots; ++i, row += P) {
          const __m256d sv = _mm256_set1_pd(double(mv) * double(wf[i][l]));
          for (int c = 0; c < quads; ++c) {
            _mm256_storeu_pd(row + 4 * c, _mm256_fmadd_pd(sv, gw[c], _mm256_loadu_pd(row + 4 * c)));
          }
        }
      }
    }
    return ok;
  }

  // Per-voxel gradients of voxels [v0, v1) of one item from the padded float dL/dhist G
  // (P * P, zero outside the real bins); grad_f / grad_g may be null (not needed).
  MRUS_AVX2 void gradient(const float* f, const float* g, const float* m, float lo_f,
                          float hi_f, float lo_g, float hi_g, const float* G, int64_t v0,
                          int64_t v1, float* grad_f, float* grad_g) const {
    Block bf, bg;
    alignas(32) float wf[kMaxS][L], dwf[kMaxS][L];
    alignas(32) int32_t kf[L], kg[L];
    for (int64_t x0 = v0; x0 < v1; x0 += L) {
      const int n = static_cast<int>(v1 - x0 < L ? v1 - x0 : L);
      const __m256i tail = tail_mask(n);
      windows(f + x0, n, lo_f, hi_f, grad_f != nullptr, bf);
      windows(g + x0, n, lo_g, hi_g, grad_g != nullptr, bg);
      for (int i = 0; i < slots; ++i) {
        _mm256_store_ps(wf[i], bf.w[i]);
        if (grad_f) _mm256_store_ps(dwf[i], bf.dw[i]);
      }
      for (int q = 0; q < NV; ++q) {
        transpose8(bg.w + L * q);
        if (grad_g) transpose8(bg.dw + L * q);
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(kf), _mm256_add_epi32(bf.k0, _mm256_set1_epi32(margin)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(kg), _mm256_add_epi32(bg.k0, _mm256_set1_epi32(margin)));
      // dL/df = m sum_a dW_a(f) sum_b G_ab W_b(g); dL/dg = m sum_a W_a(f) sum_b G_ab dW_b(g):
      // per lane, the rows of G weighted over a, then one dot product with the g window.
      __m256 pf[L], pg[L];
      for (int l = 0; l < L; ++l) {
        pf[l] = pg[l] = _mm256_setzero_ps();
        if (l >= n) continue;
        const float* row = G + int64_t(kf[l]) * P + kg[l];
        __m256 by_w[kMaxNV], by_dw[kMaxNV];
        for (int q = 0; q < NV; ++q) by_w[q] = by_dw[q] = _mm256_setzero_ps();
        for (int i = 0; i < slots; ++i, row += P) {
          const __m256 a = _mm256_set1_ps(wf[i][l]);
          const __m256 da = grad_f ? _mm256_set1_ps(dwf[i][l]) : _mm256_setzero_ps();
          for (int q = 0; q < NV; ++q) {
            const __m256 r = _mm256_loadu_ps(row + L * q);
            if (grad_g) by_w[q] = _mm256_fmadd_ps(a, r, by_w[q]);
            if (grad_f) by_dw[q] = _mm256_fmadd_ps(da, r, by_dw[q]);
          }
        }
        for (int q = 0; q < NV; ++q) {
          if (grad_f) pf[l] = _mm256_fmadd_ps(by_dw[q], bg.w[L * q + l], pf[l]);
          if (grad_g) pg[l] = _mm256_fmadd_ps(by_w[q], bg.dw[L * q + l], pg[l]);
        }
      }
      const __m256 mv = m ? load(m + x0, n, tail) : _mm256_set1_ps(1.0f);
      const __m256 nan = _mm256_or_ps(bf.bad, bg.bad);
      const __m256 masked = _mm256_cmp_ps(mv, _mm256_setzero_ps(), _CMP_EQ_OQ);
      const __m256 qnan = _mm256_set1_ps(NAN);
      // Masked-out voxels get 0 (their values do not count, even NaN), bad ones NaN.
      auto finish = [&](__m256 sum) MRUS_AVX2 {
        __m256 r = _mm256_blendv_ps(_mm256_mul_ps(mv, sum), qnan, nan);
        return _mm256_andnot_ps(masked, r);
      };
      if (grad_f) store(grad_f + x0, finish(hsum8(pf)), n, tail);
      if (grad_g) store(grad_g + x0, finish(hsum8(pg)), n, tail);
    }
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace mrus

#endif  // MRUS_HAVE_AVX2_KERNELS
