// OpenMP loops over the shared per-voxel warp math (csrc/include/warp.h).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_utils.h"
#include "launchers.h"
#include "registry.h"
#include "warp_avx2.h"

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

// The row loops are compiled twice, for x86-64-v3 (AVX2 + FMA) and for the baseline, and
// the loader picks one per machine: the wheel still runs on any x86-64 CPU.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(__CUDACC__)
#define MRUS_ROW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MRUS_ROW_CLONES
#endif

// Sizes and strides of the input volume as the row lattice's offset type.
template <int NDIM, typename I>
struct VolumeShape {
  I size[NDIM], stride[NDIM];
  explicit VolumeShape(const WarpArgs& a) {
    I s = 1;
    for (int i = NDIM - 1; i >= 0; --i) {
      size[i] = static_cast<I>(a.in_size[i]);
      stride[i] = s;
      s *= size[i];
    }
  }
};

// Geometry of voxels [x0, x0 + len) of the output row starting at flat voxel n0 (outer
// coordinates xo) for the displacement u of one batch item ([NDIM, n_out]).
template <int NDIM, typename T, typename I>
inline void row_geometry(const WarpArgs& a, const VolumeShape<NDIM, I>& vs, const T* u,
                         int64_t n_out, const int64_t* xo, int64_t n0, int64_t x0, int len,
                         warp::RowLattice<NDIM, T, I>& R) {
  const bool border = a.padding == int(Padding::BORDER);
  T outer[NDIM > 1 ? NDIM - 1 : 1];
  for (int i = 0; i < NDIM - 1; ++i) outer[i] = static_cast<T>(xo[i]);
  const T* ur = u + n0 + x0;
#pragma omp simd
  for (int j = 0; j < len; ++j) {
    T p[NDIM];
    for (int i = 0; i < NDIM - 1; ++i) p[i] = outer[i] + ur[i * n_out + j];
    p[NDIM - 1] = static_cast<T>(x0 + j) + ur[(NDIM - 1) * n_out + j];
    warp::row_lattice_voxel<NDIM, T, I>(R, j, p, vs.size, vs.stride, border);
  }
}

// Forward of output rows [r0, r1) (rows along the last spatial axis), every batch item.
template <int NDIM, typename T, typename I>
MRUS_ROW_CLONES void forward_rows(const WarpArgs& a, const T* image, const T* ddf, T* out,
                                  int64_t r0, int64_t r1) {
  const int64_t W = a.out_size[NDIM - 1], n_out = a.n_out(), n_in = a.n_in();
  const VolumeShape<NDIM, I> vs(a);
  const bool add = a.flags & warp::ADD_DDF;
  warp::RowLattice<NDIM, T, I> R;
  int64_t xo[NDIM];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n0 = row * W;
    warp::voxel_coords<NDIM>(a, n0, xo);
    for (int64_t x0 = 0; x0 < W; x0 += warp::kRowBlock) {
      const int len = static_cast<int>(std::min<int64_t>(warp::kRowBlock, W - x0));
      for (int64_t b = 0; b < a.B; ++b) {
        const T* u = ddf + (a.Bd > 1 ? b : 0) * NDIM * n_out;
        if (b == 0 || a.Bd > 1) row_geometry<NDIM, T, I>(a, vs, u, n_out, xo, n0, x0, len, R);
        const T* img = image + (a.Bi > 1 ? b : 0) * a.C * n_in;
        T* o = out + b * a.C * n_out + n0 + x0;
        for (int64_t c = 0; c < a.C; ++c) {
          const T* ic = img + c * n_in;
          T* oc = o + c * n_out;
          const T* uc = add ? u + c * n_out + n0 + x0 : nullptr;
          int redo = 0;  // some lerp is not finite
          if (add) {
#pragma omp simd reduction(| : redo)
            for (int j = 0; j < len; ++j) {
              const T s = warp::row_sample<NDIM, T, I>(R, j, ic);
              redo |= !warp::is_finite(s) && !R.nan[j];
              oc[j] = R.nan[j] ? T(NAN) : s + uc[j];
            }
          } else {
#pragma omp simd reduction(| : redo)
            for (int j = 0; j < len; ++j) {
              const T s = warp::row_sample<NDIM, T, I>(R, j, ic);
              redo |= !warp::is_finite(s) && !R.nan[j];
              oc[j] = R.nan[j] ? T(NAN) : s;
            }
          }
          // Rare (inf or NaN in the image, or overflow): those voxels term by term, as the
          // reference (warp.h).
          for (int j = 0; redo && j < len; ++j) {
            if (R.nan[j] || warp::is_finite(warp::row_sample<NDIM, T, I>(R, j, ic))) continue;
            const T s = warp::row_sample_terms<NDIM, T, I>(R, j, ic);
            oc[j] = add ? s + uc[j] : s;
          }
        }
      }
    }
  }
}

