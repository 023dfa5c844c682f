// Per-voxel math of the warp operator, shared by csrc/cpu/warp.cpp and csrc/cuda/warp.cu.
//
// Conventions (DESIGN.md): voxel centres at integer indices; the displacement is in voxel
// units with component i along spatial axis i; out(x) = image(x + u(x)). "zeros" padding
// interpolates against zero-valued voxels outside the image (grid_sample's zeros); "border"
// clamps the coordinate into [0, n - 1] first (gradient 0 where it was clamped).
// A NaN coordinate gives NaN in every channel and no gradient contribution.
//
// Non-finite values follow the reference (mrus_kernels/reference.py, plain PyTorch) term by
// term: the output is sum_k w_k * v_k over the corners inside the image, so an infinite
// corner value gives inf where its weight is positive and NaN (inf * 0) where it is exactly
// 0; the displacement gradient along axis i is sum_k c_k * d w_k / d p_i, with c_k the sum
// over channels of grad_out * v_k (a padding corner counts as v_k = 0, so a non-finite
// grad_out reaches c_k as 0 * inf = NaN), and is exactly 0 where the coordinate was clamped
// (the reference's clamp passes no gradient there, not even NaN). "zeros" padding bounds the
// coordinate to [-2, n + 1], a clamp too. The CPU row loops interpolate by successive lerps
// (fast) and redo in this term-by-term form only the voxels whose lerp is not finite.
#pragma once

#include "common.h"

namespace mrus {
namespace warp {

// Variants of the warp kernels used by compose / integrate_velocity (flags of WarpArgs).
enum WarpFlags : int {
  // out[b, c] = ddf[b, c] + sampled image[b, c] (C == ndim, same grid): the composition
  // v(x) + u(x + v(x)) with image = u and ddf = v, in one pass.
  ADD_DDF = 1,
  // Backward: the ddf gradient goes through the scatter functor at the ddf element's flat
  // index instead of into grad_ddf: image and ddf are the same tensor (u ∘ u, one step of
  // scaling and squaring), so both gradients land in one buffer.
  DDF_GRAD_SCATTER = 2,
};

// Everything a warp kernel needs besides the pointers. All tensors are contiguous:
//   image [Bi, C, *in_size], ddf [Bd, ndim, *out_size], out [B, C, *out_size],
//   B = max(Bi, Bd), Bi and Bd each 1 (broadcast) or B.
struct WarpArgs {
  int dtype = 0;  // DType
  int ndim = 3;
  int64_t B = 1, Bi = 1, Bd = 1, C = 1;
  int64_t in_size[3] = {1, 1, 1};
  int64_t out_size[3] = {1, 1, 1};
  int mode = 0;     // Interp
  int padding = 0;  // Padding
  int flags = 0;    // WarpFlags
  int num_threads = 1;  // CPU only

  MRUS_HD int64_t n_in() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= in_size[i];
    return n;
  }
  MRUS_HD int64_t n_out() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= out_size[i];
    return n;
  }
};

// Linear sampling along one axis.
// x - x is 0 for a finite x and NaN for inf or NaN (no <cmath> classification: the same
// code on the host, the device and in vector loops).
template <typename T>
MRUS_HD bool is_finite(T x) {
  return x - x == T(0);
}

template <typename T>
struct AxisLinear {
  int64_t i0;   // lower corner index (may be outside [0, n))
  T t;          // fractional part: weight of the upper corner
  bool inside;  // the coordinate was not clamped: the gradient along this axis passes
  bool v0, v1;  // corners inside the image
};

template <typename T>
MRUS_HD AxisLinear<T> axis_linear(T p, int64_t n, int padding) {
  AxisLinear<T> a;
  // Border: clamp into [0, n - 1]. Zeros: beyond one voxel outside both corners are
  // padding; bounding p to [-2, n + 1] keeps the integer conversion defined (p may be huge
  // or infinite) without changing the value.
  const T lo = padding == int(Padding::BORDER) ? T(0) : T(-2);
  const T hi = padding == int(Padding::BORDER) ? T(n - 1) : T(n + 1);
  a.inside = p >= lo && p <= hi;
  p = p < lo ? lo : (p > hi ? hi : p);
  const T f = floor(p);
  a.t = p - f;
  a.i0 = static_cast<int64_t>(f);
  a.v0 = a.i0 >= 0 && a.i0 < n;
  a.v1 = a.i0 + 1 >= 0 && a.i0 + 1 < n;
  return a;
}

