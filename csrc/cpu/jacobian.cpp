// OpenMP loops over the shared per-voxel jacobian math (csrc/include/jacobian.h).
#include <stdexcept>
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

using jacobian::JacobianArgs;

template <typename F>
void dispatch_jacobian(const JacobianArgs& a, F&& f) {
  dispatch_ndim_real(a.ndim, a.dtype, "jacobian_det: ndim must be 2 or 3",
                     "jacobian_det (cpu kernels): dtype code must be float32 or float64",
                     std::forward<F>(f));
}

}  // namespace

void jacobian_forward(const JacobianArgs& a, uintptr_t u, uintptr_t det) {
  dispatch_jacobian(a, [&](auto nd, auto t) {
    using T = decltype(t);
    constexpr int NDIM = decltype(nd)::value;
    const T* up = reinterpret_cast<const T*>(u);
    T* dp = reinterpret_cast<T*>(det);
    const int64_t nv = a.n(), total = a.B * nv;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t k = 0; k < total; ++k) {
      jacobian::forward_voxel<NDIM, T, T>(a, up, dp, k / nv, k % nv);
    }
  });
}

void jacobian_backward(const JacobianArgs& a, uintptr_t grad_det, uintptr_t u, uintptr_t grad_u) {
  dispatch_jacobian(a, [&](auto nd, auto t) {
    using T = decltype(t);
    constexpr int NDIM = decltype(nd)::value;
    const T* gp = reinterpret_cast<const T*>(grad_det);
    const T* up = reinterpret_cast<const T*>(u);
    T* gu = reinterpret_cast<T*>(grad_u);
    const int64_t nv = a.n(), total = a.B * nv;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t k = 0; k < total; ++k) {
      jacobian::backward_voxel<NDIM, T, T>(a, gp, up, gu, k / nv, k % nv);
    }
  });
}

}  // namespace cpu

namespace {

jacobian::JacobianArgs jacobian_args(int dtype, int ndim, int64_t B, const std::vector<int64_t>& size,
                                     const std::vector<double>& inv_h, int num_threads) {
  if (ndim != 2 && ndim != 3) throw std::invalid_argument("jacobian_det: ndim must be 2 or 3");
  if (static_cast<int>(size.size()) != ndim || static_cast<int>(inv_h.size()) != ndim) {
    throw std::invalid_argument("jacobian_det: size and inv_h must have ndim entries");
  }
  jacobian::JacobianArgs a;
  a.dtype = dtype;
  a.ndim = ndim;
  a.B = B;
  for (int i = 0; i < ndim; ++i) {
    a.size[i] = size[i];
    a.inv_h[i] = inv_h[i];
  }
  a.num_threads = cpu::clamp_threads(num_threads);
  return a;
}

}  // namespace

void register_jacobian(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "jacobian_forward_cpu",
      [](int dtype, int ndim, int64_t B, std::vector<int64_t> size, std::vector<double> inv_h,
         int num_threads, uintptr_t u, uintptr_t det) {
        cpu::jacobian_forward(jacobian_args(dtype, ndim, B, size, inv_h, num_threads), u, det);
      },
      release);
  m.def(
      "jacobian_backward_cpu",
      [](int dtype, int ndim, int64_t B, std::vector<int64_t> size, std::vector<double> inv_h,
         int num_threads, uintptr_t grad_det, uintptr_t u, uintptr_t grad_u) {
        cpu::jacobian_backward(jacobian_args(dtype, ndim, B, size, inv_h, num_threads), grad_det, u,
                               grad_u);
      },
      release);
  m.def(
      "jacobian_forward_cuda",
      [](int dtype, int ndim, int64_t B, std::vector<int64_t> size, std::vector<double> inv_h,
         uintptr_t u, uintptr_t det, uintptr_t stream) {
        cuda::jacobian_forward(jacobian_args(dtype, ndim, B, size, inv_h, 1), u, det, stream);
      },
      release);
  m.def(
      "jacobian_backward_cuda",
      [](int dtype, int ndim, int64_t B, std::vector<int64_t> size, std::vector<double> inv_h,
         uintptr_t grad_det, uintptr_t u, uintptr_t grad_u, uintptr_t scratch, uintptr_t stream) {
        cuda::jacobian_backward(jacobian_args(dtype, ndim, B, size, inv_h, 1), grad_det, u, grad_u,
                                scratch, stream);
      },
      release);
}

}  // namespace mrus
