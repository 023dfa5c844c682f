// AVX2 + FMA row kernels of linear float32 warping (csrc/cpu/warp.cpp picks them at run time
// when the CPU has AVX2 and FMA; the portable row loops of warp.cpp serve every other case).
//
// Eight consecutive voxels of one output row (the last spatial axis) are one lane group:
// their sampling points, the corner offsets and validity masks, and the interpolation are
// vector code, and the corner values come from masked gathers (a padding corner is never
// read and reads as 0). Semantics are those of csrc/include/warp.h: zeros padding
// interpolates against zero-valued voxels, border padding clamps the coordinate first
// (gradient 0 where clamped), a NaN coordinate gives NaN and no gradient; a lane whose lerp
// is not finite is redone term by term, as the reference (warp.h file comment).
#pragma once

#include "simd_avx2.h"

#ifdef MRUS_HAVE_AVX2_KERNELS

#include <algorithm>
#include <cstdint>

#include "warp.h"

namespace mrus {
namespace cpu {
namespace avx2 {

// Per-axis constants of the input volume.
struct AxisConst {
  __m256 lo, hi;      // the sampling coordinate is clamped into [lo, hi]
  __m256i n;          // size
  __m256i n_minus_1;  // size - 1
  __m256i stride;     // elements between neighbours along the axis
  int32_t stride_s;
};

// Geometry of one lane group.
template <int NDIM>
struct Lanes {
  static constexpr int K = 1 << NDIM;
  __m256i off[K];    // flat corner offsets (valid lanes only are ever dereferenced)
  __m256 valid[K];   // all ones: corner inside the image, sample not NaN, lane inside the row
  __m256 t[NDIM];    // weight of the upper corner per axis
  __m256 gate[NDIM]; // all ones: the coordinate was not clamped (the gradient passes)
  __m256 nan;        // all ones: NaN sample
};

// Fills g from the sampling points p (one vector per axis); lanes outside tail are invalid.
template <int NDIM>
MRUS_AVX2 inline void geometry(const __m256* p, const AxisConst* ax, __m256i tail,
                               Lanes<NDIM>& g) {
  __m256 nan = _mm256_setzero_ps();
  for (int i = 0; i < NDIM; ++i) nan = _mm256_or_ps(nan, _mm256_cmp_ps(p[i], p[i], _CMP_UNORD_Q));
  g.nan = nan;
  __m256i lo_off[NDIM], hi_off[NDIM];
  __m256 lo_ok[NDIM], hi_ok[NDIM];
  for (int i = 0; i < NDIM; ++i) {
    __m256 q = _mm256_andnot_ps(nan, p[i]);  // NaN -> 0: defined conversions below
    // Border clamps into [0, n - 1], zeros bounds to [-2, n + 1]: a clamp either way.
    g.gate[i] = _mm256_and_ps(_mm256_cmp_ps(q, ax[i].lo, _CMP_GE_OQ),
                              _mm256_cmp_ps(q, ax[i].hi, _CMP_LE_OQ));
    q = _mm256_min_ps(_mm256_max_ps(q, ax[i].lo), ax[i].hi);
    const __m256 f = _mm256_floor_ps(q);
    g.t[i] = _mm256_sub_ps(q, f);
    const __m256i i0 = _mm256_cvttps_epi32(f);
    const __m256i minus1 = _mm256_set1_epi32(-1), minus2 = _mm256_set1_epi32(-2);
    // lower corner i0 in [0, n - 1]; upper corner i0 + 1 in [0, n - 1].
    lo_ok[i] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(i0, minus1),
                                                    _mm256_cmpgt_epi32(ax[i].n, i0)));
    hi_ok[i] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(i0, minus2),
                                                    _mm256_cmpgt_epi32(ax[i].n_minus_1, i0)));
    lo_off[i] = ax[i].stride_s == 1 ? i0 : _mm256_mullo_epi32(i0, ax[i].stride);
    hi_off[i] = _mm256_add_epi32(lo_off[i], ax[i].stride);
  }
  const __m256 live = _mm256_andnot_ps(nan, _mm256_castsi256_ps(tail));
  for (int k = 0; k < Lanes<NDIM>::K; ++k) {
    __m256i off = _mm256_setzero_si256();
    __m256 ok = live;
    for (int i = 0; i < NDIM; ++i) {
      const bool up = warp::corner_bit<NDIM>(k, i);
      off = _mm256_add_epi32(off, up ? hi_off[i] : lo_off[i]);
      ok = _mm256_and_ps(ok, up ? hi_ok[i] : lo_ok[i]);
    }
    g.off[k] = off;
    g.valid[k] = ok;
  }
}