// The 2**NDIM corners of linear interpolation at one point.
template <int NDIM, typename T>
struct LinearStencil {
  static constexpr int K = 1 << NDIM;
  AxisLinear<T> ax[NDIM];
  int64_t off[K];  // flat offset of the corner inside one [*in_size] volume
  T w[K];          // interpolation weight
  bool valid[K];   // corner inside the image (invalid corners are skipped, never read)
};

// Corner k has bit (NDIM - 1 - i) set when it takes the upper index along axis i.
template <int NDIM>
MRUS_HD int corner_bit(int k, int i) {
  return (k >> (NDIM - 1 - i)) & 1;
}

template <int NDIM, typename T>
MRUS_HD void make_linear(const T* p, const int64_t* size, int padding, LinearStencil<NDIM, T>& s) {
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) s.ax[i] = axis_linear<T>(p[i], size[i], padding);
MRUS_UNROLL
  for (int k = 0; k < LinearStencil<NDIM, T>::K; ++k) {
    int64_t off = 0;
    T w = T(1);
    bool v = true;
MRUS_UNROLL
    for (int i = 0; i < NDIM; ++i) {
      const int bit = corner_bit<NDIM>(k, i);
      const AxisLinear<T>& a = s.ax[i];
      v = v && (bit ? a.v1 : a.v0);
      w *= bit ? a.t : T(1) - a.t;
      off = off * size[i] + (a.i0 + bit);
    }
    s.off[k] = off;
    s.w[k] = w;
    s.valid[k] = v;
  }
}

// d w_k / d p_i of the interpolation weight of corner k, t[j] the upper weight along axis j
// (the clamp is the caller's: the gradient is 0 along a clamped axis).
template <int NDIM, typename T>
MRUS_HD T corner_dweight(const T* t, int k, int i) {
  T d = corner_bit<NDIM>(k, i) ? T(1) : T(-1);
MRUS_UNROLL
  for (int j = 0; j < NDIM; ++j) {
    if (j != i) d *= corner_bit<NDIM>(k, j) ? t[j] : T(1) - t[j];
  }
  return d;
}

// sum_k c[k] * d w_k / d p_i term by term (the reference's form: an infinite c[k] gives NaN
// where the rest of its weight is 0), and exactly 0 where axis i was clamped.
template <int NDIM, typename T>
MRUS_HD T corner_gradient(const T* t, const T* c, bool inside, int i) {
  T d = T(0);
MRUS_UNROLL
  for (int k = 0; k < (1 << NDIM); ++k) d += c[k] * corner_dweight<NDIM, T>(t, k, i);
  return inside ? d : T(0);
}

// Whether coordinate p lies inside the clamp range of nearest sampling (as axis_linear).
template <typename T>
MRUS_HD bool nearest_inside(T p, int64_t n, int padding) {
  const T lo = padding == int(Padding::BORDER) ? T(0) : T(-2);
  const T hi = padding == int(Padding::BORDER) ? T(n - 1) : T(n + 1);
  return p >= lo && p <= hi;
}

// Nearest voxel; returns false when it lies outside the image (zeros padding).
template <int NDIM, typename T>
MRUS_HD bool nearest_offset(const T* p, const int64_t* size, int padding, int64_t& off) {
  off = 0;
  bool v = true;
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) {
    T q = p[i];
    const T hi = T(size[i] - 1);
    if (padding == int(Padding::BORDER)) {
      q = q < T(0) ? T(0) : (q > hi ? hi : q);
    } else {
      q = q < T(-2) ? T(-2) : (q > hi + T(2) ? hi + T(2) : q);
    }
    const int64_t idx = static_cast<int64_t>(round_half_even(q));
    v = v && idx >= 0 && idx < size[i];
    off = off * size[i] + idx;
  }
  return v;
}

