// OpenMP loops of the LNCC operator over the shared per-voxel math (csrc/include/lncc.h).
//
// Box sums are separable running sums (add the voxel entering the window, subtract the one
// leaving it: cost independent of the window), accumulated in double and kept in double
// between passes (the work buffer is float64 for either input dtype), with cc and its
// coefficients computed in double: a flat window's variances are differences of sums of
// ~n I² that cancel, so one float32 rounding of such a sum (or of cc's inputs) leaves
// variances far above eps wherever the background is not 0 (cc ≈ 0.2-0.4 where it is 0).
// Passes:
//   W+H  per (b, d) plane: rows along W into a thread-local plane, then rows of W summed
//        along H into the work buffer S [B, 5, D, H, W];
//   D    per (b, h) slab: rows of W summed along D, consumed at once (cc and its reduction
//        in the forward; coefficient maps, or the final image gradients, in the backward).
// Buffers: S (5 float64 volumes, given by the caller) and per-thread rows/planes; nothing
// else. Only the inputs and the gradients are of the inputs' dtype T.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_utils.h"
#include "launchers.h"
#include "lncc.h"
#include "registry.h"

namespace py = pybind11;

namespace mrus {
namespace cpu {
namespace {

using lncc::LnccArgs;
using lncc::NSUM;

// Running box sum along k of N rows of length L, five channels at once. Row k of channel c
// starts at src + c * scs + k * sks. emit(k, acc) receives the sums of row k: acc[c * L + w].
template <typename T, typename Emit>
void box_rows(const T* src, int64_t scs, int64_t sks, int64_t N, int64_t L, int64_t r,
              double* acc, Emit&& emit) {
  for (int c = 0; c < NSUM; ++c) {
    double* a = acc + c * L;
    std::fill(a, a + L, 0.0);
    const int64_t top = std::min(r, N - 1);
    for (int64_t k = 0; k <= top; ++k) {
      const T* s = src + c * scs + k * sks;
      for (int64_t w = 0; w < L; ++w) a[w] += double(s[w]);
    }
  }
  emit(int64_t(0), static_cast<const double*>(acc));
  for (int64_t k = 1; k < N; ++k) {
    const int64_t in = k + r, out = k - r - 1;
    for (int c = 0; c < NSUM; ++c) {
      double* a = acc + c * L;
      if (in < N) {
        const T* s = src + c * scs + in * sks;
        for (int64_t w = 0; w < L; ++w) a[w] += double(s[w]);
      }
      if (out >= 0) {
        const T* s = src + c * scs + out * sks;
        for (int64_t w = 0; w < L; ++w) a[w] -= double(s[w]);
      }
    }
    emit(k, static_cast<const double*>(acc));
  }
}

// Running box sum along one row of W voxels; value(w, s) writes the five summands of voxel
// w into s. Writes the sums of voxel w to dst[c * dcs + w].
template <typename Value>
void box_row(int64_t W, int64_t r, Value&& value, double* dst, int64_t dcs) {
  double acc[NSUM] = {0, 0, 0, 0, 0}, s[NSUM];
  for (int64_t w = 0; w <= std::min(r, W - 1); ++w) {
    value(w, s);
    for (int c = 0; c < NSUM; ++c) acc[c] += s[c];
  }
  for (int c = 0; c < NSUM; ++c) dst[c * dcs] = acc[c];
  for (int64_t w = 1; w < W; ++w) {
    if (w + r < W) {
      value(w + r, s);
      for (int c = 0; c < NSUM; ++c) acc[c] += s[c];
    }
    if (w - r - 1 >= 0) {
      value(w - r - 1, s);
      for (int c = 0; c < NSUM; ++c) acc[c] -= s[c];
    }
    for (int c = 0; c < NSUM; ++c) dst[c * dcs + w] = acc[c];
  }
}

// Box sums over W and H of one (b, d) plane: value(h, w, s) gives the summands; the sums go
// to dst[c * vol + h * W + w]. tmp: 5 H W, acc: 5 W.
template <typename Value>
void box_plane_wh(const LnccArgs& a, Value&& value, double* dst, int64_t vol, double* tmp,
                  double* acc) {
  const int64_t H = a.H, W = a.W, plane = H * W;
  for (int64_t h = 0; h < H; ++h) {
    box_row(W, a.rW, [&](int64_t w, double* s) { value(h, w, s); }, tmp + h * W, plane);
  }
  box_rows<double>(tmp, plane, W, H, W, a.rH, acc, [&](int64_t h, const double* sums) {
    for (int c = 0; c < NSUM; ++c)
      std::memcpy(dst + c * vol + h * W, sums + c * W, sizeof(double) * W);
  });
}

// S[b, :, d] = box_WH(I, J summands) for every (b, d).
template <typename T>
void sums_wh(const LnccArgs& a, const T* I, const T* J, double* S) {
  const int64_t vol = a.vol(), plane = a.H * a.W;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<double> tmp(static_cast<size_t>(NSUM * plane));
    std::vector<double> acc(static_cast<size_t>(NSUM * a.W));
#pragma omp for schedule(static)
    for (int64_t bd = 0; bd < a.B * a.D; ++bd) {
      const int64_t b = bd / a.D, d = bd % a.D;
      const T* Ip = I + b * vol + d * plane;
      const T* Jp = J + b * vol + d * plane;
      box_plane_wh(
          a, [&](int64_t h, int64_t w, double* s) { lncc::summands(Ip[h * a.W + w], Jp[h * a.W + w], s); },
          S + b * NSUM * vol + d * plane, vol, tmp.data(), acc.data());
    }
  }
}

template <typename T>
void forward_impl(const LnccArgs& a, const T* I, const T* J, const T* mask, double* S, T* num) {
  sums_wh(a, I, J, S);
  const int64_t vol = a.vol(), plane = a.H * a.W, W = a.W;
  std::vector<double> partial(static_cast<size_t>(a.B * a.H));
  const double eps = a.eps, nr = a.nr;
  const int form = a.form;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<double> acc(static_cast<size_t>(NSUM * W));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < a.B * a.H; ++bh) {
      const int64_t b = bh / a.H, h = bh % a.H;
      const int64_t ch = lncc::axis_count(h, a.rH, a.H);
      double part = 0.0;
      box_rows<double>(S + b * NSUM * vol + h * W, vol, plane, a.D, W, a.rD, acc.data(),
                  [&](int64_t d, const double* s) {
                    const int64_t cdh = ch * lncc::axis_count(d, a.rD, a.D);
                    const T* m = mask ? mask + b * vol + d * plane + h * W : nullptr;
                    for (int64_t w = 0; w < W; ++w) {
                      const double n = double(cdh * lncc::axis_count(w, a.rW, W));
                      const double cc = lncc::cc_value<double>(s[w], s[W + w], s[2 * W + w],
                                                               s[3 * W + w], s[4 * W + w], n, eps,
                                                               nr, form);
                      part += m ? double(m[w]) * cc : cc;
                    }
                  });
      partial[bh] = part;
    }
  }
  // Fixed order, independent of the thread count: bitwise reproducible.
  for (int64_t b = 0; b < a.B; ++b) {
    double s = 0.0;
    for (int64_t h = 0; h < a.H; ++h) s += partial[b * a.H + h];
    num[b] = T(s);
  }
}

