// OpenMP loops over the shared Sobel math (csrc/include/sobel.h).
//
// Layout of the work: the first spatial axis (D in 3D, H in 2D) is streamed slice by slice;
// a slice (an [H, W] plane in 3D, a row in 2D) is contiguous, so every pass is a loop over
// contiguous memory that the compiler vectorises. One task = one (batch, channel) volume and
// a range of slices; each thread keeps a few slice-sized buffers (L1/L2 resident), never
// anything of the input's size.
//
// Forward, per slice z: P = s-pass and Q = d-pass of slices z-1, z, z+1 along the streamed
// axis, then the in-slice passes give every component (3D: g_D = s_H s_W Q, g_H = d_H s_W P,
// g_W = s_H d_W P; 2D: g_H = s_W Q, g_W = d_W P).
//
// Backward (a gather, single writer per gradient element), per slice z': the per-voxel
// gradient inputs h_i (the upstream components, or upstream * g_i / m recomputed from x, or
// the L1 factors) go through the in-slice adjoint passes into U(z') (the streamed-axis
// component) and V(z') (the others); grad(z) = d^T of U + s^T of V over z-1, z, z+1 along the
// streamed axis. A ring of three slices holds U, V; each task recomputes two slices of halo.
// Extra memory: a few slice-sized buffers per thread; nothing of the input's size.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_utils.h"
#include "launchers.h"
#include "registry.h"

namespace py = pybind11;

namespace mrus {
namespace cpu {
namespace {

using sobel::Mode;
using sobel::Reduction;
using sobel::SobelArgs;
using sobel::Tap3;

template <typename T>
struct Taps {
  Tap3<T> s_fwd, d_fwd, s_adj, d_adj;
  explicit Taps(int padding)
      : s_fwd(sobel::make_tap<T>(false, false, padding)),
        d_fwd(sobel::make_tap<T>(true, false, padding)),
        s_adj(sobel::make_tap<T>(false, true, padding)),
        d_adj(sobel::make_tap<T>(true, true, padding)) {}
};

// Whether the pass t at index m of an axis of length n reads in[m]: the centre tap, or a
// missing neighbour that "replicate" folds onto it. Its coefficient may still be 0 (the
// derivative on a size-1 "replicate" axis: x - x), and then it is multiplied, not skipped,
// as the reference's x - x gives NaN for NaN.
template <typename T>
inline bool reads_centre(const Tap3<T>& t, int64_t m, int64_t n) {
  return t.c0 != T(0) || (m == 0 && t.elo != T(0)) || (m == n - 1 && t.ehi != T(0));
}

// The terms a 1D pass reads at one index: k terms, term j = w[j] * in[idx[j] - 1 + m]
// (idx 0, 1, 2: the neighbours -1, 0, +1). Terms the reference does not read are left out:
// a neighbour outside the axis under zero padding, the derivative's centre. So 0 * NaN
// spreads nothing.
template <typename T>
struct Terms {
  int k = 0;
  int idx[3] = {1, 1, 1};  // entries past k: never read
  T w[3] = {T(0), T(0), T(0)};
};

template <typename T>
Terms<T> terms_at(const Tap3<T>& t, int64_t m, int64_t n) {
  T coef[3];
  sobel::tap_coefs(t, m, n, coef[0], coef[1], coef[2]);
  const bool read[3] = {m > 0, reads_centre(t, m, n), m < n - 1};
  Terms<T> r;
  for (int j = 0; j < 3; ++j) {
    if (read[j]) {
      r.idx[r.k] = j;
      r.w[r.k++] = coef[j];
    }
  }
  return r;
}

// out[i] (+)= the k-term sums, k = 3, 2, 1. The operands are function parameters so that
// __restrict__ holds (GCC ignores it on local pointers) and the loops vectorise without
// alias checks.
template <bool ACC, typename T>
inline void lin3(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y,
                 const T* __restrict__ z, T wx, T wy, T wz, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const T v = wx * x[i] + wy * y[i] + wz * z[i];
    out[i] = ACC ? out[i] + v : v;
  }
}

template <bool ACC, typename T>
inline void lin2(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ y, T wx,
                 T wy, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const T v = wx * x[i] + wy * y[i];
    out[i] = ACC ? out[i] + v : v;
  }
}

template <bool ACC, typename T>
inline void lin1(T* __restrict__ out, const T* __restrict__ x, T wx, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const T v = wx * x[i];
    out[i] = ACC ? out[i] + v : v;
  }
}