// Integer coordinates of output voxel n (row-major over out_size). The CPU loops walk the
// voxels in order and step the coordinates with next_coords instead (no divisions). On a
// GPU a 64-bit division is a long software sequence: grids below 2**32 voxels (all real
// ones) take the 32-bit divisions.
template <int NDIM>
MRUS_HD void voxel_coords(const WarpArgs& a, int64_t n, int64_t* x) {
  if (a.n_out() <= int64_t(0xffffffffu)) {
    uint32_t m = static_cast<uint32_t>(n);
MRUS_UNROLL
    for (int i = NDIM - 1; i >= 0; --i) {
      const uint32_t s = static_cast<uint32_t>(a.out_size[i]);
      x[i] = static_cast<int64_t>(m % s);
      m /= s;
    }
    return;
  }
MRUS_UNROLL
  for (int i = NDIM - 1; i >= 0; --i) {
    x[i] = n % a.out_size[i];
    n /= a.out_size[i];
  }
}

template <int NDIM>
MRUS_HD void next_coords(const WarpArgs& a, int64_t* x) {
MRUS_UNROLL
  for (int i = NDIM - 1; i >= 0; --i) {
    if (++x[i] < a.out_size[i] || i == 0) return;
    x[i] = 0;
  }
}

// Sampling point x + u(x) of output voxel n (coordinates x) for batch item b; returns true
// if it is NaN.
template <int NDIM, typename scalar_t, typename T>
MRUS_HD bool sample_point(const WarpArgs& a, const scalar_t* ddf, int64_t b, int64_t n,
                          const int64_t* x, T* p) {
  const int64_t n_out = a.n_out();
  const scalar_t* u = ddf + (a.Bd > 1 ? b : 0) * NDIM * n_out + n;
  bool nan = false;
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) {
    p[i] = T(x[i]) + static_cast<T>(u[i * n_out]);
    nan = nan || is_nan(p[i]);
  }
  return nan;
}

// Forward for output voxel n (coordinates x) of batch item b: every channel from one coordinate computation.
template <int NDIM, typename scalar_t, typename T>
MRUS_HD void forward_voxel(const WarpArgs& a, const scalar_t* image, const scalar_t* ddf,
                           scalar_t* out, int64_t b, int64_t n, const int64_t* x) {
  const int64_t n_in = a.n_in(), n_out = a.n_out();
  const scalar_t* img = image + (a.Bi > 1 ? b : 0) * a.C * n_in;
  scalar_t* o = out + b * a.C * n_out + n;
  T p[NDIM];
  if (sample_point<NDIM, scalar_t, T>(a, ddf, b, n, x, p)) {
    for (int64_t c = 0; c < a.C; ++c) o[c * n_out] = static_cast<scalar_t>(T(NAN));
    return;
  }
  if (a.mode == int(Interp::NEAREST)) {
    int64_t off;
    const bool v = nearest_offset<NDIM, T>(p, a.in_size, a.padding, off);
    for (int64_t c = 0; c < a.C; ++c) {
      o[c * n_out] = v ? img[c * n_in + off] : static_cast<scalar_t>(T(0));
    }
    return;
  }
  LinearStencil<NDIM, T> s;
  make_linear<NDIM, T>(p, a.in_size, a.padding, s);
  const scalar_t* u = ddf + (a.Bd > 1 ? b : 0) * NDIM * n_out + n;
  const bool add = a.flags & ADD_DDF;
  for (int64_t c = 0; c < a.C; ++c) {
    const scalar_t* ic = img + c * n_in;
    T acc = add ? static_cast<T>(u[c * n_out]) : T(0);
MRUS_UNROLL
    for (int k = 0; k < LinearStencil<NDIM, T>::K; ++k) {
      if (s.valid[k]) acc += s.w[k] * static_cast<T>(ic[s.off[k]]);
    }
    o[c * n_out] = static_cast<scalar_t>(acc);
  }
}