template <typename T>
void backward_impl(const LnccArgs& a, const T* I, const T* J, const T* mask, const T* scale,
                   double* S, T* gI, T* gJ) {
  sums_wh(a, I, J, S);
  const int64_t vol = a.vol(), plane = a.H * a.W, W = a.W, D = a.D;
  const double eps = a.eps, nr = a.nr;
  const int form = a.form;
  // Coefficient maps K = w ∂cc/∂S, written over S (each (b, h) slab reads only itself; a
  // private copy keeps the leaving rows).
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<double> slab(static_cast<size_t>(NSUM * D * W));
    std::vector<double> acc(static_cast<size_t>(NSUM * W));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < a.B * a.H; ++bh) {
      const int64_t b = bh / a.H, h = bh % a.H;
      double* base = S + b * NSUM * vol + h * W;
      for (int c = 0; c < NSUM; ++c)
        for (int64_t d = 0; d < D; ++d)
          std::memcpy(slab.data() + (c * D + d) * W, base + c * vol + d * plane, sizeof(double) * W);
      const int64_t ch = lncc::axis_count(h, a.rH, a.H);
      box_rows<double>(slab.data(), D * W, W, D, W, a.rD, acc.data(), [&](int64_t d, const double* s) {
        const int64_t cdh = ch * lncc::axis_count(d, a.rD, D);
        const T* m = mask ? mask + b * vol + d * plane + h * W : nullptr;
        double k[NSUM];
        for (int64_t w = 0; w < W; ++w) {
          const double n = double(cdh * lncc::axis_count(w, a.rW, W));
          const double wt = m ? double(scale[b]) * double(m[w]) : double(scale[b]);
          lncc::cc_coeffs<double>(s[w], s[W + w], s[2 * W + w], s[3 * W + w], s[4 * W + w], n,
                                  eps, nr, form, wt, k);
          for (int c = 0; c < NSUM; ++c) base[c * vol + d * plane + w] = k[c];
        }
      });
    }
  }
  // Box sums of K over W and H, in place per (b, d) plane (from a private copy).
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<double> copy(static_cast<size_t>(NSUM * plane)), tmp(static_cast<size_t>(NSUM * plane));
    std::vector<double> acc(static_cast<size_t>(NSUM * W));