// out[i] (+)= sum_j e.w[j] src[e.idx[j]][i] for i < len (src: the neighbours -1, 0, +1 of
// one index along the pass's axis; an unread one may be anything).
template <bool ACC, typename T>
inline void combine3(T* __restrict__ out, const T* const src[3], const Terms<T>& e,
                     int64_t len) {
  const T* const p[3] = {src[e.idx[0]], src[e.idx[1]], src[e.idx[2]]};
  const T* w = e.w;
  switch (e.k) {
    case 3:
      lin3<ACC>(out, p[0], p[1], p[2], w[0], w[1], w[2], len);
      break;
    case 2:
      lin2<ACC>(out, p[0], p[1], w[0], w[1], len);
      break;
    case 1:
      lin1<ACC>(out, p[0], w[0], len);
      break;
    default:
      if (!ACC) std::fill(out, out + len, T(0));
  }
}

// A pass along the rows axis of a [rows, W] slice (stride W) at every row.
template <bool ACC, typename T>
void col_pass(T* __restrict__ out, const T* __restrict__ in, int64_t rows, int64_t W,
              const Tap3<T>& t) {
  // Three kinds of row: first, interior, last (the first may also be the last).
  const Terms<T> first = terms_at(t, 0, rows), last = terms_at(t, rows - 1, rows);
  const Terms<T> inner = terms_at(t, std::min<int64_t>(1, rows - 1), rows);
  for (int64_t r = 0; r < rows; ++r) {
    const T* mid = in + r * W;
    const T* const src[3] = {r > 0 ? mid - W : mid, mid, r < rows - 1 ? mid + W : mid};
    combine3<ACC>(out + r * W, src, r == 0 ? first : (r == rows - 1 ? last : inner), W);
  }
}

// A pass along the contiguous axis (length W) of every row of a [rows, W] slice.
template <typename T>
void row_pass(T* __restrict__ out, const T* __restrict__ in, int64_t rows, int64_t W,
              const Tap3<T>& t) {
  // The end voxels read x[0] / x[W-1] only where the reference does (reads_centre).
  const bool lo = reads_centre(t, 0, W), hi = reads_centre(t, W - 1, W);
  const T e0 = t.c0 + t.elo, e1 = t.c0 + t.ehi, cm = t.cm, c0 = t.c0, cp = t.cp;
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = in + r * W;
    T* y = out + r * W;
    if (W == 1) {
      y[0] = lo ? (e0 + t.ehi) * x[0] : T(0);
      continue;
    }
    y[0] = lo ? e0 * x[0] + cp * x[1] : cp * x[1];
    if (c0 == T(0)) {
      for (int64_t w = 1; w < W - 1; ++w) y[w] = cm * x[w - 1] + cp * x[w + 1];
    } else {
      for (int64_t w = 1; w < W - 1; ++w) y[w] = cm * x[w - 1] + c0 * x[w] + cp * x[w + 1];
    }
    y[W - 1] = hi ? cm * x[W - 2] + e1 * x[W - 1] : cm * x[W - 2];
  }
}

// Slice geometry: the streamed axis has n slices of rows x W elements each.
struct Geometry {
  int64_t n, rows, W, L;
};

template <int NDIM>
Geometry geometry(const SobelArgs& a) {
  if (NDIM == 3) return {a.size[0], a.size[1], a.size[2], a.size[1] * a.size[2]};
  return {a.size[0], 1, a.size[1], a.size[1]};
}

// Per-thread scratch: named slice-sized buffers.
template <typename T>
struct Scratch {
  std::vector<T> data;
  int64_t L = 0;
  Scratch(int64_t count, int64_t slice) : data(static_cast<size_t>(count * slice)), L(slice) {}
  T* operator[](int64_t i) { return data.data() + i * L; }
};

