// OpenMP loops over the shared Parzen-window math (csrc/include/mi.h): the joint histogram
// (forward) and the per-voxel gradient from dL/dhist (backward).
//
// Forward: each item's voxels are cut into a fixed number of contiguous chunks (a function
// of N, B and K only, never of the thread count); each chunk fills its own double-precision
// histogram, touching only the few bins of each voxel's window; the chunk histograms are
// summed in chunk order. The result is bitwise the same for any number of threads.
// Backward: one writer per voxel, no reduction.
// A voxel with mask != 0 whose value or range gives no finite bin coordinate, or whose mask
// is NaN, makes its chunk's histogram, hence its item's, NaN in every entry (the rule of
// every backend, mrus_kernels/mi.py).
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include <omp.h>

#include <pybind11/pybind11.h>

#include "cpu_utils.h"
#include "launchers.h"
#include "mi_avx2.h"
#include "registry.h"

namespace py = pybind11;

namespace mrus {
namespace cpu {
namespace {

using mi::MIArgs;

constexpr int64_t kMinChunk = 4096;                      // voxels per chunk, at least
constexpr int64_t kMaxChunks = 64;                       // chunks per item, at most
constexpr int64_t kMaxScratchBytes = int64_t(64) << 20;  // all chunk histograms together

int64_t chunks_per_item(const MIArgs& a) {
  const int64_t kk = int64_t(a.K) * a.K;
  // A chunk's histogram costs a fill and a reduction of K * K bins: at least 2 K^2 voxels
  // per chunk keeps that below the chunk's own work when the bins are many.
  const int64_t min_chunk = std::max<int64_t>(kMinChunk, 2 * kk);
  int64_t c = std::min<int64_t>((a.N + min_chunk - 1) / min_chunk, kMaxChunks);
  c = std::min<int64_t>(c, kMaxScratchBytes / (a.B * kk * int64_t(sizeof(double))));
  return std::max<int64_t>(c, 1);
}

// The AVX2 kernels (mi_avx2.h) serve float32 when the CPU has AVX2 + FMA, they are not
// switched off (cpu_utils.h: simd_enabled) and the window fits them.
template <typename T>
bool use_avx2(const MIArgs& a) {
#ifdef MRUS_HAVE_AVX2_KERNELS
  return std::is_same<T, float>::value && simd_enabled() && avx2::supported() &&
         avx2::MIWindows::serves(a);
#else
  (void)a;
  return false;
#endif
}

// Chunk histograms with the AVX2 kernels: each chunk fills two padded double histograms,
// then adds their real bins into its partial (same chunks, same reduction order as the
// portable loop, so the result is still independent of the thread count).
template <typename T>
void forward_chunks_avx2(const MIArgs& a, const T* f, const T* g, const T* m, const T* ranges,
                         int64_t C, double* partial) {
#ifdef MRUS_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<T, float>::value) {
    const avx2::MIWindows win(a);
    const int K = a.K, P = win.P, M = win.margin;
    const int64_t kk = int64_t(K) * K, pp = int64_t(P) * P;
#pragma omp parallel num_threads(a.num_threads)
    {
      std::vector<double> padded(static_cast<size_t>(2 * pp));
#pragma omp for schedule(dynamic, 1)
      for (int64_t bc = 0; bc < a.B * C; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        std::fill(padded.begin(), padded.end(), 0.0);
        const bool ok = win.accumulate(f + b * a.N, g + b * a.N, m ? m + b * a.N : nullptr,
                                       ranges[4 * b], ranges[4 * b + 1], ranges[4 * b + 2],
                                       ranges[4 * b + 3], a.N * c / C, a.N * (c + 1) / C,
                                       padded.data(), padded.data() + pp);
        double* h = partial + bc * kk;
        for (int i = 0; i < K; ++i) {
          const double* r0 = padded.data() + int64_t(i + M) * P + M;
          const double* r1 = r0 + pp;
          for (int j = 0; j < K; ++j) h[int64_t(i) * K + j] = r0[j] + r1[j];
        }
        if (!ok) std::fill(h, h + kk, std::numeric_limits<double>::quiet_NaN());
      }
    }
    return;
  }
#endif
  (void)a, (void)f, (void)g, (void)m, (void)ranges, (void)C, (void)partial;
  throw std::logic_error("mi: AVX2 kernels called for a case they do not serve");
}

// Chunk histograms with the portable loop: each chunk adds into its own partial, touching
// only the few bins of each voxel's window.
template <typename T>
void forward_chunks_portable(const MIArgs& a, const T* f, const T* g, const T* m,
                             const T* ranges, int64_t C, double* partial) {
  const int K = a.K;
  const int64_t kk = int64_t(K) * K;
#pragma omp parallel num_threads(a.num_threads)
  {
    // Weights in the input precision (float32 keeps every weight to ~1e-7 relative, well
    // inside the float32 tolerance), sums in double.
    std::vector<T> wf(K), wg(K);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bc = 0; bc < a.B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const int64_t v0 = a.N * c / C, v1 = a.N * (c + 1) / C;
      const T lo_f = ranges[4 * b], hi_f = ranges[4 * b + 1];
      const T lo_g = ranges[4 * b + 2], hi_g = ranges[4 * b + 3];
      double* h = partial + bc * kk;
      const T* fb = f + b * a.N;
      const T* gb = g + b * a.N;
      const T* mb = m ? m + b * a.N : nullptr;
      bool bad = false;
      for (int64_t v = v0; v < v1; ++v) {
        const T mv = mb ? mb[v] : T(1);
        if (mv == T(0)) continue;  // masked out: its values, even NaN, do not count
        int kf, kg;
        const int nf = mi::window<T>(a, fb[v], lo_f, hi_f, kf, wf.data(), nullptr, K);
        const int ng = mi::window<T>(a, gb[v], lo_g, hi_g, kg, wg.data(), nullptr, K);
        if (nf == 0 || ng == 0 || std::isnan(mv)) {
          bad = true;
          continue;
        }
        for (int i = 0; i < nf; ++i) {
          double* row = h + int64_t(kf + i) * K + kg;
          const double s = double(mv) * double(wf[i]);
          for (int j = 0; j < ng; ++j) row[j] += s * double(wg[j]);
        }
      }
      // A non-finite voxel makes the item's whole histogram NaN (mrus_kernels/mi.py).
      if (bad) std::fill(h, h + kk, std::numeric_limits<double>::quiet_NaN());
    }
  }
}

template <typename T>
void forward_impl(const MIArgs& a, const T* f, const T* g, const T* m, const T* ranges, T* hist) {
  const int64_t kk = int64_t(a.K) * a.K;
  const int64_t C = chunks_per_item(a);
  std::vector<double> partial(static_cast<size_t>(a.B * C * kk), 0.0);
  if (use_avx2<T>(a)) {
    forward_chunks_avx2<T>(a, f, g, m, ranges, C, partial.data());
  } else {
    forward_chunks_portable<T>(a, f, g, m, ranges, C, partial.data());
  }
  // The chunk histograms summed in chunk order.
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t e = 0; e < a.B * kk; ++e) {
    const int64_t b = e / kk, i = e % kk;
    const double* p = partial.data() + b * C * kk + i;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += p[c * kk];
    hist[e] = T(s);
  }
}

