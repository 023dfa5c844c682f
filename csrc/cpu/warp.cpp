// OpenMP loops over the shared per-voxel warp math (csrc/include/warp.h).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "launchers.h"
#include "registry.h"

namespace py = pybind11;

namespace mrus {
namespace cpu {
namespace {

using warp::WarpArgs;

// Below this much work (voxels x batch x channels) one thread beats the OpenMP fork.
constexpr int64_t kSerialWork = 16384;

int threads_for(const WarpArgs& a, int64_t work) {
  return work < kSerialWork ? 1 : a.num_threads;
}

// Calls f(n, x) for output voxels n in [lo, hi) in order, x their coordinates, stepped
// without divisions.
template <int NDIM, typename F>
void walk(const WarpArgs& a, int64_t lo, int64_t hi, F&& f) {
  if (lo >= hi) return;
  int64_t x[NDIM];
  warp::voxel_coords<NDIM>(a, lo, x);
  for (int64_t n = lo; n < hi; ++n) {
    f(n, x);
    warp::next_coords<NDIM>(a, x);
  }
}

template <int NDIM, typename T>
void forward_impl(const WarpArgs& a, const T* image, const T* ddf, T* out) {
  const int64_t n_out = a.n_out();
#pragma omp parallel num_threads(threads_for(a, n_out * a.B * a.C))
  {
    const int64_t P = omp_get_num_threads(), r = omp_get_thread_num();
    walk<NDIM>(a, n_out * r / P, n_out * (r + 1) / P, [&](int64_t n, const int64_t* x) {
      for (int64_t b = 0; b < a.B; ++b) {
        if (a.mode == int(Interp::LINEAR)) {
          warp::forward_voxel_lattice<NDIM, T, T>(a, image, ddf, out, b, n, x);
        } else {
          warp::forward_voxel<NDIM, T, T>(a, image, ddf, out, b, n, x);
        }
      }
    });
  }
}

template <typename T>
struct AddInto {
  T* dst;
  void operator()(int64_t idx, T v) { dst[idx] += v; }
};

struct NoScatter {
  template <typename T>
  void operator()(int64_t, T) {}
};

// The image gradient is a scatter. Each of P fixed, contiguous ranges of output voxels adds
// into its own buffer (range 0 into grad_image itself), then the buffers are summed in
// range order: no atomics, and bitwise the same result on every run with the same P.
template <int NDIM, typename T>
void backward_impl(const WarpArgs& a, const T* grad_out, const T* image, const T* ddf,
                   T* grad_image, T* grad_ddf) {
  const int64_t n_out = a.n_out();
  if (!grad_image) {
    NoScatter none;
#pragma omp parallel num_threads(threads_for(a, n_out * a.B * a.C))
    {
      const int64_t P = omp_get_num_threads(), r = omp_get_thread_num();
      walk<NDIM>(a, n_out * r / P, n_out * (r + 1) / P, [&](int64_t n, const int64_t* x) {
        warp::backward_voxel_lattice<NDIM, T, T>(a, grad_out, image, ddf, false, grad_ddf, none, n, x);
      });
    }
    return;
  }
  const int64_t img_numel = a.Bi * a.C * a.n_in();
  // Enough work per range to pay for a private buffer.
  const int64_t P = std::max<int64_t>(
      1, std::min<int64_t>(a.num_threads, n_out * a.B * a.C / 32768));
  std::vector<T> scratch(static_cast<size_t>((P - 1) * img_numel), T(0));
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(P))
  for (int64_t r = 0; r < P; ++r) {
    AddInto<T> add{r == 0 ? grad_image : scratch.data() + (r - 1) * img_numel};
    walk<NDIM>(a, n_out * r / P, n_out * (r + 1) / P, [&](int64_t n, const int64_t* x) {
      warp::backward_voxel_lattice<NDIM, T, T>(a, grad_out, image, ddf, true, grad_ddf, add, n, x);
    });
  }
  if (P > 1) {
#pragma omp parallel for schedule(static) num_threads(threads_for(a, img_numel))
    for (int64_t i = 0; i < img_numel; ++i) {
      T s = grad_image[i];
      for (int64_t r = 1; r < P; ++r) s += scratch[(r - 1) * img_numel + i];
      grad_image[i] = s;
    }
  }
}

template <typename F>
void dispatch(const WarpArgs& a, F&& f) {
  if (a.ndim != 2 && a.ndim != 3) throw std::invalid_argument("warp: ndim must be 2 or 3");
  if (a.dtype == int(DType::F32)) {
    a.ndim == 3 ? f(std::integral_constant<int, 3>{}, float{}) : f(std::integral_constant<int, 2>{}, float{});
  } else if (a.dtype == int(DType::F64)) {
    a.ndim == 3 ? f(std::integral_constant<int, 3>{}, double{}) : f(std::integral_constant<int, 2>{}, double{});
  } else {
    throw std::invalid_argument("warp (cpu kernels): dtype code must be float32 or float64");
  }
}

}  // namespace

void warp_forward(const WarpArgs& a, uintptr_t image, uintptr_t ddf, uintptr_t out) {
  dispatch(a, [&](auto nd, auto t) {
    using T = decltype(t);
    forward_impl<decltype(nd)::value, T>(a, reinterpret_cast<const T*>(image),
                                         reinterpret_cast<const T*>(ddf), reinterpret_cast<T*>(out));
  });
}

void warp_backward(const WarpArgs& a, uintptr_t grad_out, uintptr_t image, uintptr_t ddf,
                   uintptr_t grad_image, uintptr_t grad_ddf) {
  dispatch(a, [&](auto nd, auto t) {
    using T = decltype(t);
    backward_impl<decltype(nd)::value, T>(
        a, reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(image),
        reinterpret_cast<const T*>(ddf), reinterpret_cast<T*>(grad_image),
        reinterpret_cast<T*>(grad_ddf));
  });
}

}  // namespace cpu