// The Sobel components of slice z of the volume X into g[0..NDIM-1] (P, Q, t: scratch).
template <int NDIM, typename T>
void slice_components(const Geometry& G, const Taps<T>& k, const T* X, int64_t z, T* const* g,
                      T* P, T* Q, T* t) {
  const int64_t L = G.L;
  const T* x0 = X + z * L;
  const T* xm = z > 0 ? x0 - L : x0;
  const T* xp = z < G.n - 1 ? x0 + L : x0;
  const T* const src[3] = {xm, x0, xp};
  combine3<false>(P, src, terms_at(k.s_fwd, z, G.n), L);
  combine3<false>(Q, src, terms_at(k.d_fwd, z, G.n), L);
  if constexpr (NDIM == 3) {
    row_pass(t, P, G.rows, G.W, k.s_fwd);
    col_pass<false>(g[1], t, G.rows, G.W, k.d_fwd);
    row_pass(t, P, G.rows, G.W, k.d_fwd);
    col_pass<false>(g[2], t, G.rows, G.W, k.s_fwd);
    row_pass(t, Q, G.rows, G.W, k.s_fwd);
    col_pass<false>(g[0], t, G.rows, G.W, k.s_fwd);
  } else {
    row_pass(g[0], Q, 1, G.W, k.s_fwd);
    row_pass(g[1], P, 1, G.W, k.d_fwd);
  }
}

// In-slice adjoint passes of the gradient inputs h[0..NDIM-1] of one slice: U gets the
// streamed-axis component, V the sum of the others (t, t2: scratch).
template <int NDIM, typename T>
void slice_adjoint(const Geometry& G, const Taps<T>& k, const T* const* h, T* U, T* V, T* t,
                   T* t2) {
  if constexpr (NDIM == 3) {
    row_pass(t, h[0], G.rows, G.W, k.s_adj);
    col_pass<false>(U, t, G.rows, G.W, k.s_adj);
    col_pass<false>(t, h[1], G.rows, G.W, k.d_adj);
    row_pass(V, t, G.rows, G.W, k.s_adj);
    row_pass(t2, h[2], G.rows, G.W, k.d_adj);
    col_pass<true>(V, t2, G.rows, G.W, k.s_adj);
  } else {
    (void)t;
    (void)t2;
    row_pass(U, h[0], 1, G.W, k.s_adj);
    row_pass(V, h[1], 1, G.W, k.d_adj);
  }
}

template <typename T>
inline T mag(const T* const* g, int ndim, int64_t j, T eps) {
  T s = eps;
  for (int i = 0; i < ndim; ++i) s += g[i][j] * g[i][j];
  return std::sqrt(s);
}

// Slices per task: enough tasks for every thread (a few each, for balance), at least
// `min_chunk` slices per task where the volume allows it (the backward recomputes two halo
// slices per task).
// Threads worth starting: small calls (gradcheck, tests) run on one, with no OpenMP
// start-up or hand-over cost.
int threads_for(const SobelArgs& a) {
  const int64_t useful = std::max<int64_t>(1, a.numel() / 16384);
  return static_cast<int>(std::min<int64_t>(a.num_threads, useful));
}

int64_t chunks_per_volume(const SobelArgs& a, int64_t n, int64_t min_chunk) {
  const int64_t want = (4 * int64_t(a.num_threads) + a.volumes() - 1) / a.volumes();
  return std::max<int64_t>(1, std::min<int64_t>(want, n / min_chunk));
}

// ---------------------------------------------------------------------------- forward

