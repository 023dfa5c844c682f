// mrus_kernels._C: one module, one register_<op> per operator. Functions take raw pointers,
// sizes and the CUDA stream as integers (no libtorch headers, no ABI tie to torch).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "launchers.h"

namespace py = pybind11;

namespace mrus {

#ifndef MRUS_WITH_CUDA
namespace cuda {
bool built() { return false; }
static void unavailable() {
  throw std::runtime_error("mrus_kernels._C was built without CUDA (MRUS_CUDA=OFF or no nvcc)");
}
void warp_forward(const warp::WarpArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t) { unavailable(); }
void warp_backward(const warp::WarpArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                   bool, uintptr_t, uintptr_t, uintptr_t) {
  unavailable();
}
}  // namespace cuda
#endif

namespace {

warp::WarpArgs warp_args(int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
                         const std::vector<int64_t>& in_size, const std::vector<int64_t>& out_size,
                         int mode, int padding, int num_threads) {
  if (ndim != 2 && ndim != 3) throw std::invalid_argument("warp: ndim must be 2 or 3");
  if (static_cast<int>(in_size.size()) != ndim || static_cast<int>(out_size.size()) != ndim) {
    throw std::invalid_argument("warp: in_size and out_size must have ndim entries");
  }
  warp::WarpArgs a;
  a.dtype = dtype;
  a.ndim = ndim;
  a.B = B;
  a.Bi = Bi;
  a.Bd = Bd;
  a.C = C;
  for (int i = 0; i < ndim; ++i) {
    a.in_size[i] = in_size[i];
    a.out_size[i] = out_size[i];
  }
  a.mode = mode;
  a.padding = padding;
  a.num_threads = num_threads > 0 ? num_threads : 1;
  return a;
}

void register_warp(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "warp_forward_cpu",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         int num_threads, uintptr_t image, uintptr_t ddf, uintptr_t out) {
        cpu::warp_forward(warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, num_threads),
                          image, ddf, out);
      },
      release);
  m.def(
      "warp_backward_cpu",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         int num_threads, uintptr_t grad_out, uintptr_t image, uintptr_t ddf, uintptr_t grad_image,
         uintptr_t grad_ddf) {
        cpu::warp_backward(
            warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, num_threads),
            grad_out, image, ddf, grad_image, grad_ddf);
      },
      release);
  m.def(
      "warp_forward_cuda",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         uintptr_t image, uintptr_t ddf, uintptr_t out, uintptr_t stream) {
        cuda::warp_forward(warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, 1),
                           image, ddf, out, stream);
      },
      release);
  m.def(
      "warp_backward_cuda",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         uintptr_t grad_out, uintptr_t image, uintptr_t ddf, uintptr_t grad_image,
         uintptr_t grad_ddf, bool deterministic, uintptr_t fixed_scratch, uintptr_t gmax,
         uintptr_t stream) {
        cuda::warp_backward(warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, 1),
                            grad_out, image, ddf, grad_image, grad_ddf, deterministic,
                            fixed_scratch, gmax, stream);
      },
      release);
}

py::dict build_info() {
  py::dict d;
  d["cuda"] = cuda::built();
#ifdef MRUS_CUDA_ARCHS
  d["cuda_archs"] = std::string(MRUS_CUDA_ARCHS);
#else
  d["cuda_archs"] = std::string();
#endif
#ifdef MRUS_CUDA_VERSION
  d["cuda_version"] = std::string(MRUS_CUDA_VERSION);
#else
  d["cuda_version"] = std::string();
#endif
  d["openmp"] = std::to_string(_OPENMP);
  d["openmp_max_threads"] = omp_get_max_threads();
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

}  // namespace
}  // namespace mrus

PYBIND11_MODULE(_C, m) {
  m.doc() = "mrus compiled kernels (CPU always, CUDA when built)";
  mrus::register_warp(m);
  m.def("build_info", &mrus::build_info, "Build flags of this compiled module.");
}