// Per-voxel gradients with the AVX2 kernels, from dL/dhist padded per item.
template <typename T>
void backward_avx2(const MIArgs& a, const T* f, const T* g, const T* m, const T* ranges,
                   const T* grad_hist, T* grad_f, T* grad_g) {
#ifdef MRUS_HAVE_AVX2_KERNELS
  if constexpr (std::is_same<T, float>::value) {
    const avx2::MIWindows win(a);
    const int K = a.K, P = win.P, M = win.margin;
    const int64_t kk = int64_t(K) * K, pp = int64_t(P) * P;
    std::vector<float> G(static_cast<size_t>(a.B * pp), 0.0f);
    for (int64_t b = 0; b < a.B; ++b) {
      for (int i = 0; i < K; ++i) {
        std::copy(grad_hist + b * kk + int64_t(i) * K, grad_hist + b * kk + int64_t(i + 1) * K,
                  G.data() + b * pp + int64_t(i + M) * P + M);
      }
    }
    // Blocks of voxels, so that a block never straddles two items.
    constexpr int64_t kBlock = 4096;
    const int64_t per_item = (a.N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t blk = 0; blk < a.B * per_item; ++blk) {
      const int64_t b = blk / per_item, v0 = (blk % per_item) * kBlock;
      const int64_t v1 = std::min(a.N, v0 + kBlock), o = b * a.N;
      win.gradient(f + o, g + o, m ? m + o : nullptr, ranges[4 * b], ranges[4 * b + 1],
                   ranges[4 * b + 2], ranges[4 * b + 3], G.data() + b * pp, v0, v1,
                   grad_f ? grad_f + o : nullptr, grad_g ? grad_g + o : nullptr);
    }
    return;
  }
#endif
  (void)a, (void)f, (void)g, (void)m, (void)ranges, (void)grad_hist, (void)grad_f, (void)grad_g;
  throw std::logic_error("mi: AVX2 kernels called for a case they do not serve");
}