template <int NDIM, typename T>
void forward_impl(const SobelArgs& a, const T* x1, const T* x0, T* out) {
  const Geometry G = geometry<NDIM>(a);
  const Taps<T> k(a.padding);
  const Mode mode = static_cast<Mode>(a.mode);
  const bool l1 = mode == Mode::L1;
  const bool reduce = l1 && a.reduction != int(Reduction::NONE);
  const int64_t vox = a.voxels(), V = a.volumes();
  const int64_t nchunk = chunks_per_volume(a, G.n, 2);
  const int64_t tasks = V * nchunk;
  const T eps = static_cast<T>(a.eps);
  // One partial per slice, summed in slice order afterwards: the result does not depend
  // on the number of threads or the schedule.
  std::vector<double> partial(reduce ? static_cast<size_t>(V * G.n) : 0);

#pragma omp parallel num_threads(threads_for(a))
  {
    Scratch<T> s(3 + 2 * NDIM, G.L);
    T* g1[3] = {s[3], s[4], NDIM == 3 ? s[5] : nullptr};
    T* g0[3] = {s[3 + NDIM], s[4 + NDIM], NDIM == 3 ? s[5 + NDIM] : nullptr};
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t v = task / nchunk, c = task % nchunk;
      const int64_t z_lo = G.n * c / nchunk, z_hi = G.n * (c + 1) / nchunk;
      const T* X1 = x1 + v * vox;
      for (int64_t z = z_lo; z < z_hi; ++z) {
        if (mode == Mode::COMPONENTS) {
          T* gout[3];
          for (int i = 0; i < NDIM; ++i) gout[i] = out + ((v * NDIM + i) * G.n + z) * G.L;
          slice_components<NDIM>(G, k, X1, z, gout, s[0], s[1], s[2]);
          continue;
        }
        slice_components<NDIM>(G, k, X1, z, g1, s[0], s[1], s[2]);
        T* o = out + v * vox + z * G.L;
        if (mode == Mode::MAGNITUDE) {
          for (int64_t j = 0; j < G.L; ++j) o[j] = mag<T>(g1, NDIM, j, eps);
          continue;
        }
        slice_components<NDIM>(G, k, x0 + v * vox, z, g0, s[0], s[1], s[2]);
        if (!reduce) {
          for (int64_t j = 0; j < G.L; ++j) {
            o[j] = std::abs(mag<T>(g1, NDIM, j, eps) - mag<T>(g0, NDIM, j, eps));
          }
          continue;
        }
        double acc = 0.0;
        for (int64_t j = 0; j < G.L; ++j) {
          acc += static_cast<double>(std::abs(mag<T>(g1, NDIM, j, eps) - mag<T>(g0, NDIM, j, eps)));
        }
        partial[v * G.n + z] = acc;
      }
    }
  }
  if (reduce) {
    double total = 0.0;
    for (const double p : partial) total += p;
    if (a.reduction == int(Reduction::MEAN)) total /= static_cast<double>(a.numel());
    out[0] = static_cast<T>(total);
  }
}

// ---------------------------------------------------------------------------- backward

