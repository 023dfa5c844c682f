// OpenMP loops of the regularisers (grad_l2, harmonic_energy) over the shared per-voxel
// math (csrc/include/regularisers.h). One pass reads u once; the forward sums per (b, c, d)
// plane in double and adds the planes in fixed order (bitwise reproducible).
#include <algorithm>
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

template <typename T>
void forward_impl(const RegArgs& a, const T* u, T* out) {
  const int64_t planes = a.B * a.C * a.D, plane = a.H * a.W;
  std::vector<double> partial(static_cast<size_t>(planes));
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t p = 0; p < planes; ++p) {
    const T* base = u + p * plane;
    int64_t x[3] = {p % a.D, 0, 0};
    double s = 0.0;
    for (int64_t h = 0; h < a.H; ++h) {
      x[1] = h;
      for (int64_t w = 0; w < a.W; ++w) {
        x[2] = w;
        s += double(reg::voxel_energy<T>(a, base + h * a.W + w, x));
      }
    }
    partial[p] = s;
  }
  const int64_t per_item = a.C * a.D;
  for (int64_t b = 0; b < a.B; ++b) {
    double s = 0.0;
    for (int64_t p = 0; p < per_item; ++p) s += partial[b * per_item + p];
    out[b] = T(s);
  }
}

template <typename T>
void backward_impl(const RegArgs& a, const T* u, const T* scale, T* grad) {
  const int64_t planes = a.B * a.C * a.D, plane = a.H * a.W, per_item = a.C * a.D;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t p = 0; p < planes; ++p) {
    const T* base = u + p * plane;
    T* g = grad + p * plane;
    const T sc = scale[p / per_item];
    int64_t x[3] = {p % a.D, 0, 0};
    for (int64_t h = 0; h < a.H; ++h) {
      x[1] = h;
      for (int64_t w = 0; w < a.W; ++w) {
        x[2] = w;
        g[h * a.W + w] = sc * reg::voxel_grad<T>(a, base + h * a.W + w, x);
      }
    }
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
         uintptr_t u, uintptr_t scale, uintptr_t grad, uintptr_t stream) {
        cuda::regularisers_backward(reg_args(dtype, kind, B, C, size, wt, 1), u, scale, grad, stream);
      },
      release);
}

}  // namespace mrus