#pragma omp for schedule(static)
    for (int64_t bd = 0; bd < a.B * D; ++bd) {
      const int64_t b = bd / D, d = bd % D;
      double* base = S + b * NSUM * vol + d * plane;
      for (int c = 0; c < NSUM; ++c)
        std::memcpy(copy.data() + c * plane, base + c * vol, sizeof(double) * plane);
      const double* K = copy.data();
      box_plane_wh(
          a,
          [&](int64_t h, int64_t w, double* s) {
            for (int c = 0; c < NSUM; ++c) s[c] = K[c * plane + h * W + w];
          },
          base, vol, tmp.data(), acc.data());
    }
  }
  // Box sums over D, combined with I and J into the gradients.
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<double> acc(static_cast<size_t>(NSUM * W));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < a.B * a.H; ++bh) {
      const int64_t b = bh / a.H, h = bh % a.H;
      box_rows<double>(S + b * NSUM * vol + h * W, vol, plane, D, W, a.rD, acc.data(),
                  [&](int64_t d, const double* s) {
                    const int64_t off = b * vol + d * plane + h * W;
                    double kb[NSUM];
                    for (int64_t w = 0; w < W; ++w) {
                      for (int c = 0; c < NSUM; ++c) kb[c] = s[c * W + w];
                      const double i = double(I[off + w]), j = double(J[off + w]);
                      if (gI) gI[off + w] = T(lncc::grad_fixed(kb, i, j));
                      if (gJ) gJ[off + w] = T(lncc::grad_moving(kb, i, j));
                    }
                  });
    }
  }
}

}  // namespace

void lncc_forward(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                  uintptr_t work, uintptr_t num) {
  dispatch_real(int(a.dtype), "lncc cpu kernels take float32 or float64", [&](auto t) {
    using T = decltype(t);
    forward_impl<T>(a, reinterpret_cast<const T*>(fixed), reinterpret_cast<const T*>(moving),
                    reinterpret_cast<const T*>(mask), reinterpret_cast<double*>(work),
                    reinterpret_cast<T*>(num));
  });
}

void lncc_backward(const LnccArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                   uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving) {
  dispatch_real(int(a.dtype), "lncc cpu kernels take float32 or float64", [&](auto t) {
    using T = decltype(t);
    backward_impl<T>(a, reinterpret_cast<const T*>(fixed), reinterpret_cast<const T*>(moving),
                     reinterpret_cast<const T*>(mask), reinterpret_cast<const T*>(scale),
                     reinterpret_cast<double*>(work), reinterpret_cast<T*>(grad_fixed),
                     reinterpret_cast<T*>(grad_moving));
  });
}

}  // namespace cpu

namespace {
lncc::LnccArgs lncc_args(int dtype, int64_t B, std::vector<int64_t> size, int64_t window,
                         double eps, double nr, int form, int num_threads) {
  if (size.size() != 2 && size.size() != 3) throw std::invalid_argument("lncc: size must have 2 or 3 entries");
  if (form != lncc::FORM_MRUS && form != lncc::FORM_MONAI)
    throw std::invalid_argument("lncc: form must be 0 (mrus) or 1 (monai), got " +
                                std::to_string(form));
  lncc::LnccArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.B = B;
  const bool is3d = size.size() == 3;
  a.D = is3d ? size[0] : 1;
  a.H = size[is3d ? 1 : 0];
  a.W = size[is3d ? 2 : 1];
  a.rW = a.rH = window / 2;
  a.rD = is3d ? window / 2 : 0;
  a.eps = eps;
  a.nr = nr;
  a.form = form;
  a.num_threads = cpu::clamp_threads(num_threads);
  return a;
}
}  // namespace

void register_lncc(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  // eps: the mrus form's denominator term, or MONAI's variance floor dr; nr: MONAI's
  // numerator term; form: lncc::FORM_MRUS or FORM_MONAI.
  m.def(
      "lncc_forward_cpu",
      [](int dtype, int64_t B, std::vector<int64_t> size, int64_t window, double eps, double nr,
         int form, int num_threads, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
         uintptr_t work, uintptr_t num) {
        cpu::lncc_forward(lncc_args(dtype, B, size, window, eps, nr, form, num_threads), fixed,
                          moving, mask, work, num);
      },
      release);
  m.def(
      "lncc_backward_cpu",
      [](int dtype, int64_t B, std::vector<int64_t> size, int64_t window, double eps, double nr,
         int form, int num_threads, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
         uintptr_t scale, uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving) {
        cpu::lncc_backward(lncc_args(dtype, B, size, window, eps, nr, form, num_threads), fixed,
                           moving, mask, scale, work, grad_fixed, grad_moving);
      },
      release);
  m.def(
      "lncc_forward_cuda",
      [](int dtype, int64_t B, std::vector<int64_t> size, int64_t window, double eps, double nr,
         int form, uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t work,
         uintptr_t partials, uintptr_t stream) {
        cuda::lncc_forward(lncc_args(dtype, B, size, window, eps, nr, form, 1), fixed, moving,
                           mask, work, partials, stream);
      },
      release);
  m.def(
      "lncc_backward_cuda",
      [](int dtype, int64_t B, std::vector<int64_t> size, int64_t window, double eps, double nr,
         int form, uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t scale,
         uintptr_t work, uintptr_t grad_fixed, uintptr_t grad_moving, uintptr_t stream) {
        cuda::lncc_backward(lncc_args(dtype, B, size, window, eps, nr, form, 1), fixed, moving,
                            mask, scale, work, grad_fixed, grad_moving, stream);
      },
      release);
}

}  // namespace mrus