template <typename T>
void backward_impl(const MIArgs& a, const T* f, const T* g, const T* m, const T* ranges,
                   const T* grad_hist, T* grad_f, T* grad_g) {
  if (use_avx2<T>(a)) {
    backward_avx2<T>(a, f, g, m, ranges, grad_hist, grad_f, grad_g);
    return;
  }
  const int K = a.K;
  const int64_t kk = int64_t(K) * K;
  const double nan = std::numeric_limits<double>::quiet_NaN();
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<T> wf(K), dwf(K), wg(K), dwg(K);
#pragma omp for schedule(static)
    for (int64_t idx = 0; idx < a.B * a.N; ++idx) {
      const int64_t b = idx / a.N;
      const T mv = m ? m[idx] : T(1);
      if (mv == T(0)) {
        if (grad_f) grad_f[idx] = T(0);
        if (grad_g) grad_g[idx] = T(0);
        continue;
      }
      int kf, kg;
      const int nf = mi::window<T>(a, f[idx], ranges[4 * b], ranges[4 * b + 1], kf, wf.data(),
                                   grad_f ? dwf.data() : nullptr, K);
      const int ng = mi::window<T>(a, g[idx], ranges[4 * b + 2], ranges[4 * b + 3], kg,
                                   wg.data(), grad_g ? dwg.data() : nullptr, K);
      if (nf == 0 || ng == 0) {
        if (grad_f) grad_f[idx] = T(nan);
        if (grad_g) grad_g[idx] = T(nan);
        continue;
      }
      const T* G = grad_hist + b * kk;
      // dL/df = m sum_a dW_a(f) sum_b G_ab W_b(g); dL/dg = m sum_a W_a(f) sum_b G_ab dW_b(g).
      T df = T(0), dg = T(0);
      for (int i = 0; i < nf; ++i) {
        const T* row = G + int64_t(kf + i) * K + kg;
        if (grad_f) {
          T r = T(0);
          for (int j = 0; j < ng; ++j) r += row[j] * wg[j];
          df += dwf[i] * r;
        }
        if (grad_g) {
          T s = T(0);
          for (int j = 0; j < ng; ++j) s += row[j] * dwg[j];
          dg += wf[i] * s;
        }
      }
      if (grad_f) grad_f[idx] = mv * df;
      if (grad_g) grad_g[idx] = mv * dg;
    }
  }
}

template <typename F>
void dispatch(const MIArgs& a, F&& fn) {
  dispatch_real(a.dtype, "mi (cpu kernels): dtype code must be float32 or float64",
                std::forward<F>(fn));
}

}  // namespace