// Backward for output voxel n (coordinates x), all batch items (so that a broadcast ddf still has a single
// writer). scatter(index, value) adds value to the image gradient at flat index
// b_img * C * n_in + c * n_in + offset; grad_ddf may be null (not needed). With
// need_image false no image scatter happens. With DDF_GRAD_SCATTER the ddf gradient is
// scattered too (at its own flat index), and grad_ddf is ignored.
template <int NDIM, typename scalar_t, typename T, typename Scatter>
MRUS_HD void backward_voxel(const WarpArgs& a, const scalar_t* grad_out, const scalar_t* image,
                            const scalar_t* ddf, bool need_image, scalar_t* grad_ddf,
                            Scatter& scatter, int64_t n, const int64_t* x) {
  constexpr int K = LinearStencil<NDIM, T>::K;
  const int64_t n_in = a.n_in(), n_out = a.n_out();
  const bool via_scatter = a.flags & DDF_GRAD_SCATTER;
  const bool need_ddf = grad_ddf != nullptr || via_scatter;
  T gu[NDIM];
MRUS_UNROLL
  for (int i = 0; i < NDIM; ++i) gu[i] = T(0);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t bi = a.Bi > 1 ? b : 0;
    const scalar_t* img = image + bi * a.C * n_in;
    const scalar_t* g = grad_out + b * a.C * n_out + n;
    T p[NDIM];
    const bool nan = sample_point<NDIM, scalar_t, T>(a, ddf, b, n, x, p);
    if (!nan && a.mode == int(Interp::NEAREST)) {
      int64_t off;
      const bool hit = need_image && nearest_offset<NDIM, T>(p, a.in_size, a.padding, off);
      // Rounding has derivative 0: the reference's displacement gradient is
      // (sum_c grad_out) * 0 along every axis it did not clamp, 0 unless grad_out is inf or
      // NaN there.
      T zero = T(0);
      if (hit || need_ddf) {
        for (int64_t c = 0; c < a.C; ++c) {
          const T gc = static_cast<T>(g[c * n_out]);
          if (hit) scatter(bi * a.C * n_in + c * n_in + off, gc);
          zero += gc * T(0);
        }
      }
      if (need_ddf) {
MRUS_UNROLL
        for (int i = 0; i < NDIM; ++i) {
          gu[i] += nearest_inside<T>(p[i], a.in_size[i], a.padding) ? zero : T(0);
        }
      }
    } else if (!nan) {
      LinearStencil<NDIM, T> s;
      make_linear<NDIM, T>(p, a.in_size, a.padding, s);
      // Sum over channels of grad_out * image at each corner; a padding corner reads as 0
      // (never loaded), so that an inf or NaN grad_out reaches it as the reference's 0 * g.
      T corner[K];
MRUS_UNROLL
      for (int k = 0; k < K; ++k) corner[k] = T(0);
      for (int64_t c = 0; c < a.C; ++c) {
        const T gc = static_cast<T>(g[c * n_out]);
        const scalar_t* ic = img + c * n_in;
        const int64_t base = bi * a.C * n_in + c * n_in;
MRUS_UNROLL
        for (int k = 0; k < K; ++k) {
          if (need_ddf) corner[k] += gc * (s.valid[k] ? static_cast<T>(ic[s.off[k]]) : T(0));
          if (need_image && s.valid[k]) scatter(base + s.off[k], s.w[k] * gc);
        }
      }
      if (need_ddf) {
        T t[NDIM];
MRUS_UNROLL
        for (int i = 0; i < NDIM; ++i) t[i] = s.ax[i].t;
MRUS_UNROLL
        for (int i = 0; i < NDIM; ++i) {
          gu[i] += corner_gradient<NDIM, T>(t, corner, s.ax[i].inside, i);
        }
      }
    }
    if (a.flags & ADD_DDF) {  // d out[c] / d ddf[c] = 1, NaN sample or not
MRUS_UNROLL
      for (int i = 0; i < NDIM; ++i) gu[i] += static_cast<T>(g[i * n_out]);
    }
    if (need_ddf && (a.Bd > 1 || b == a.B - 1)) {
      const int64_t d0 = (a.Bd > 1 ? b : 0) * NDIM * n_out + n;
MRUS_UNROLL
      for (int i = 0; i < NDIM; ++i) {
        if (via_scatter) {
          scatter(d0 + i * n_out, gu[i]);
        } else {
          grad_ddf[d0 + i * n_out] = static_cast<scalar_t>(gu[i]);
        }
        gu[i] = T(0);
      }
    }
  }
}