namespace {

warp::WarpArgs warp_args(int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
                         const std::vector<int64_t>& in_size, const std::vector<int64_t>& out_size,
                         int mode, int padding, int flags, int num_threads) {
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
  a.flags = flags;
  a.num_threads = num_threads > 0 ? num_threads : 1;
  return a;
}

}  // namespace

void register_warp(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "warp_forward_cpu",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         int flags, int num_threads, uintptr_t image, uintptr_t ddf, uintptr_t out) {
        cpu::warp_forward(warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, flags, num_threads),
                          image, ddf, out);
      },
      release);
  m.def(
      "warp_backward_cpu",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         int flags, int num_threads, uintptr_t grad_out, uintptr_t image, uintptr_t ddf, uintptr_t grad_image,
         uintptr_t grad_ddf) {
        cpu::warp_backward(
            warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, flags, num_threads),
            grad_out, image, ddf, grad_image, grad_ddf);
      },
      release);
  m.def(
      "warp_forward_cuda",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         int flags, uintptr_t image, uintptr_t ddf, uintptr_t out, uintptr_t stream) {
        cuda::warp_forward(warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, flags, 1),
                           image, ddf, out, stream);
      },
      release);
  m.def(
      "warp_backward_cuda",
      [](int dtype, int ndim, int64_t B, int64_t Bi, int64_t Bd, int64_t C,
         std::vector<int64_t> in_size, std::vector<int64_t> out_size, int mode, int padding,
         int flags, uintptr_t grad_out, uintptr_t image, uintptr_t ddf, uintptr_t grad_image,
         uintptr_t grad_ddf, bool deterministic, uintptr_t fixed_scratch, uintptr_t gmax,
         uintptr_t stream) {
        cuda::warp_backward(warp_args(dtype, ndim, B, Bi, Bd, C, in_size, out_size, mode, padding, flags, 1),
                            grad_out, image, ddf, grad_image, grad_ddf, deterministic,
                            fixed_scratch, gmax, stream);
      },
      release);
}

}  // namespace mrus