// Backward of output rows [r0, r1), every batch item (so that a broadcast ddf still has a
// single writer). The image gradient (and with DDF_GRAD_SCATTER the ddf gradient, at its own
// flat index) is added into gimg, which may be null (not needed); grad_ddf may be null.
template <int NDIM, typename T, typename I>
MRUS_ROW_CLONES void backward_rows(const WarpArgs& a, const T* grad_out, const T* image,
                                   const T* ddf, T* gimg, T* grad_ddf, int64_t r0, int64_t r1) {
  constexpr int K = warp::RowLattice<NDIM, T, I>::K;
  constexpr int BLK = warp::kRowBlock;
  const int64_t W = a.out_size[NDIM - 1], n_out = a.n_out(), n_in = a.n_in();
  const VolumeShape<NDIM, I> vs(a);
  const bool via_scatter = a.flags & warp::DDF_GRAD_SCATTER;
  const bool add = a.flags & warp::ADD_DDF;
  const bool need_image = gimg != nullptr;
  T* ddf_dst = via_scatter ? gimg : grad_ddf;  // null: ddf gradient not needed
  const bool need_ddf = ddf_dst != nullptr;
  warp::RowLattice<NDIM, T, I> R;
  T w[K][BLK];       // corner weights (0 for padding corners)
  T wg[K][BLK];      // weight x grad_out of one channel
  T corner[K][BLK];  // sum over channels of grad_out x image at each corner
  T gu[NDIM][BLK];   // ddf gradient, summed over the batch items sharing the ddf
  T dp[NDIM][BLK];   // d out / d p of one batch item
  int64_t xo[NDIM];
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n0 = row * W;
    warp::voxel_coords<NDIM>(a, n0, xo);
    for (int64_t x0 = 0; x0 < W; x0 += BLK) {
      const int len = static_cast<int>(std::min<int64_t>(BLK, W - x0));
      for (int i = 0; i < NDIM; ++i) {
        for (int j = 0; j < len; ++j) gu[i][j] = T(0);
      }
      for (int64_t b = 0; b < a.B; ++b) {
        const int64_t bi = a.Bi > 1 ? b : 0, bd = a.Bd > 1 ? b : 0;
        const T* u = ddf + bd * NDIM * n_out;
        if (b == 0 || a.Bd > 1) {
          row_geometry<NDIM, T, I>(a, vs, u, n_out, xo, n0, x0, len, R);
          if (need_image) {
#pragma omp simd
            for (int j = 0; j < len; ++j) {
              T wj[K];
              warp::corner_weights<NDIM, T, I>(R, j, wj);
              for (int k = 0; k < K; ++k) w[k][j] = wj[k];
            }
          }
        }
        const T* g = grad_out + b * a.C * n_out + n0 + x0;
        if (need_ddf) {
          for (int k = 0; k < K; ++k) {
            for (int j = 0; j < len; ++j) corner[k][j] = T(0);
          }
        }
        for (int64_t c = 0; c < a.C; ++c) {
          const T* gc = g + c * n_out;
          const int64_t vol = (bi * a.C + c) * n_in;
          if (need_ddf) {
            const T* ic = image + vol;
#pragma omp simd
            for (int j = 0; j < len; ++j) {
              T v[K];
              warp::row_corners<NDIM, T, I>(R, j, ic, v);
              for (int k = 0; k < K; ++k) corner[k][j] += gc[j] * v[k];
            }
          }
          if (need_image) {
#pragma omp simd
            for (int j = 0; j < len; ++j) {
              for (int k = 0; k < K; ++k) wg[k][j] = w[k][j] * gc[j];
            }
            // A scatter: serial (corners of neighbouring voxels coincide).
            T* gi = gimg + vol;
            for (int j = 0; j < len; ++j) {
              const int mask = R.mask[j];
              for (int k = 0; k < K; ++k) {
                if ((mask >> k) & 1) gi[R.off[k][j]] += wg[k][j];
              }
            }
          }
        }
        if (need_ddf) {
          int redo = 0;  // some lerp is not finite
#pragma omp simd reduction(| : redo)
          for (int j = 0; j < len; ++j) {
            T v[K], d[NDIM];
            for (int k = 0; k < K; ++k) v[k] = corner[k][j];
            warp::lerp_gradient<NDIM, T, I>(R, j, v, d);
            for (int i = 0; i < NDIM; ++i) {
              redo |= !warp::is_finite(d[i]) && !R.nan[j];
              dp[i][j] = R.nan[j] ? T(0) : d[i];
            }
          }
          // Rare (inf or NaN reached a corner sum, or overflow): term by term (warp.h).
          for (int j = 0; redo && j < len; ++j) {
            bool finite = true;
            for (int i = 0; i < NDIM; ++i) finite = finite && warp::is_finite(dp[i][j]);
            if (finite) continue;
            T v[K], d[NDIM];
            for (int k = 0; k < K; ++k) v[k] = corner[k][j];
            warp::corner_gradient_terms<NDIM, T, I>(R, j, v, d);
            for (int i = 0; i < NDIM; ++i) dp[i][j] = d[i];
          }
          for (int i = 0; i < NDIM; ++i) {
#pragma omp simd
            for (int j = 0; j < len; ++j) gu[i][j] += dp[i][j];
          }
        }
        if (add) {  // d out[c] / d ddf[c] = 1, NaN sample or not
          for (int i = 0; i < NDIM; ++i) {
            const T* gi = g + i * n_out;
#pragma omp simd
            for (int j = 0; j < len; ++j) gu[i][j] += gi[j];
          }
        }
        if (need_ddf && (a.Bd > 1 || b == a.B - 1)) {
          T* dst = ddf_dst + bd * NDIM * n_out + n0 + x0;
          for (int i = 0; i < NDIM; ++i) {
            T* di = dst + i * n_out;
            if (via_scatter) {
#pragma omp simd
              for (int j = 0; j < len; ++j) di[j] += gu[i][j];
            } else {
#pragma omp simd
              for (int j = 0; j < len; ++j) di[j] = gu[i][j];
            }
            for (int j = 0; j < len; ++j) gu[i][j] = T(0);
          }
        }
      }
    }
  }
}

