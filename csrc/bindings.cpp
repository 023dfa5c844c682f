// mrus_kernels._C: one module, one register_<op> per operator. Functions take raw pointers,
// sizes and the CUDA stream as integers (no libtorch headers, no ABI tie to torch).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_utils.h"
#include "launchers.h"
#include "registry.h"
#include "simd_avx2.h"

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
void jacobian_forward(const jacobian::JacobianArgs&, uintptr_t, uintptr_t, uintptr_t) { unavailable(); }
void jacobian_backward(const jacobian::JacobianArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t) {
  unavailable();
}
void mi_forward(const mi::MIArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t,
                uintptr_t) {
  unavailable();
}
void mi_backward(const mi::MIArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                 uintptr_t, uintptr_t, uintptr_t) {
  unavailable();
}
int64_t sobel_num_partials(const sobel::SobelArgs&) { return 0; }
void sobel_forward(const sobel::SobelArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t) {
  unavailable();
}
void sobel_backward(const sobel::SobelArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                    uintptr_t, uintptr_t) {
  unavailable();
}
void lncc_forward(const lncc::LnccArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                  uintptr_t) {
  unavailable();
}
void lncc_backward(const lncc::LnccArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t,
                   uintptr_t, uintptr_t, uintptr_t) {
  unavailable();
}
void regularisers_forward(const reg::RegArgs&, uintptr_t, uintptr_t, uintptr_t) { unavailable(); }
void regularisers_backward(const reg::RegArgs&, uintptr_t, uintptr_t, uintptr_t, uintptr_t) {
  unavailable();
}
}  // namespace cuda
#endif

namespace {

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
#ifdef MRUS_HAVE_AVX2_KERNELS
  d["cpu_simd"] = std::string(cpu::avx2::supported() ? "avx2" : "none (this CPU lacks AVX2/FMA)");
#else
  d["cpu_simd"] = std::string("none (built without the AVX2 kernels: not x86-64 GCC/Clang, or MRUS_NO_SIMD)");
#endif
  d["cpu_simd_enabled"] = cpu::simd_enabled();
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
  mrus::register_jacobian(m);
  mrus::register_mi(m);
  mrus::register_sobel(m);
  mrus::register_lncc(m);
  mrus::register_regularisers(m);
  m.def("build_info", &mrus::build_info, "Build flags of this compiled module.");
  m.def(
      "set_cpu_simd", [](bool on) { mrus::cpu::simd_switch().store(on); },
      "Allow (True, the default) or forbid the CPU kernels' vector (AVX2) paths.");
}