void mi_forward(const MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                uintptr_t ranges, uintptr_t hist) {
  dispatch(a, [&](auto t) {
    using T = decltype(t);
    forward_impl<T>(a, reinterpret_cast<const T*>(fixed), reinterpret_cast<const T*>(moving),
                    reinterpret_cast<const T*>(mask), reinterpret_cast<const T*>(ranges),
                    reinterpret_cast<T*>(hist));
  });
}

void mi_backward(const MIArgs& a, uintptr_t fixed, uintptr_t moving, uintptr_t mask,
                 uintptr_t ranges, uintptr_t grad_hist, uintptr_t grad_fixed,
                 uintptr_t grad_moving) {
  dispatch(a, [&](auto t) {
    using T = decltype(t);
    backward_impl<T>(a, reinterpret_cast<const T*>(fixed), reinterpret_cast<const T*>(moving),
                     reinterpret_cast<const T*>(mask), reinterpret_cast<const T*>(ranges),
                     reinterpret_cast<const T*>(grad_hist), reinterpret_cast<T*>(grad_fixed),
                     reinterpret_cast<T*>(grad_moving));
  });
}

}  // namespace cpu

namespace {

mi::MIArgs mi_args(int dtype, int64_t B, int64_t N, int K, int kernel, double sigma,
                   double radius, int num_threads) {
  if (K < 2) throw std::invalid_argument("mi: bins must be >= 2");
  if (kernel != int(mi::Kernel::GAUSSIAN) && kernel != int(mi::Kernel::BSPLINE)) {
    throw std::invalid_argument("mi: kernel code must be 0 (gaussian) or 1 (bspline)");
  }
  mi::MIArgs a;
  a.dtype = dtype;
  a.B = B;
  a.N = N;
  a.K = K;
  a.kernel = static_cast<mi::Kernel>(kernel);
  a.sigma = sigma;
  a.gauss_step = std::exp(-1.0 / (sigma * sigma));
  a.radius = std::min(radius, double(K));
  a.num_threads = cpu::clamp_threads(num_threads);
  return a;
}

}  // namespace

void register_mi(py::module_& m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "mi_forward_cpu",
      [](int dtype, int64_t B, int64_t N, int K, int kernel, double sigma, double radius,
         int num_threads, uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t ranges,
         uintptr_t hist) {
        cpu::mi_forward(mi_args(dtype, B, N, K, kernel, sigma, radius, num_threads), fixed,
                        moving, mask, ranges, hist);
      },
      release);
  m.def(
      "mi_backward_cpu",
      [](int dtype, int64_t B, int64_t N, int K, int kernel, double sigma, double radius,
         int num_threads, uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t ranges,
         uintptr_t grad_hist, uintptr_t grad_fixed, uintptr_t grad_moving) {
        cpu::mi_backward(mi_args(dtype, B, N, K, kernel, sigma, radius, num_threads), fixed,
                         moving, mask, ranges, grad_hist, grad_fixed, grad_moving);
      },
      release);
  m.def(
      "mi_forward_cuda",
      [](int dtype, int64_t B, int64_t N, int K, int kernel, double sigma, double radius,
         uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t ranges, uintptr_t partial,
         int64_t blocks_per_item, uintptr_t stream) {
        cuda::mi_forward(mi_args(dtype, B, N, K, kernel, sigma, radius, 1), fixed, moving, mask,
                         ranges, partial, blocks_per_item, stream);
      },
      release);
  m.def(
      "mi_backward_cuda",
      [](int dtype, int64_t B, int64_t N, int K, int kernel, double sigma, double radius,
         uintptr_t fixed, uintptr_t moving, uintptr_t mask, uintptr_t ranges,
         uintptr_t grad_hist, uintptr_t grad_fixed, uintptr_t grad_moving, uintptr_t stream) {
        cuda::mi_backward(mi_args(dtype, B, N, K, kernel, sigma, radius, 1), fixed, moving, mask,
                          ranges, grad_hist, grad_fixed, grad_moving, stream);
      },
      release);
}

}  // namespace mrus