// int32 offsets (cheap vector arithmetic) unless a volume is too large for them.
inline bool small_volume(const WarpArgs& a) {
  int64_t n = 1;
  for (int i = 0; i < a.ndim; ++i) n *= a.in_size[i];
  return n < (int64_t(1) << 30);
}

// The AVX2 row kernels (warp_avx2.h) serve float32 when the CPU has AVX2 + FMA and they are
// not switched off (cpu_utils.h: simd_enabled).
template <typename T>
bool use_avx2() {
#ifdef MRUS_HAVE_AVX2_KERNELS
  return std::is_same<T, float>::value && simd_enabled() && avx2::supported();
#else
  return false;
#endif
}

// The row loop that serves a linear warp: the AVX2 kernels where use_avx2 and the offsets fit
// int32, else the portable loops with int32 or int64 offsets.
enum class RowLoop { AVX2, PORTABLE32, PORTABLE64 };

template <typename T>
RowLoop row_loop(const WarpArgs& a) {
  if (!small_volume(a)) return RowLoop::PORTABLE64;
  return use_avx2<T>() ? RowLoop::AVX2 : RowLoop::PORTABLE32;
}

template <int NDIM, typename T>
void avx2_forward(const WarpArgs& a, const T* image, const T* ddf, T* out, int64_t r0, int64_t r1) {
#ifdef MRUS_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<T, float>::value) {
    const avx2::RowKernels<NDIM> k(a);
    k.forward(image, ddf, out, r0, r1);
    return;
  }
#endif
  (void)a, (void)image, (void)ddf, (void)out, (void)r0, (void)r1;
  throw std::logic_error("warp: AVX2 kernels called for a case they do not serve");
}

template <int NDIM, typename T>
void avx2_backward(const WarpArgs& a, const T* grad_out, const T* image, const T* ddf, T* gimg,
                   T* grad_ddf, int64_t r0, int64_t r1) {
#ifdef MRUS_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<T, float>::value) {
    const avx2::RowKernels<NDIM> k(a);
    k.backward(grad_out, image, ddf, gimg, grad_ddf, r0, r1);
    return;
  }
#endif
  (void)a, (void)grad_out, (void)image, (void)ddf, (void)gimg, (void)grad_ddf, (void)r0, (void)r1;
  throw std::logic_error("warp: AVX2 kernels called for a case they do not serve");
}

