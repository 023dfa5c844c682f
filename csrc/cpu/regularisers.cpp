// OpenMP loops of the regularisers (grad_l2, harmonic_energy) over the shared per-voxel
// math (csrc/include/regularisers.h). One pass reads u once; the forward sums per (b, c, d)
// plane in double and adds the planes in fixed order (bitwise reproducible).
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_utils.h"
#include "launchers.h"
#include "registry.h"
#include "regularisers.h"

namespace py = pybind11;

namespace mrus {
namespace cpu {
namespace {

using reg::RegArgs;

// The loops run row by row along W. Neighbour rows outside the volume are replaced by the
// row itself (a zero difference, grad_l2) or by a row of zeros (harmonic), so the inner
// loops have no branches and vectorise; the first and last voxel of a row take the shared
// per-voxel math (csrc/include/regularisers.h).

// Row pointers of the neighbours of row (d, h) of one plane along D and H, or `outside`
// where the neighbour lies outside the volume (and along D for 2D fields).
template <typename T>
struct RowNeighbours {
  const T *dm, *dp, *hm, *hp;
};

template <typename T>
RowNeighbours<T> neighbours(const RegArgs& a, const T* row, int64_t d, int64_t h,
                            const T* outside) {
  const int64_t hw = a.H * a.W;
  const bool three = a.ndim == 3;
  RowNeighbours<T> n;
  n.dm = three && d >= 1 ? row - hw : outside;
  n.dp = three && d <= a.D - 2 ? row + hw : outside;
  n.hm = h >= 1 ? row - a.W : outside;
  n.hp = h <= a.H - 2 ? row + a.W : outside;
  return n;
}

// Energy of plane p (item b, channel c, depth d), summed in double.
template <typename T>
double plane_energy(const RegArgs& a, const T* base, int64_t d) {
  const int64_t W = a.W;
  double s = 0.0;
  if (a.kind == reg::Kind::HARMONIC) {
    if (a.ndim == 3 && (d < 1 || d > a.D - 2)) return 0.0;
    const int nact = a.ndim == 3 ? 3 : 2;
    const T centre = T(2 * nact), axial = a.ndim == 3 ? T(1) : T(0);
    const int64_t hw = a.ndim == 3 ? a.H * W : 0;  // 2D: the D terms read the row itself
    for (int64_t h = 1; h + 1 < a.H; ++h) {
      const T* r = base + h * W;
      double rs = 0.0;
#pragma omp simd reduction(+ : rs)
      for (int64_t w = 1; w < W - 1; ++w) {
        const T l = r[w - 1] + r[w + 1] + r[w - W] + r[w + W] +
                    axial * (r[w - hw] + r[w + hw]) - centre * r[w];
        rs += double(l * l);
      }
      s += rs;
    }
    return s;
  }
  for (int64_t h = 0; h < a.H; ++h) {
    const T* r = base + h * W;
    const RowNeighbours<T> n = neighbours(a, r, d, h, r);
    double sw = 0.0, sh = 0.0, sd = 0.0;
#pragma omp simd reduction(+ : sw)
    for (int64_t w = 0; w < W - 1; ++w) {
      const T t = r[w + 1] - r[w];
      sw += double(t * t);
    }
#pragma omp simd reduction(+ : sh, sd)
    for (int64_t w = 0; w < W; ++w) {
      const T th = n.hp[w] - r[w], td = n.dp[w] - r[w];
      sh += double(th * th);
      sd += double(td * td);
    }
    s += a.wt[2] * sw + a.wt[1] * sh + a.wt[0] * sd;
  }
  return s;
}

template <typename T>
void forward_impl(const RegArgs& a, const T* u, T* out) {
  const int64_t planes = a.B * a.C * a.D, plane = a.H * a.W;
  std::vector<double> partial(static_cast<size_t>(planes));
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t p = 0; p < planes; ++p) partial[p] = plane_energy<T>(a, u + p * plane, p % a.D);
  const int64_t per_item = a.C * a.D;
  for (int64_t b = 0; b < a.B; ++b) {
    double s = 0.0;
    for (int64_t p = 0; p < per_item; ++p) s += partial[b * per_item + p];
    out[b] = T(s);
  }
}

// grad_l2: ∂E/∂u = 2 Σ_i wt_i ((u − u_{−i}) − (u_{+i} − u)), terms outside the volume 0.
template <typename T>
void grad_l2_backward_plane(const RegArgs& a, const T* base, T sc, T* g, int64_t d) {
  const int64_t W = a.W;
  const T w0 = T(2 * a.wt[0]) * sc, w1 = T(2 * a.wt[1]) * sc, w2 = T(2 * a.wt[2]) * sc;
  for (int64_t h = 0; h < a.H; ++h) {
    const T* r = base + h * W;
    T* gr = g + h * W;
    const RowNeighbours<T> n = neighbours(a, r, d, h, r);
#pragma omp simd
    for (int64_t w = 1; w < W - 1; ++w) {
      const T u0 = r[w];
      gr[w] = w2 * (T(2) * u0 - r[w - 1] - r[w + 1]) + w1 * (T(2) * u0 - n.hm[w] - n.hp[w]) +
              w0 * (T(2) * u0 - n.dm[w] - n.dp[w]);
    }
    const int64_t ends[2] = {0, W - 1};
    for (int e = 0; e < (W > 1 ? 2 : 1); ++e) {
      const int64_t w = ends[e];
      const int64_t x[3] = {d, h, w};
      gr[w] = sc * reg::voxel_grad<T>(a, r + w, x);
    }
  }
}

// harmonic: ∂E/∂u = 2 (∇² L)(x), L the Laplacian of u on interior voxels, 0 elsewhere
// (and outside the volume). L is computed once into `lap` (the whole tensor).
template <typename T>
void harmonic_laplacian_plane(const RegArgs& a, const T* base, T* lap, int64_t d) {
  const int64_t W = a.W, plane = a.H * W;
  const bool plane_in = a.ndim != 3 || (d >= 1 && d <= a.D - 2);
  const int nact = a.ndim == 3 ? 3 : 2;
  const T centre = T(2 * nact), axial = a.ndim == 3 ? T(1) : T(0);
  const int64_t hw = a.ndim == 3 ? plane : 0;
  for (int64_t h = 0; h < a.H; ++h) {
    const T* r = base + h * W;
    T* l = lap + h * W;
    if (!plane_in || h < 1 || h > a.H - 2 || W < 3) {
      std::fill(l, l + W, T(0));
      continue;
    }
    l[0] = T(0);
    l[W - 1] = T(0);
#pragma omp simd
    for (int64_t w = 1; w < W - 1; ++w) {
      l[w] = r[w - 1] + r[w + 1] + r[w - W] + r[w + W] + axial * (r[w - hw] + r[w + hw]) -
             centre * r[w];
    }
  }
}

template <typename T>
void harmonic_backward_plane(const RegArgs& a, const T* lbase, const T* zeros, T sc, T* g,
                             int64_t d) {
  const int64_t W = a.W;
  const T centre = T(2 * (a.ndim == 3 ? 3 : 2)), two_sc = T(2) * sc;
  for (int64_t h = 0; h < a.H; ++h) {
    const T* l = lbase + h * W;
    T* gr = g + h * W;
    const RowNeighbours<T> n = neighbours(a, l, d, h, zeros);
    // L beyond the row's ends is 0 too.
    auto at = [&](int64_t w) {
      const T left = w >= 1 ? l[w - 1] : T(0), right = w + 1 < W ? l[w + 1] : T(0);
      return two_sc * (left + right + n.hm[w] + n.hp[w] + n.dm[w] + n.dp[w] - centre * l[w]);
    };
    gr[0] = at(0);
#pragma omp simd
    for (int64_t w = 1; w < W - 1; ++w) {
      gr[w] = two_sc * (l[w - 1] + l[w + 1] + n.hm[w] + n.hp[w] + n.dm[w] + n.dp[w] -
                        centre * l[w]);
    }
    if (W > 1) gr[W - 1] = at(W - 1);
  }
}

template <typename T>
void backward_impl(const RegArgs& a, const T* u, const T* scale, T* grad) {
  const int64_t planes = a.B * a.C * a.D, plane = a.H * a.W, per_item = a.C * a.D;
  if (a.kind == reg::Kind::HARMONIC) {
    // Every entry is written by the first loop: no zero-initialisation.
    const std::unique_ptr<T[]> lap(new T[static_cast<size_t>(planes * plane)]);
    const std::vector<T> zeros(static_cast<size_t>(a.W), T(0));
#pragma omp parallel num_threads(a.num_threads)
    {
#pragma omp for schedule(static)
      for (int64_t p = 0; p < planes; ++p) {
        harmonic_laplacian_plane<T>(a, u + p * plane, lap.get() + p * plane, p % a.D);
      }
#pragma omp for schedule(static)
      for (int64_t p = 0; p < planes; ++p) {
        harmonic_backward_plane<T>(a, lap.get() + p * plane, zeros.data(), scale[p / per_item],
                                   grad + p * plane, p % a.D);
      }
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t p = 0; p < planes; ++p) {
    grad_l2_backward_plane<T>(a, u + p * plane, scale[p / per_item], grad + p * plane, p % a.D);
  }
}

}  // namespace

void regularisers_forward(const RegArgs& a, uintptr_t u, uintptr_t out) {
  dispatch_real(int(a.dtype), "regulariser cpu kernels take float32 or float64", [&](auto t) {
    using T = decltype(t);
    forward_impl<T>(a, reinterpret_cast<const T*>(u), reinterpret_cast<T*>(out));
  });
}

void regularisers_backward(const RegArgs& a, uintptr_t u, uintptr_t scale, uintptr_t grad) {
  dispatch_real(int(a.dtype), "regulariser cpu kernels take float32 or float64", [&](auto t) {
    using T = decltype(t);
    backward_impl<T>(a, reinterpret_cast<const T*>(u), reinterpret_cast<const T*>(scale),
                     reinterpret_cast<T*>(grad));
  });
}

}  // namespace cpu

namespace {
reg::RegArgs reg_args(int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size,
                      std::vector<double> wt, int num_threads) {
  if (size.size() != 2 && size.size() != 3) throw std::invalid_argument("regularisers: size must have 2 or 3 entries");
  if (wt.size() != size.size()) throw std::invalid_argument("regularisers: one weight per axis");
  reg::RegArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.kind = static_cast<reg::Kind>(kind);
  a.ndim = static_cast<int>(size.size());
  a.B = B;
  a.C = C;
  const int off = a.ndim == 3 ? 0 : 1;  // 2D: axes H, W
  a.D = a.ndim == 3 ? size[0] : 1;
  a.H = size[1 - off];
  a.W = size[2 - off];
  for (size_t i = 0; i < wt.size(); ++i) a.wt[i + off] = wt[i];
  a.num_threads = cpu::clamp_threads(num_threads);
  return a;
}
}  // namespace

void register_regularisers(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "regularisers_forward_cpu",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         int num_threads, uintptr_t u, uintptr_t out) {
        cpu::regularisers_forward(reg_args(dtype, kind, B, C, size, wt, num_threads), u, out);
      },
      release);
  m.def(
      "regularisers_backward_cpu",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         int num_threads, uintptr_t u, uintptr_t scale, uintptr_t grad) {
        cpu::regularisers_backward(reg_args(dtype, kind, B, C, size, wt, num_threads), u, scale, grad);
      },
      release);
  m.def(
      "regularisers_forward_cuda",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         uintptr_t u, uintptr_t partials, uintptr_t stream) {
        cuda::regularisers_forward(reg_args(dtype, kind, B, C, size, wt, 1), u, partials, stream);
      },
      release);
  m.def(
      "regularisers_backward_cuda",
      [](int dtype, int kind, int64_t B, int64_t C, std::vector<int64_t> size, std::vector<double> wt,
         uintptr_t u, uintptr_t scale, uintptr_t grad, uintptr_t scratch, uintptr_t stream) {
        cuda::regularisers_backward(reg_args(dtype, kind, B, C, size, wt, 1), u, scale, grad, scratch,
                                    stream);
      },
      release);
}

}  // namespace mrus