#if !defined(__CUDACC__)
// ---------------------------------------------------------------------------------------
// Row form of linear sampling, used by the CPU loops only (csrc/cpu/warp.cpp). The loops take
// up to kRowBlock consecutive voxels of one output row (the last spatial axis) at a time:
// stage 1 fills a RowLattice with the geometry of every voxel (row_lattice_voxel, selects
// only, so that the loop over voxels vectorises); stage 2 loads the corners (offsets
// clamped into the volume, always safe to read; padding corners select 0 and are never
// used) and interpolates with successive lerps (row_sample), or differentiates
// (lerp_gradient, corner_weights). I is the offset type inside one [*in_size] volume:
// int32_t when it is small enough (cheap SIMD arithmetic), int64_t otherwise.
constexpr int kRowBlock = 64;

template <int NDIM, typename T, typename I>
struct RowLattice {
  static constexpr int K = 1 << NDIM;
  I off[K][kRowBlock];     // flat corner offsets, clamped into the volume
  T t[NDIM][kRowBlock];    // weight of the upper corner per axis
  T gate[NDIM][kRowBlock]; // 1: the coordinate was not clamped (gradient passes), else 0
  int mask[kRowBlock];     // bit k: corner k inside the image; 0 for a NaN sample
  int nan[kRowBlock];      // the sampling point has a NaN coordinate
};

// Geometry of voxel j of a row block at sampling point p (axis_linear without branches).
// A NaN coordinate is replaced by 0 (defined integer conversion) and flagged.
template <int NDIM, typename T, typename I>
inline void row_lattice_voxel(RowLattice<NDIM, T, I>& R, int j, const T* p, const I* size,
                              const I* stride, bool border) {
  I lo_off[NDIM], hi_off[NDIM];
  int v[NDIM];  // bit 0: lower corner inside, bit 1: upper corner inside
  bool nan = false;
  for (int i = 0; i < NDIM; ++i) {
    T q = p[i];
    nan = nan || is_nan(q);
    q = is_nan(q) ? T(0) : q;
    const I n = size[i];
    const T top = T(n - 1);
    // Border: clamp into [0, n - 1]. Zeros: beyond one voxel outside both corners are
    // padding; bounding keeps the conversion defined. Either way a clamp: gradient 0.
    const T lo_b = border ? T(0) : T(-2);
    const T hi_b = border ? top : top + T(2);
    R.gate[i][j] = (q < lo_b || q > hi_b) ? T(0) : T(1);
    q = q < lo_b ? lo_b : (q > hi_b ? hi_b : q);
    // floor through truncation (q is bounded; SSE2 has no vector floor).
    I i0 = static_cast<I>(q);
    T f = static_cast<T>(i0);
    const bool down = f > q;
    i0 = down ? i0 - 1 : i0;
    f = down ? f - T(1) : f;
    R.t[i][j] = q - f;
    const I i1 = i0 + 1;
    const I lo = i0 < 0 ? I(0) : (i0 > n - 1 ? n - 1 : i0);
    const I hi = i1 < 0 ? I(0) : (i1 > n - 1 ? n - 1 : i1);
    lo_off[i] = lo * stride[i];
    hi_off[i] = hi * stride[i];
    v[i] = (i0 >= 0 && i0 < n ? 1 : 0) | (i1 >= 0 && i1 < n ? 2 : 0);
  }
  int mask = 0;
  for (int k = 0; k < RowLattice<NDIM, T, I>::K; ++k) {
    I off = 0;
    int m = 1;
    for (int i = 0; i < NDIM; ++i) {
      const int bit = corner_bit<NDIM>(k, i);
      off += bit ? hi_off[i] : lo_off[i];
      m &= v[i] >> bit;
    }
    R.off[k][j] = off;
    mask |= m << k;
  }
  R.mask[j] = nan ? 0 : mask;
  R.nan[j] = nan ? 1 : 0;
}

// Multilinear interpolation of the 2**NDIM corner values v (corner order of corner_bit) with
// upper-corner weights t; v is overwritten.
template <int NDIM, typename T>
inline T lerp_corners(T* v, const T* t) {
  int n = 1 << NDIM;
  for (int i = NDIM - 1; i >= 0; --i) {
    n >>= 1;
    for (int j = 0; j < n; ++j) v[j] = v[2 * j] + t[i] * (v[2 * j + 1] - v[2 * j]);
  }
  return v[0];
}