// Multilinear interpolation of 2**N corner vectors v (corner order of warp::corner_bit) with
// upper-corner weights t; v is overwritten.
template <int N>
MRUS_AVX2 inline __m256 lerp(__m256* v, const __m256* t) {
  int n = 1 << N;
  for (int i = N - 1; i >= 0; --i) {
    n >>= 1;
    for (int j = 0; j < n; ++j) {
      v[j] = _mm256_fmadd_ps(t[i], _mm256_sub_ps(v[2 * j + 1], v[2 * j]), v[2 * j]);
    }
  }
  return v[0];
}

template <int NDIM>
MRUS_AVX2 inline void gather_corners(const Lanes<NDIM>& g, const float* img, __m256* v) {
  for (int k = 0; k < Lanes<NDIM>::K; ++k) {
    v[k] = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), img, g.off[k], g.valid[k], 4);
  }
}

// Interpolation weight of every corner (0 for invalid corners).
template <int NDIM>
MRUS_AVX2 inline void corner_weights(const Lanes<NDIM>& g, __m256* w) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 s[NDIM];
  for (int i = 0; i < NDIM; ++i) s[i] = _mm256_sub_ps(one, g.t[i]);
  for (int k = 0; k < Lanes<NDIM>::K; ++k) {
    __m256 wk = g.valid[k];
    wk = _mm256_and_ps(wk, warp::corner_bit<NDIM>(k, 0) ? g.t[0] : s[0]);
    for (int i = 1; i < NDIM; ++i) wk = _mm256_mul_ps(wk, warp::corner_bit<NDIM>(k, i) ? g.t[i] : s[i]);
    w[k] = wk;
  }
}

// d/dp_i of the interpolant of corner values v, for every axis i (0 along a clamped axis).
template <int NDIM>
MRUS_AVX2 inline void lerp_gradient(const Lanes<NDIM>& g, const __m256* v, __m256* grad) {
  constexpr int H = (1 << NDIM) / 2;
  for (int i = 0; i < NDIM; ++i) {
    __m256 d[H];
    __m256 t[NDIM > 1 ? NDIM - 1 : 1];
    const int shift = NDIM - 1 - i;  // corner bit of axis i
    for (int h = 0; h < H; ++h) {
      const int low = h & ((1 << shift) - 1);
      const int k0 = ((h >> shift) << (shift + 1)) | low;
      d[h] = _mm256_sub_ps(v[k0 | (1 << shift)], v[k0]);
    }
    int m = 0;
    for (int a = 0; a < NDIM; ++a) {
      if (a != i) t[m++] = g.t[a];
    }
    grad[i] = _mm256_and_ps(g.gate[i], lerp<NDIM - 1>(d, t));
  }
}

// All ones in the lanes whose bit is set in bits.
MRUS_AVX2 inline __m256i lane_bits(int bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), sel), sel);
}

// Lanes (bits) where x is inf or NaN: x - x is NaN there.
MRUS_AVX2 inline int non_finite_lanes(__m256 x) {
  return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));
}

// warp.h forward_voxel's sum_k w_k * v_k over the valid corners, term by term.
template <int NDIM>
MRUS_AVX2 inline __m256 sample_terms(const Lanes<NDIM>& g, const float* img) {
  __m256 w[Lanes<NDIM>::K], v[Lanes<NDIM>::K];
  corner_weights<NDIM>(g, w);
  gather_corners<NDIM>(g, img, v);
  __m256 acc = _mm256_setzero_ps();
  for (int k = 0; k < Lanes<NDIM>::K; ++k) acc = _mm256_add_ps(acc, _mm256_mul_ps(w[k], v[k]));
  return acc;
}

// warp.h corner_gradient for every axis: sum_k c_k * d w_k / d p_i term by term, 0 along a
// clamped axis.
template <int NDIM>
MRUS_AVX2 inline void gradient_terms(const Lanes<NDIM>& g, const __m256* c, __m256* grad) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int i = 0; i < NDIM; ++i) {
    __m256 d = _mm256_setzero_ps();
    for (int k = 0; k < Lanes<NDIM>::K; ++k) {
      __m256 dw = warp::corner_bit<NDIM>(k, i) ? one : _mm256_set1_ps(-1.0f);
      for (int j = 0; j < NDIM; ++j) {
        if (j == i) continue;
        dw = _mm256_mul_ps(dw, warp::corner_bit<NDIM>(k, j) ? g.t[j] : _mm256_sub_ps(one, g.t[j]));
      }
      d = _mm256_add_ps(d, _mm256_mul_ps(c[k], dw));
    }
    grad[i] = _mm256_and_ps(g.gate[i], d);
  }
}

// The row kernels. Arguments as the portable row loops of warp.cpp: a are the sizes, rows
// [r0, r1) of the output (rows along the last spatial axis), every batch item.
template <int NDIM>
struct RowKernels {
  static constexpr int K = 1 << NDIM;