template <int NDIM, typename T>
void forward_impl(const WarpArgs& a, const T* image, const T* ddf, T* out) {
  const int64_t n_out = a.n_out();
  if (a.mode == int(Interp::LINEAR)) {
    const int64_t rows = n_out / a.out_size[NDIM - 1];
    const RowLoop loop = row_loop<T>(a);
#pragma omp parallel num_threads(threads_for(a, n_out * a.B * a.C))
    {
      const int64_t P = omp_get_num_threads(), r = omp_get_thread_num();
      const int64_t lo = rows * r / P, hi = rows * (r + 1) / P;
      if (loop == RowLoop::AVX2) {
        avx2_forward<NDIM>(a, image, ddf, out, lo, hi);
      } else if (loop == RowLoop::PORTABLE32) {
        forward_rows<NDIM, T, int32_t>(a, image, ddf, out, lo, hi);
      } else {
        forward_rows<NDIM, T, int64_t>(a, image, ddf, out, lo, hi);
      }
    }
    return;
  }
#pragma omp parallel num_threads(threads_for(a, n_out * a.B * a.C))
  {
    const int64_t P = omp_get_num_threads(), r = omp_get_thread_num();
    walk<NDIM>(a, n_out * r / P, n_out * (r + 1) / P, [&](int64_t n, const int64_t* x) {
      for (int64_t b = 0; b < a.B; ++b) {
        warp::forward_voxel<NDIM, T, T>(a, image, ddf, out, b, n, x);
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

// Backward of output voxels [lo, hi) (rows for linear interpolation, voxels for nearest),
// adding the image gradient into gimg (null: not needed).
template <int NDIM, typename T>
void backward_range(const WarpArgs& a, const T* grad_out, const T* image, const T* ddf,
                    T* gimg, T* grad_ddf, int64_t lo, int64_t hi) {
  if (a.mode == int(Interp::LINEAR)) {
    const int64_t W = a.out_size[NDIM - 1];
    const RowLoop loop = row_loop<T>(a);
    if (loop == RowLoop::AVX2) {
      avx2_backward<NDIM>(a, grad_out, image, ddf, gimg, grad_ddf, lo / W, hi / W);
    } else if (loop == RowLoop::PORTABLE32) {
      backward_rows<NDIM, T, int32_t>(a, grad_out, image, ddf, gimg, grad_ddf, lo / W, hi / W);
    } else {
      backward_rows<NDIM, T, int64_t>(a, grad_out, image, ddf, gimg, grad_ddf, lo / W, hi / W);
    }
  } else if (gimg) {
    AddInto<T> add{gimg};
    walk<NDIM>(a, lo, hi, [&](int64_t n, const int64_t* x) {
      warp::backward_voxel<NDIM, T, T>(a, grad_out, image, ddf, true, grad_ddf, add, n, x);
    });
  } else {
    NoScatter none;
    walk<NDIM>(a, lo, hi, [&](int64_t n, const int64_t* x) {
      warp::backward_voxel<NDIM, T, T>(a, grad_out, image, ddf, false, grad_ddf, none, n, x);
    });
  }
}

// The image gradient is a scatter. Each of P fixed, contiguous ranges of output rows adds
// into its own buffer (range 0 into grad_image itself), then the buffers are summed in
// range order: no atomics, and bitwise the same result on every run with the same P.
template <int NDIM, typename T>
void backward_impl(const WarpArgs& a, const T* grad_out, const T* image, const T* ddf,
                   T* grad_image, T* grad_ddf) {
  const int64_t n_out = a.n_out(), W = a.out_size[NDIM - 1], rows = n_out / W;
  // Ranges are whole rows (voxel ranges [W * row_lo, W * row_hi)).
  if (!grad_image) {
#pragma omp parallel num_threads(threads_for(a, n_out * a.B * a.C))
    {
      const int64_t P = omp_get_num_threads(), r = omp_get_thread_num();
      backward_range<NDIM, T>(a, grad_out, image, ddf, nullptr, grad_ddf, W * (rows * r / P),
                              W * (rows * (r + 1) / P));
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
    T* dst = r == 0 ? grad_image : scratch.data() + (r - 1) * img_numel;
    backward_range<NDIM, T>(a, grad_out, image, ddf, dst, grad_ddf, W * (rows * r / P),
                            W * (rows * (r + 1) / P));
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
  dispatch_ndim_real(a.ndim, a.dtype, "warp: ndim must be 2 or 3",
                     "warp (cpu kernels): dtype code must be float32 or float64",
                     std::forward<F>(f));
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
  a.num_threads = cpu::clamp_threads(num_threads);
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