// Corner values of voxel j in the volume img (0 for padding corners).
template <int NDIM, typename T, typename I>
inline void row_corners(const RowLattice<NDIM, T, I>& R, int j, const T* img, T* v) {
  const int mask = R.mask[j];
  for (int k = 0; k < RowLattice<NDIM, T, I>::K; ++k) {
    const T val = img[R.off[k][j]];
    v[k] = (mask >> k) & 1 ? val : T(0);
  }
}

// Linear sample of the volume img at voxel j (NaN samples are the caller's business).
template <int NDIM, typename T, typename I>
inline T row_sample(const RowLattice<NDIM, T, I>& R, int j, const T* img) {
  T v[RowLattice<NDIM, T, I>::K], t[NDIM];
  row_corners<NDIM, T, I>(R, j, img, v);
  for (int i = 0; i < NDIM; ++i) t[i] = R.t[i][j];
  return lerp_corners<NDIM, T>(v, t);
}

// d/dp_i of the multilinear interpolant of corner values v at voxel j, for every axis i:
// the lerp over the other axes of the differences along i, 0 along a clamped axis (a
// select, not a product: the reference passes no gradient there, not even NaN).
template <int NDIM, typename T, typename I>
inline void lerp_gradient(const RowLattice<NDIM, T, I>& R, int j, const T* v, T* grad) {
  constexpr int H = (1 << NDIM) / 2;
  for (int i = 0; i < NDIM; ++i) {
    T d[H];
    T t[NDIM > 1 ? NDIM - 1 : 1];
    const int shift = NDIM - 1 - i;  // corner bit of axis i
    for (int h = 0; h < H; ++h) {
      const int low = h & ((1 << shift) - 1);
      const int k0 = ((h >> shift) << (shift + 1)) | low;
      d[h] = v[k0 | (1 << shift)] - v[k0];
    }
    int m = 0;
    for (int a = 0; a < NDIM; ++a) {
      if (a != i) t[m++] = R.t[a][j];
    }
    const T gi = lerp_corners<NDIM - 1, T>(d, t);
    grad[i] = R.gate[i][j] != T(0) ? gi : T(0);
  }
}

// Interpolation weight of every corner of voxel j (0 for padding corners).
template <int NDIM, typename T, typename I>
inline void corner_weights(const RowLattice<NDIM, T, I>& R, int j, T* w) {
  const int mask = R.mask[j];
  for (int k = 0; k < RowLattice<NDIM, T, I>::K; ++k) {
    T wk = T(1);
    for (int i = 0; i < NDIM; ++i) {
      const T t = R.t[i][j];
      wk *= corner_bit<NDIM>(k, i) ? t : T(1) - t;
    }
    w[k] = (mask >> k) & 1 ? wk : T(0);
  }
}

// The term-by-term forms of row_sample and lerp_gradient (those of forward_voxel and
// backward_voxel, file comment), for the voxels whose lerp is not finite: an infinite
// corner makes the lerp's differences NaN where the reference has inf (and finite corners
// far apart can overflow them).
template <int NDIM, typename T, typename I>
inline T row_sample_terms(const RowLattice<NDIM, T, I>& R, int j, const T* img) {
  constexpr int K = RowLattice<NDIM, T, I>::K;
  T w[K];
  corner_weights<NDIM, T, I>(R, j, w);
  T acc = T(0);
  for (int k = 0; k < K; ++k) {
    if ((R.mask[j] >> k) & 1) acc += w[k] * img[R.off[k][j]];
  }
  return acc;
}

template <int NDIM, typename T, typename I>
inline void corner_gradient_terms(const RowLattice<NDIM, T, I>& R, int j, const T* c, T* grad) {
  T t[NDIM];
  for (int i = 0; i < NDIM; ++i) t[i] = R.t[i][j];
  for (int i = 0; i < NDIM; ++i) grad[i] = corner_gradient<NDIM, T>(t, c, R.gate[i][j] != T(0), i);
}
#endif  // !__CUDACC__

}  // namespace warp
}  // namespace mrus