// grad_out: COMPONENTS [B, C, NDIM, *S]; MAGNITUDE and L1-NONE [B, C, *S]; L1-SUM/MEAN a
// scalar. grad_x1 / grad_x0: [B, C, *S] (nullptr: not needed; grad_x0 is L1 only).
template <int NDIM, typename T>
void backward_impl(const SobelArgs& a, const T* grad_out, const T* x1, const T* x0, T* grad_x1,
                   T* grad_x0) {
  const Geometry G = geometry<NDIM>(a);
  const Taps<T> k(a.padding);
  const Mode mode = static_cast<Mode>(a.mode);
  const bool l1 = mode == Mode::L1;
  const bool scalar_up = l1 && a.reduction != int(Reduction::NONE);
  const T up_scalar =
      scalar_up ? static_cast<T>(static_cast<double>(grad_out[0]) *
                                 (a.reduction == int(Reduction::MEAN) ? 1.0 / double(a.numel()) : 1.0))
                : T(0);
  const int64_t vox = a.voxels(), V = a.volumes(), L = G.L;
  const int64_t nchunk = chunks_per_volume(a, G.n, 16);
  const int64_t tasks = V * nchunk;
  const T eps = static_cast<T>(a.eps);
  T* grads[2] = {grad_x1, grad_x0};

#pragma omp parallel num_threads(threads_for(a))
  {
    // Ring of 3 slices x (U, V) x 2 inputs = 12, then P, Q, t, t2, g1[3], g0[3].
    Scratch<T> s(12 + 4 + 2 * NDIM, L);
    T* P = s[12];
    T* Q = s[13];
    T* t = s[14];
    T* t2 = s[15];
    T* g1[3] = {s[16], s[17], NDIM == 3 ? s[18] : nullptr};
    T* g0[3] = {s[16 + NDIM], s[17 + NDIM], NDIM == 3 ? s[18 + NDIM] : nullptr};
    auto U = [&](int input, int64_t z) { return s[(z % 3) * 4 + input * 2]; };
    auto Vb = [&](int input, int64_t z) { return s[(z % 3) * 4 + input * 2 + 1]; };

    // U, V of slice z (0 <= z < n) of volume v for every input that needs a gradient.
    auto prepare = [&](int64_t v, int64_t z) {
      if (mode == Mode::COMPONENTS) {
        const T* h[3];
        for (int i = 0; i < NDIM; ++i) h[i] = grad_out + ((v * NDIM + i) * G.n + z) * L;
        slice_adjoint<NDIM>(G, k, h, U(0, z), Vb(0, z), t, t2);
        return;
      }
      slice_components<NDIM>(G, k, x1 + v * vox, z, g1, P, Q, t);
      if (mode == Mode::MAGNITUDE) {
        const T* up = grad_out + v * vox + z * L;
        for (int64_t j = 0; j < L; ++j) {
          const T r = up[j] / mag<T>(g1, NDIM, j, eps);
          for (int i = 0; i < NDIM; ++i) g1[i][j] *= r;
        }
        slice_adjoint<NDIM>(G, k, g1, U(0, z), Vb(0, z), t, t2);
        return;
      }
      slice_components<NDIM>(G, k, x0 + v * vox, z, g0, P, Q, t);
      const T* up = scalar_up ? nullptr : grad_out + v * vox + z * L;
      for (int64_t j = 0; j < L; ++j) {
        T r1, r0;
        sobel::l1_factors<T>(mag<T>(g1, NDIM, j, eps), mag<T>(g0, NDIM, j, eps),
                             up ? up[j] : up_scalar, r1, r0);
        for (int i = 0; i < NDIM; ++i) {
          g1[i][j] *= r1;
          g0[i][j] *= r0;
        }
      }
      if (grad_x1) slice_adjoint<NDIM>(G, k, g1, U(0, z), Vb(0, z), t, t2);
      if (grad_x0) slice_adjoint<NDIM>(G, k, g0, U(1, z), Vb(1, z), t, t2);
    };

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t v = task / nchunk, c = task % nchunk;
      const int64_t z_lo = G.n * c / nchunk, z_hi = G.n * (c + 1) / nchunk;
      if (z_lo > 0) prepare(v, z_lo - 1);
      prepare(v, z_lo);
      for (int64_t z = z_lo; z < z_hi; ++z) {
        if (z + 1 < G.n) prepare(v, z + 1);
        const int64_t zm = z > 0 ? z - 1 : z, zp = z < G.n - 1 ? z + 1 : z;
        const Terms<T> ed = terms_at(k.d_adj, z, G.n), es = terms_at(k.s_adj, z, G.n);
        for (int input = 0; input < 2; ++input) {
          if (!grads[input]) continue;
          T* out = grads[input] + v * vox + z * L;
          const T* const u[3] = {U(input, zm), U(input, z), U(input, zp)};
          const T* const vv[3] = {Vb(input, zm), Vb(input, z), Vb(input, zp)};
          combine3<false>(out, u, ed, L);
          combine3<true>(out, vv, es, L);
        }
      }
    }
  }
}

template <typename F>
void dispatch(const SobelArgs& a, F&& f) {
  dispatch_ndim_real(a.ndim, a.dtype, "sobel: ndim must be 2 or 3",
                     "sobel (cpu kernels): dtype code must be float32 or float64",
                     std::forward<F>(f));
}

}  // namespace

void sobel_forward(const SobelArgs& a, uintptr_t x, uintptr_t x0, uintptr_t out) {
  dispatch(a, [&](auto nd, auto tv) {
    using T = decltype(tv);
    forward_impl<decltype(nd)::value, T>(a, reinterpret_cast<const T*>(x),
                                         reinterpret_cast<const T*>(x0), reinterpret_cast<T*>(out));
  });
}