  const warp::WarpArgs& a;
  AxisConst ax[NDIM];
  int64_t W, n_out, n_in;

  MRUS_AVX2 explicit RowKernels(const warp::WarpArgs& args) : a(args) {
    const bool border = a.padding == int(Padding::BORDER);
    int32_t s = 1;
    for (int i = NDIM - 1; i >= 0; --i) {
      const int32_t n = static_cast<int32_t>(a.in_size[i]);
      ax[i].lo = _mm256_set1_ps(border ? 0.0f : -2.0f);
      ax[i].hi = _mm256_set1_ps(border ? float(n - 1) : float(n + 1));
      ax[i].n = _mm256_set1_epi32(n);
      ax[i].n_minus_1 = _mm256_set1_epi32(n - 1);
      ax[i].stride = _mm256_set1_epi32(s);
      ax[i].stride_s = s;
      s *= n;
    }
    W = a.out_size[NDIM - 1];
    n_out = a.n_out();
    n_in = a.n_in();
  }

  // Sampling points of the lane group at voxels [x0, x0 + len) of the row at flat voxel n0
  // (outer coordinates xo), displacement u of one batch item.
  MRUS_AVX2 void points(const float* u, const int64_t* xo, int64_t n0, int64_t x0, int len,
                        __m256i tail, __m256* p) const {
    const float* ur = u + n0 + x0;
    for (int i = 0; i < NDIM - 1; ++i) {
      p[i] = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(xo[i])), load(ur + i * n_out, len, tail));
    }
    const __m256 x = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(x0)),
                                   _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
    p[NDIM - 1] = _mm256_add_ps(x, load(ur + (NDIM - 1) * n_out, len, tail));
  }

  // Calls f(xo, n0, x0, len, tail) for every lane group of output rows [r0, r1): the row
  // starts at flat voxel n0 with outer coordinates xo, the group covers its voxels
  // [x0, x0 + len), tail is the mask of the len live lanes.
  template <typename F>
  MRUS_AVX2 void groups(int64_t r0, int64_t r1, F&& f) const {
    int64_t xo[NDIM];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n0 = row * W;
      warp::voxel_coords<NDIM>(a, n0, xo);
      for (int64_t x0 = 0; x0 < W; x0 += L) {
        const int len = static_cast<int>(std::min<int64_t>(L, W - x0));
        f(xo, n0, x0, len, tail_mask(len));
      }
    }
  }

  MRUS_AVX2 void forward(const float* image, const float* ddf, float* out, int64_t r0,
                         int64_t r1) const {
    const bool add = a.flags & warp::ADD_DDF;
    const __m256 qnan = _mm256_set1_ps(NAN);
    Lanes<NDIM> g;
    groups(r0, r1, [&](const int64_t* xo, int64_t n0, int64_t x0, int len, __m256i tail) MRUS_AVX2 {
      for (int64_t b = 0; b < a.B; ++b) {
        const float* u = ddf + (a.Bd > 1 ? b : 0) * NDIM * n_out;
        if (b == 0 || a.Bd > 1) {
          __m256 p[NDIM];
          points(u, xo, n0, x0, len, tail, p);
          geometry<NDIM>(p, ax, tail, g);
        }
        const float* img = image + (a.Bi > 1 ? b : 0) * a.C * n_in;
        float* o = out + b * a.C * n_out + n0 + x0;
        for (int64_t c = 0; c < a.C; ++c) {
          __m256 v[K];
          gather_corners<NDIM>(g, img + c * n_in, v);
          __m256 s = lerp<NDIM>(v, g.t);
          // Rare (inf or NaN in the image, or overflow): those lanes term by term.
          const int redo = non_finite_lanes(s) & ~_mm256_movemask_ps(g.nan);
          if (redo) {
            const __m256 lanes = _mm256_castsi256_ps(lane_bits(redo));
            s = _mm256_blendv_ps(s, sample_terms<NDIM>(g, img + c * n_in), lanes);
          }
          if (add) s = _mm256_add_ps(s, load(u + c * n_out + n0 + x0, len, tail));
          store(o + c * n_out, _mm256_blendv_ps(s, qnan, g.nan), len, tail);
        }
      }
    });
  }

  // Image gradient into gimg (null: not needed); ddf gradient into grad_ddf, or with
  // DDF_GRAD_SCATTER added into gimg at the ddf's own flat index (null: not needed).
  MRUS_AVX2 void backward(const float* grad_out, const float* image, const float* ddf,
                          float* gimg, float* grad_ddf, int64_t r0, int64_t r1) const {
    const bool via_scatter = a.flags & warp::DDF_GRAD_SCATTER;
    const bool add = a.flags & warp::ADD_DDF;
    const bool need_image = gimg != nullptr;
    float* ddf_dst = via_scatter ? gimg : grad_ddf;
    const bool need_ddf = ddf_dst != nullptr;
    Lanes<NDIM> g;
    __m256 w[K];
    alignas(32) int32_t offs[K][L];
    int valid_bits[K];
    for (int k = 0; k < K; ++k) {
      w[k] = _mm256_setzero_ps();
      valid_bits[k] = 0;
    }
    alignas(32) float wg[K][L];
    groups(r0, r1, [&](const int64_t* xo, int64_t n0, int64_t x0, int len, __m256i tail) MRUS_AVX2 {
      __m256 gu[NDIM];
      for (int i = 0; i < NDIM; ++i) gu[i] = _mm256_setzero_ps();
      for (int64_t b = 0; b < a.B; ++b) {
        const int64_t bi = a.Bi > 1 ? b : 0, bd = a.Bd > 1 ? b : 0;
        const float* u = ddf + bd * NDIM * n_out;
        if (b == 0 || a.Bd > 1) {
          __m256 p[NDIM];
          points(u, xo, n0, x0, len, tail, p);
          geometry<NDIM>(p, ax, tail, g);
          if (need_image) {
            corner_weights<NDIM>(g, w);
            for (int k = 0; k < K; ++k) {
              _mm256_store_si256(reinterpret_cast<__m256i*>(offs[k]), g.off[k]);
              valid_bits[k] = _mm256_movemask_ps(g.valid[k]);
            }
          }
        }
        const float* gb = grad_out + b * a.C * n_out + n0 + x0;
        __m256 corner[K];
        for (int k = 0; k < K; ++k) corner[k] = _mm256_setzero_ps();
        for (int64_t c = 0; c < a.C; ++c) {
          const __m256 gc = load(gb + c * n_out, len, tail);
          const int64_t vol = (bi * a.C + c) * n_in;
          if (need_ddf) {
            __m256 v[K];
            gather_corners<NDIM>(g, image + vol, v);
            for (int k = 0; k < K; ++k) corner[k] = _mm256_fmadd_ps(gc, v[k], corner[k]);
          }
          if (need_image) {
            for (int k = 0; k < K; ++k) _mm256_store_ps(wg[k], _mm256_mul_ps(w[k], gc));
            // A scatter: serial, corner by corner (the corners of neighbouring voxels
            // coincide, so consecutive adds of one corner never hit the same element).
            float* gi = gimg + vol;
            for (int k = 0; k < K; ++k) {
              const int32_t* ok = offs[k];
              const float* wk = wg[k];
              if (valid_bits[k] == 0xff) {
                for (int j = 0; j < L; ++j) gi[ok[j]] += wk[j];
              } else {
                for (int bits = valid_bits[k]; bits; bits &= bits - 1) {
                  const int j = __builtin_ctz(bits);
                  gi[ok[j]] += wk[j];
                }
              }
            }
          }
        }
        if (need_ddf) {
          __m256 d[NDIM];
          lerp_gradient<NDIM>(g, corner, d);
          int redo = 0;  // rare: inf or NaN reached a corner sum, or overflow
          for (int i = 0; i < NDIM; ++i) redo |= non_finite_lanes(d[i]);
          redo &= ~_mm256_movemask_ps(g.nan);
          if (redo) {
            __m256 e[NDIM];
            gradient_terms<NDIM>(g, corner, e);
            const __m256 lanes = _mm256_castsi256_ps(lane_bits(redo));
            for (int i = 0; i < NDIM; ++i) d[i] = _mm256_blendv_ps(d[i], e[i], lanes);
          }
          for (int i = 0; i < NDIM; ++i) gu[i] = _mm256_add_ps(gu[i], _mm256_andnot_ps(g.nan, d[i]));
        }
        if (add) {  // d out[c] / d ddf[c] = 1, NaN sample or not
          for (int i = 0; i < NDIM; ++i) gu[i] = _mm256_add_ps(gu[i], load(gb + i * n_out, len, tail));
        }
        if (need_ddf && (a.Bd > 1 || b == a.B - 1)) {
          float* dst = ddf_dst + bd * NDIM * n_out + n0 + x0;
          for (int i = 0; i < NDIM; ++i) {
            float* di = dst + i * n_out;
            store(di, via_scatter ? _mm256_add_ps(load(di, len, tail), gu[i]) : gu[i], len, tail);
            gu[i] = _mm256_setzero_ps();
          }
        }
      }
    });
  }
};

}  // namespace avx2
}  // namespace cpu
}  // namespace mrus

#endif  // MRUS_HAVE_AVX2_KERNELS