void sobel_backward(const SobelArgs& a, uintptr_t grad_out, uintptr_t x, uintptr_t x0,
                    uintptr_t grad_x, uintptr_t grad_x0) {
  dispatch(a, [&](auto nd, auto tv) {
    using T = decltype(tv);
    backward_impl<decltype(nd)::value, T>(
        a, reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(x),
        reinterpret_cast<const T*>(x0), reinterpret_cast<T*>(grad_x), reinterpret_cast<T*>(grad_x0));
  });
}

}  // namespace cpu

namespace {

sobel::SobelArgs sobel_args(int dtype, int ndim, int64_t B, int64_t C,
                            const std::vector<int64_t>& size, int padding, double eps, int mode,
                            int reduction, int num_threads) {
  if (ndim != 2 && ndim != 3) throw std::invalid_argument("sobel: ndim must be 2 or 3");
  if (static_cast<int>(size.size()) != ndim) {
    throw std::invalid_argument("sobel: size must have ndim entries");
  }
  if (mode < 0 || mode > 2) throw std::invalid_argument("sobel: mode must be 0, 1 or 2");
  if (reduction < 0 || reduction > 2) throw std::invalid_argument("sobel: reduction must be 0, 1 or 2");
  if (padding != int(Padding::ZEROS) && padding != int(Padding::BORDER)) {
    throw std::invalid_argument("sobel: padding must be ZEROS or BORDER");
  }
  sobel::SobelArgs a;
  a.dtype = dtype;
  a.ndim = ndim;
  a.B = B;
  a.C = C;
  for (int i = 0; i < ndim; ++i) {
    if (size[i] < 1) throw std::invalid_argument("sobel: sizes must be positive");
    a.size[i] = size[i];
  }
  a.padding = padding;
  a.eps = eps;
  a.mode = mode;
  a.reduction = reduction;
  a.num_threads = cpu::clamp_threads(num_threads);
  return a;
}

}  // namespace

void register_sobel(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "sobel_forward_cpu",
      [](int dtype, int ndim, int64_t B, int64_t C, std::vector<int64_t> size, int padding,
         double eps, int mode, int reduction, int num_threads, uintptr_t x, uintptr_t x0,
         uintptr_t out) {
        cpu::sobel_forward(
            sobel_args(dtype, ndim, B, C, size, padding, eps, mode, reduction, num_threads), x, x0,
            out);
      },
      release);
  m.def(
      "sobel_backward_cpu",
      [](int dtype, int ndim, int64_t B, int64_t C, std::vector<int64_t> size, int padding,
         double eps, int mode, int reduction, int num_threads, uintptr_t grad_out, uintptr_t x,
         uintptr_t x0, uintptr_t grad_x, uintptr_t grad_x0) {
        cpu::sobel_backward(
            sobel_args(dtype, ndim, B, C, size, padding, eps, mode, reduction, num_threads),
            grad_out, x, x0, grad_x, grad_x0);
      },
      release);
  m.def(
      "sobel_partials_cuda",
      [](int ndim, int64_t B, int64_t C, std::vector<int64_t> size) {
        return cuda::sobel_num_partials(sobel_args(0, ndim, B, C, size, 1, 0.0, 2, 1, 1));
      });
  m.def(
      "sobel_forward_cuda",
      [](int dtype, int ndim, int64_t B, int64_t C, std::vector<int64_t> size, int padding,
         double eps, int mode, int reduction, uintptr_t x, uintptr_t x0, uintptr_t out,
         uintptr_t partials, uintptr_t stream) {
        cuda::sobel_forward(sobel_args(dtype, ndim, B, C, size, padding, eps, mode, reduction, 1),
                            x, x0, out, partials, stream);
      },
      release);
  m.def(
      "sobel_backward_cuda",
      [](int dtype, int ndim, int64_t B, int64_t C, std::vector<int64_t> size, int padding,
         double eps, int mode, int reduction, uintptr_t grad_out, uintptr_t x, uintptr_t x0,
         uintptr_t grad_x, uintptr_t grad_x0, uintptr_t scratch, uintptr_t stream) {
        cuda::sobel_backward(sobel_args(dtype, ndim, B, C, size, padding, eps, mode, reduction, 1),
                             grad_out, x, x0, grad_x, grad_x0, scratch, stream);
      },
      release);
}

}  // namespace mrus
